"""`python -m jaxground.evaluate` end to end on a briefly trained shapes-world checkpoint."""

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
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
               "--task", task, "--data", heldout, "--config.eval.limit=12",
               "--config.eval.batch_size=4", *extra, check=check)


def read_results(out):
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    with open(os.path.join(out, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    return results, report, samples


# ---- numbers: recomputed with the metric cores, never through evaluate's own scoring ------
# The shapes config evaluates under the `training` protocol: LLaVA's POPE parser and MME's
# official one (README, "Evaluation protocols"); CHAIR's matcher is eval.chair_matcher's
# default, the original code's.
POPE_PARSER, MME_PARSER, CHAIR_MATCHER, FLAG_THRESHOLD = "llava", "official", "reference", 0.0
SUFFIX = "\nAnswer the question using a single word or phrase."


def as_json(x):
    """`x` as results.json holds it: NaN -> null, tuples -> lists, numpy -> Python."""
    if isinstance(x, dict):
        return {str(k): as_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [as_json(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def recompute(task, samples, data, tokenizer=None, parser=None, matcher=CHAIR_MATCHER):
    """The metrics of `samples` (samples.jsonl) from the metric cores alone."""
    from jaxground.eval import chair, mme, pope, tasks

    answered = [s for s in samples if "error" not in s]
    if task == "pope":
        questions = [{"question_id": s["question_id"], "label": s["label"],
                      "category": s["split"]} for s in samples]
        answers = [{"question_id": s["question_id"], "text": s["text"]} for s in answered]
        metrics = pope.score_splits(questions, answers, parser=parser or POPE_PARSER)
    elif task == "chair":
        metrics = chair.score([{"image_id": s["image_id"], "caption": s["text"]}
                               for s in answered], data, matcher=matcher)
        metrics["failed_images"] = [s["image_id"] for s in samples if "error" in s]
    elif task == "mme":  # questions and truth read from the MME folder itself
        answers = [{"question_id": s["question_id"], "prompt": s["prompt"], "text": s["text"]}
                   for s in answered]
        metrics = mme.score(mme.read_mme(data), answers, parser=parser or MME_PARSER)
    else:
        metrics = tasks.score_grounding(samples, tokenizer, data, flag_threshold=FLAG_THRESHOLD)
    return as_json(metrics)


NUM = r"(n/a|-?\d+(?:\.\d+)?)"


def shows(text, value):
    """`text` is `value` as the report prints it: rounded to the decimals shown, n/a for none."""
    if value is None:
        return text == "n/a"
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-9


def table(report, first_header):
    """Rows (lists of cells) of the report's markdown table whose first column is named so."""
    lines = report.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"| {first_header} |")))
    rows = []
    for line in lines[start + 2:]:  # past the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def check_report(task, m, report):
    """Every number report.md prints is results.json's."""
    def row(cells, values):
        assert len(cells) == len(values) and all(map(shows, cells, values)), (cells, values)

    def sentence(pattern, *values):
        found = re.search(pattern, report)
        assert found, (pattern, report)
        row(list(found.groups()), list(values))

    if task == "pope":
        splits = sorted(k for k, v in m.items() if isinstance(v, dict))
        rows = {r[0]: r[1:] for r in table(report, "split")}
        assert sorted(rows) == splits
        for s in splits:
            row(rows[s], [m[s][k] for k in ("accuracy", "precision", "recall", "f1",
                                            "yes_ratio")] + [len(m[s]["missing"])])
        sentence(rf"Mean F1 over splits: {NUM}", m["mean_f1"])
    elif task == "chair":
        [cells] = table(report, "CHAIR_s")
        row(cells, [m["chair_s"], m["chair_i"], m["recall"], m["mean_length"],
                    len(m["per_caption"])])
    elif task == "mme":
        rows = {r[0]: r[1:] for r in table(report, "subtask")}
        assert sorted(rows) == sorted(m["subtasks"])
        for name, s in m["subtasks"].items():
            row(rows[name], [s["score"], s["acc"], s["acc_plus"], s["n_questions"]])
        sentence(rf"Perception {NUM}, cognition {NUM}, total {NUM}\.", m["perception"],
                 m["cognition"], m["total"])
    else:
        rows = {r[0]: r[1:] for r in table(report, "signal")}
        assert sorted(rows) == sorted(m["token"])
        for signal in m["token"]:
            t, men = m["token"][signal], m["mention"][signal]
            row(rows[signal], [t["auroc"], t["aupr"], men["auroc"], men["aupr"]])
        sentence(rf"{NUM} mention tokens \({NUM} hallucinated\), {NUM} mentions \({NUM} "
                 r"hallucinated\)", m["tokens"], m["hallucinated_tokens"], m["mentions"],
                 m["hallucinated_mentions"])
        fl = m["flagging"]
        sentence(rf"{NUM} flagged, precision {NUM}, recall {NUM} of {NUM} hallucinated",
                 fl["flagged"], fl["precision"], fl["recall"], fl["hallucinated"])


def check_numbers(task, out, data, tokenizer=None):
    """results.json's metrics are those the metric cores give on samples.jsonl, and
    report.md prints them; returns (results, report, samples)."""
    results, report, samples = read_results(out)
    assert results["metrics"] == recompute(task, samples, data, tokenizer)
    check_report(task, results["metrics"], report)
    return results, report, samples


def check_answers(out, samples):
    """answers.jsonl is LLaVA's answer file ({"question_id", "prompt", "text"}) of the
    answered samples, the answers of an image adjacent (MME's calculation.py pairs
    consecutive lines)."""
    with open(os.path.join(out, "answers.jsonl")) as f:
        answers = [json.loads(line) for line in f]
    assert all(set(a) == {"question_id", "prompt", "text"} for a in answers)
    expected = [{"question_id": s["question_id"], "prompt": s["prompt"], "text": s["text"]}
                for s in samples if "error" not in s]
    key = lambda a: json.dumps(a, sort_keys=True)  # noqa: E731
    assert sorted(map(key, answers)) == sorted(map(key, expected))
    ids = [a["question_id"] for a in answers]
    assert len([k for k, _ in itertools.groupby(ids)]) == len(set(ids))


def rescore_edited(workdir, task, data, out, dst, text_of):
    """Runs evaluate's --rescore path (in process: no model is loaded) in `dst` on `out`'s
    samples with their answers replaced by text_of(i, sample). A briefly trained model's
    own answers are too uniform to tell parsers or matchers apart; these can."""
    from jaxground.evaluate import evaluate as evaluate_in_process

    _, _, samples = read_results(out)
    os.makedirs(dst)
    with open(os.path.join(dst, "samples.jsonl"), "w") as f:
        for i, s in enumerate(samples):
            f.write(json.dumps({**s, "text": text_of(i, s)}) + "\n")
    shutil.copy(os.path.join(out, "results.json"), dst)  # the generating run's stats
    evaluate_in_process(workdir, task, data, out=dst, rescore=True)


def drop(x, key):
    """`x` without `key` at any depth (to compare numbers, not the parser's name)."""
    if isinstance(x, dict):
        return {k: drop(v, key) for k, v in x.items() if k != key}
    return x


def pope_text(i, s):
    """An answer LLaVA's POPE parser and lmms-eval's exact match may read differently ("Yes,
    there is one.", "no."): yes questions all read as yes by LLaVA's, no questions one in
    three, so that precision and recall differ."""
    if s["label"] == "yes":
        return ("Yes", "Yes, there is one.")[i % 2]
    return ("No", "Yes", "no.")[i % 3]


# Answers MME's official parser and lmms-eval's read differently ("y", "  Yes").
MME_TEXTS = ("Yes", "No.", "y", "  Yes", "no")
# Appended to captions: the reference matcher keeps "red-circle" whole (no mention) and
# counts punctuation tokens in the length; the clean one does neither.
CHAIR_TAIL = " A red-circle, two squares."


def test_pope_from_a_coco_folder(workdir, tmp_path):
    from jaxground.data.coco import load_coco

    heldout, out = os.path.join(workdir, "data", "heldout"), os.path.join(workdir, "eval", "pope")
    proc = evaluate(workdir, "pope")
    results, report, samples = check_numbers("pope", out, heldout)
    assert results["step"] == 40 and results["samples"] == 12 == len(samples)
    assert results["protocol"]["pope_parser"] == POPE_PARSER
    m = results["metrics"]
    answered = sum(m[s]["tp"] + m[s]["fp"] + m[s]["tn"] + m[s]["fn"]
                   for s in ("random", "popular", "adversarial") if s in m)
    assert answered == 12 and all(s["text"] for s in samples)
    printed = re.search(rf"pope: mean F1 {NUM}", proc.stdout)
    assert printed and shows(printed[1], m["mean_f1"])
    # Labels are the COCO folder's truth; prompts carry LLaVA's suffix once.
    index = load_coco(heldout)
    image_ids = {index.image_path(i): i for i in index.images}
    for s in samples:
        assert (s["label"] == "yes") == (s["object"] in index.present[image_ids[s["image"]]])
        assert s["prompt"] == s["question"] + SUFFIX
    check_answers(out, samples)
    # Answers the two parsers read differently are scored with the protocol's.
    edited = str(tmp_path / "edited")
    rescore_edited(workdir, "pope", heldout, out, edited, pope_text)
    results, _, samples = check_numbers("pope", edited, heldout)
    m = results["metrics"]
    assert 0 < m["mean_f1"] < 1 and m["random"]["precision"] != m["random"]["recall"]
    other = recompute("pope", samples, heldout, parser="lmms_eval")
    assert drop(results["metrics"], "parser") != drop(other, "parser")


def test_chair_and_its_guided_variant(workdir, tmp_path):
    heldout = os.path.join(workdir, "data", "heldout")
    plain_out, guided_out = (os.path.join(workdir, "eval", d) for d in ("chair", "chair-guided"))
    evaluate(workdir, "chair")
    evaluate(workdir, "chair", "--config.eval.guided=True", "--config.eval.guidance=3.0")
    plain, report, samples = check_numbers("chair", plain_out, heldout)
    guided, guided_report, guided_samples = check_numbers("chair", guided_out, heldout)
    for r in (plain, guided):
        assert r["metrics"]["matcher"] == CHAIR_MATCHER and r["metrics"]["mean_length"] > 0
    # Guidance is applied: the same images and decoding but for alpha give other captions.
    assert [s["image_id"] for s in guided_samples] == [s["image_id"] for s in samples]
    assert guided["decode"]["guidance"] == 3.0 and plain["decode"]["guidance"] is None
    assert {**guided["decode"], "guidance": None} == plain["decode"]
    assert any(g["text"] != s["text"] for g, s in zip(guided_samples, samples))
    assert "grounding-guided" in guided_report and "grounding-guided" not in report
    assert len(samples) == 12
    s = samples[0]
    n = len(s["token_ids"])
    assert n and all(len(s[k]) == n for k in ("grounding", "logprobs", "entropy", "flagged"))
    # Captions the two matchers read differently are scored with the configured one.
    edited = str(tmp_path / "edited")
    rescore_edited(workdir, "chair", heldout, plain_out, edited,
                   lambda i, s: s["text"] + CHAIR_TAIL)
    results, _, samples = check_numbers("chair", edited, heldout)
    other = recompute("chair", samples, heldout, matcher="clean")
    assert drop(results["metrics"], "matcher") != drop(other, "matcher")


def test_grounding_writes_metrics_and_heatmaps_and_rescores(workdir):
    from jaxground.data.processor import load_tokenizer

    heldout, out = (os.path.join(workdir, "data", "heldout"),
                    os.path.join(workdir, "eval", "grounding"))
    evaluate(workdir, "grounding", "--config.eval.heatmaps=2")
    results, report, samples = check_numbers("grounding", out, heldout, load_tokenizer(workdir))
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
    check_report("grounding", again["metrics"], report_again)
    # ...and keeps what only the generating run knew.
    assert again["decode"] == results["decode"] and again["heatmaps"] == pages


def test_bad_inputs_name_the_problem(workdir, tmp_path):
    proc = evaluate(workdir, "chair", "--step", "7", check=False)
    assert proc.returncode != 0 and "step 7" in proc.stderr
    proc = run("jaxground.evaluate", "--workdir", workdir, "--task", "chair", "--data",
               str(tmp_path / "nowhere"), check=False)
    assert proc.returncode != 0 and "nowhere" in proc.stderr
    proc = evaluate(workdir, "pope", "--config.eval.batch_size=0", check=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == "error: config.eval.batch_size: 0 must be >= 1"


def test_grounding_on_given_captions_is_teacher_forced(workdir, tmp_path):
    heldout = os.path.join(workdir, "data", "heldout")
    records = str(tmp_path / "captions.jsonl")
    run("jaxground.data.coco", "--coco_dir", heldout, "--out", records, "--kinds", "caption")
    out = str(tmp_path / "given")
    run("jaxground.evaluate", "--config", "configs/shapes.py", "--workdir", workdir,
        "--task", "grounding", "--data", records, "--images", heldout, "--out", out,
        "--config.eval.limit=30", "--config.eval.guided=True")  # no effect on given captions
    from jaxground.data.processor import load_tokenizer

    results, report, samples = check_numbers("grounding", out, records, load_tokenizer(workdir))
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
    results, report, samples = check_numbers("mme", out, root)
    assert results["protocol"]["mme_parser"] == MME_PARSER
    m = results["metrics"]
    assert set(m["subtasks"]) == {"existence", "count"} and len(samples) == 12
    assert m["perception"] == m["subtasks"]["existence"]["score"] + m["subtasks"]["count"]["score"]
    for s in samples:
        assert s["prompt"] == s["question"].replace(" Please answer yes or no.", "") + SUFFIX
    check_answers(out, samples)
    # Answers the two parsers read differently are scored with the protocol's.
    edited = str(tmp_path / "edited")
    rescore_edited(workdir, "mme", root, out, edited, lambda i, s: MME_TEXTS[i % len(MME_TEXTS)])
    results, _, samples = check_numbers("mme", edited, root)
    other = recompute("mme", samples, root, parser="lmms_eval")
    assert drop(results["metrics"], "parser") != drop(other, "parser")


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


def test_bf16_captions_agree_with_fp32(workdir, tmp_path):
    """The trained model evaluated in bf16 (`eval.dtype`) writes the fp32 captions: greedy
    tokens agree on >= 97% of positions (a position either run generated; a caption that
    stops early disagrees on every position the other one goes on for)."""
    heldout = os.path.join(workdir, "data", "heldout")
    outs = {}
    for dtype in ("float32", "bfloat16"):
        outs[dtype] = str(tmp_path / dtype)
        evaluate(workdir, "chair", "--out", outs[dtype], f"--config.eval.dtype={dtype}")
    fp32, bf16 = (read_results(outs[d])[2] for d in ("float32", "bfloat16"))
    assert read_results(outs["bfloat16"])[0]["dtype"] == "bfloat16"
    assert [s["image_id"] for s in fp32] == [s["image_id"] for s in bf16] and len(fp32) == 12
    same = total = 0
    for a, b in zip(fp32, bf16):
        a, b = a["token_ids"], b["token_ids"]
        total += max(len(a), len(b))
        same += sum(x == y for x, y in zip(a, b))
    print(f"bf16 vs fp32 greedy captions: {same} of {total} positions agree")
    assert total > 12 and same >= 0.97 * total, (same, total)
