"""`python -m jaxground.evaluate` end to end on a briefly trained shapes-world checkpoint."""

import json
import os
import subprocess
import sys

import pytest

REPO = __file__.rsplit("/tests/", 1)[0]
TRAIN_FLAGS = ["--config.train.steps=40", "--config.train.checkpoint_every=20",
               "--config.data.world_images=160", "--config.data.eval_world_images=24",
               "--config.train.progress=False"]


def run(*args, check=True):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shapes_run") / "run")
    run("jaxground.train", "--config", "configs/shapes.py", "--workdir", d, *TRAIN_FLAGS)
    return d


def evaluate(workdir, task, *extra, check=True):
    heldout = os.path.join(workdir, "data", "heldout")
    return run("jaxground.evaluate", "--config", "configs/shapes.py", "--workdir", workdir,
               "--task", task, "--data", heldout, "--config.eval.limit=12", "--config.eval.batch_size=4", *extra, check=check)


def read_results(out):
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    with open(os.path.join(out, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    return results, report, samples


def test_pope_from_a_coco_folder(workdir):
    proc = evaluate(workdir, "pope")
    results, report, samples = read_results(os.path.join(workdir, "eval", "pope"))
    assert results["step"] == 40 and results["samples"] == 12 == len(samples)
    m = results["metrics"]
    assert 0.0 <= m["mean_f1"] <= 1.0 and "Mean F1" in report
    answered = sum(m[s]["tp"] + m[s]["fp"] + m[s]["tn"] + m[s]["fn"]
                   for s in ("random", "popular", "adversarial") if s in m)
    assert answered == 12 and all(s["text"] for s in samples)
    assert "pope: mean F1" in proc.stdout


def test_chair_and_its_guided_variant(workdir):
    evaluate(workdir, "chair")
    evaluate(workdir, "chair", "--config.eval.guided=True", "--config.eval.guidance=3.0")
    plain, report, samples = read_results(os.path.join(workdir, "eval", "chair"))
    guided, _, guided_samples = read_results(os.path.join(workdir, "eval", "chair-guided"))
    for r in (plain, guided):
        m = r["metrics"]
        assert 0 <= m["chair_s"] <= 1 and 0 <= m["chair_i"] <= 1 and m["mean_length"] > 0
    assert guided["decode"]["guidance"] == 3.0 and plain["decode"]["guidance"] is None
    assert "CHAIR_i" in report and len(samples) == 12
    s = samples[0]
    n = len(s["token_ids"])
    assert n and all(len(s[k]) == n for k in ("grounding", "logprobs", "entropy", "flagged"))


def test_grounding_writes_metrics_and_heatmaps_and_rescores(workdir):
    out = os.path.join(workdir, "eval", "grounding")
    evaluate(workdir, "grounding", "--config.eval.heatmaps=2")
    results, report, samples = read_results(out)
    token = results["metrics"]["token"]
    assert set(token) == {"grounding", "nll", "entropy"}
    assert results["metrics"]["tokens"] > 0 and "token AUROC" in report
    pages = results["heatmaps"]
    assert len(pages) == 2 and all(os.path.exists(os.path.join(out, p)) for p in pages)
    page_dir = os.path.dirname(os.path.join(out, pages[0]))
    assert any(f.endswith(".png") for f in os.listdir(page_dir))
    # Re-scoring from samples.jsonl alone reproduces the metrics without the model.
    with open(os.path.join(out, "results.json"), "w") as f:  # only the run's stats survive
        json.dump({k: results[k] for k in ("decode", "heatmaps", "seconds", "new_tokens",
                                           "tokens_per_s")}, f)
    evaluate(workdir, "grounding", "--rescore")
    again, report_again, _ = read_results(out)
    assert again["metrics"] == results["metrics"]
    # ...and keeps what only the generating run knew.
    assert again["decode"] == results["decode"] and again["heatmaps"] == pages


def test_bad_inputs_name_the_problem(workdir, tmp_path):
    proc = evaluate(workdir, "chair", "--step", "7", check=False)
    assert proc.returncode != 0 and "step 7" in proc.stderr
    proc = run("jaxground.evaluate", "--workdir", workdir, "--task", "chair", "--data",
               str(tmp_path / "nowhere"), check=False)
    assert proc.returncode != 0 and "nowhere" in proc.stderr
    proc = evaluate(workdir, "pope", "--config.eval.batch_size=0", check=False)
    assert proc.returncode != 0 and "eval.batch_size" in proc.stderr


def test_grounding_on_given_captions_is_teacher_forced(workdir, tmp_path):
    heldout = os.path.join(workdir, "data", "heldout")
    records = str(tmp_path / "captions.jsonl")
    run("jaxground.data.coco", "--coco_dir", heldout, "--out", records, "--kinds", "caption")
    out = str(tmp_path / "given")
    run("jaxground.evaluate", "--config", "configs/shapes.py", "--workdir", workdir,
        "--task", "grounding", "--data", records, "--images", heldout, "--out", out,
        "--config.eval.limit=30", "--config.eval.guided=True")  # no effect on given captions
    results, report, samples = read_results(out)
    m = results["metrics"]
    assert results["teacher_forced"] and "teacher forced" in report
    # Positives and their hallucinated edits: both classes are present among the mentions.
    assert m["tokens"] > m["hallucinated_tokens"] > 0
    assert {s["label"] for s in samples} == {"positive", "negative"}
    s = next(s for s in samples if s["label"] == "negative")
    assert s["text"].lower().replace(" ", "") == s["caption"].lower().replace(" ", "")


def _mme_folder(root, heldout):
    """A 2-subtask MME folder made of held-out shapes images."""
    from jaxground.data.coco import load_coco

    index = load_coco(heldout)
    ids = sorted(index.present)[:3]
    for subtask in ("existence", "count"):
        d = os.path.join(root, subtask)
        os.makedirs(os.path.join(d, "images"))
        os.makedirs(os.path.join(d, "questions_answers_YN"))
        for i in ids:
            name = f"{i}.png"
            with open(os.path.join(heldout, index.image_path(i)), "rb") as src, \
                    open(os.path.join(d, "images", name), "wb") as dst:
                dst.write(src.read())
            present = sorted(index.present[i])[0]
            absent = sorted(set(index.categories) - index.present[i])[0]
            with open(os.path.join(d, "questions_answers_YN", f"{i}.txt"), "w") as f:
                f.write(f"Is there a {present} in the image? Please answer yes or no.\tYes\n"
                        f"Is there a {absent} in the image? Please answer yes or no.\tNo\n")


def test_mme(workdir, tmp_path):
    root = str(tmp_path / "MME")
    _mme_folder(root, os.path.join(workdir, "data", "heldout"))
    out = str(tmp_path / "mme")
    run("jaxground.evaluate", "--config", "configs/shapes.py", "--workdir", workdir,
        "--task", "mme", "--data", root, "--out", out)
    results, report, samples = read_results(out)
    m = results["metrics"]
    assert set(m["subtasks"]) == {"existence", "count"} and len(samples) == 12
    assert m["perception"] == m["subtasks"]["existence"]["score"] + m["subtasks"]["count"]["score"]
    assert 0 <= m["total"] <= 400 and "Perception" in report


def test_pope_question_files_with_overlapping_ids(tmp_path):
    """The official POPE files each number their questions from 1: read together, the ids
    are qualified by split instead of colliding."""
    from jaxground.eval import tasks

    for split in ("random", "adversarial"):
        with open(tmp_path / f"coco_pope_{split}.json", "w") as f:
            for qid, label in ((1, "yes"), (2, "no")):
                f.write(json.dumps({"question_id": qid, "image": "x.jpg", "label": label,
                                    "text": "Is there a dog in the image?"}) + "\n")
    data = tasks.pope_data(str(tmp_path))
    assert sorted(data.records) == ["adversarial/1", "adversarial/2", "random/1", "random/2"]
    assert {r["split"] for r in data.records.values()} == {"random", "adversarial"}
    samples = [{**r, "text": "Yes"} for r in data.records.values()]
    m = tasks.score_pope(samples)
    assert m["random"]["tp"] == 1 and m["random"]["fp"] == 1 and not m["random"]["missing"]
