"""`python -m jaxground.demo --quick`: the whole demo end to end on a small world."""

import json
import os
import subprocess
import sys

import numpy as np

REPO = __file__.rsplit("/tests/", 1)[0]
FIELDS = ("chair_s", "chair_i", "recall", "pope_random_f1", "pope_popular_f1",
          "pope_adversarial_f1", "token_auroc")


def test_quick_demo_writes_every_report_file(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "jaxground.demo", "--out", str(out),
                           "--quick"], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    for name in ("report.md", "report.html", "results.json", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"grounded", "guided", "ungrounded", "vcd", "lora", "lora_guided"}
    for model, values in results.items():
        missing = [f for f in FIELDS if values.get(f) is None]
        assert not missing, f"{model} lacks {missing}"
        assert 0 <= values["chair_i"] <= 1
    # Training time only for the two trained models; the decoding variants reuse them.
    assert results["grounded"]["train_seconds"] > 0 and results["ungrounded"]["train_seconds"] > 0
    assert "train_seconds" not in results["vcd"] and "train_seconds" not in results["guided"]
    # The LoRA column: the ungrounded run as the base, int8, adapters + heads trained.
    assert results["lora"]["train_seconds"] > 0 and "train_seconds" not in results["lora_guided"]
    assert results["lora_guided"]["pope_adversarial_f1"] == results["lora"]["pope_adversarial_f1"]
    lora_run = json.loads((out / "lora" / "train_config.json").read_text())
    assert lora_run["model"]["init_from"] == "../ungrounded"
    assert lora_run["model"]["lora"]["enabled"] and lora_run["model"]["quant"] == "int8"
    assert json.loads((out / "lora" / "jaxground_config.json").read_text())["quant"]["mode"] == "int8"
    report = (out / "report.md").read_text()
    assert "ungrounded (λ = 0)" in report and "grounded (λ = 1)" in report
    assert "ungrounded + VCD" in report
    assert "ungrounded + LoRA grounding fine-tune" in report and "frozen in int8" in report
    assert "CHAIR_i" in report and "curves.png" in report
    html = (out / "report.html").read_text()
    assert "<table>" in html and "curves.png" in html
    # The terminal ends with the table and the report's path.
    assert "POPE adversarial F1" in proc.stdout and str(out / "report.md") in proc.stdout
    # Heatmap pages the report links to exist.
    pages = [line.split("(")[-1].rstrip(")") for line in report.splitlines()
             if line.startswith("- [") and "heatmaps/" in line and "index.html" in line]
    assert pages and all((out / p).exists() for p in pages)


def _params(workdir):
    import jax
    from flax import nnx

    import jaxground
    from jaxground.utils.trees import leaves_by_path

    state = nnx.state(jaxground.load(str(workdir)), nnx.Param)
    return {k: np.asarray(v) for k, v in leaves_by_path(jax.device_get(state)).items()}


def _params_at_init(workdir) -> dict:
    """The parameters a run started from (no init_from: its seeded random init)."""
    import jax
    from flax import nnx

    from jaxground.checkpoints.converted import read_config
    from jaxground.models.llava import init_model
    from jaxground.utils.trees import leaves_by_path

    seed = json.loads((workdir / "train_config.json").read_text())["train"]["seed"]
    state = nnx.state(init_model(read_config(str(workdir)), seed=seed), nnx.Param)
    return {k: np.asarray(v) for k, v in leaves_by_path(jax.device_get(state)).items()}


def _changed(before: dict, after: dict) -> set[str]:
    """Top-level parts (vision_tower, projector, language_model/...) whose values moved."""
    def part(key: str) -> str:
        return "/".join(key.split("/")[:2 if key.startswith("language_model") else 1])

    return {part(k) for k in before if not np.array_equal(before[k], after[k])}


def test_quick_hard_demo_runs_the_three_stage_recipe(tmp_path):
    """Vision tower pretrained contrastively, the projector aligned alone, the fine-tunes
    from that checkpoint with the tower frozen; each stage a train run chained by
    init_from, and the report says so."""
    out = tmp_path / "hard"
    proc = subprocess.run([sys.executable, "-m", "jaxground.demo", "--out", str(out),
                           "--quick", "--world", "hard", "--lora-steps=-1"],  # LoRA: above
                          cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    chain = {"align": "vision", "grounded": "align", "ungrounded": "align"}
    for run, base in chain.items():
        saved = json.loads((out / run / "train_config.json").read_text())
        assert os.path.normpath(out / run / saved["model"]["init_from"]) == str(out / base)
    vision = [json.loads(line) for line in (out / "vision" / "metrics.jsonl").open()]
    assert vision[-1]["loss"] < vision[0]["loss"]  # the contrastive loss went down
    assert 0 <= vision[-1]["retrieval_accuracy"] <= 1
    params = {run: _params(out / run) for run in ("vision", "align", "grounded")}
    lm_layers = "language_model/layers"
    assert _changed(_params_at_init(out / "vision"), params["vision"]) == {
        "vision_tower", "projector", "language_model/embed_tokens"}
    assert _changed(params["vision"], params["align"]) == {"projector"}
    changed = _changed(params["align"], params["grounded"])
    assert "vision_tower" not in changed and {"projector", lm_layers} <= changed
    report = (out / "report.md").read_text()
    assert "hard shapes world" in report and "pretrained CLIP-style" in report
    assert (out / "report.html").stat().st_size > 0

    # A run that trains everything from a stage's workdir saves no frozen part; it loads
    # without looking for one (it used to ask init_from for a converted dir's params/).
    from jaxground.config import RunConfig, recipe_config
    from jaxground.training.trainer import train

    cfg = recipe_config("finetune")
    cfg.data.dir, cfg.model.init_from = str(out / "data" / "train"), str(out / "align")
    cfg.train.trainable, cfg.train.steps, cfg.train.progress = ".*", 2, False
    cfg.train.checkpoint_every, cfg.train.warmup_steps = 2, 0
    train(RunConfig.from_config_dict(cfg).train, str(tmp_path / "all"))
    assert _changed(params["align"], _params(tmp_path / "all")) >= {"vision_tower", lm_layers}
