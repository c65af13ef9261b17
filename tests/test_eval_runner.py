"""jaxground.eval.settings (a run's config read once into typed, checked settings) and
jaxground.eval.runner (evaluation as a library, what `python -m jaxground.evaluate` runs)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from jaxground.eval import pope, report, runner
from jaxground.eval.settings import EVAL_FIELDS, EvalConfigError, EvalSettings
from jaxground.config import default_config, llava_1_5_config
from test_protocols import converted  # noqa: F401  (a fixture: a tiny converted LLaVA + POPE)

REPO = __file__.rsplit("/tests/", 1)[0]


def test_defaults_are_the_training_configs():
    cfg = default_config()
    s = EvalSettings()
    assert s.eval_dict() == cfg.eval.to_dict() and set(EVAL_FIELDS) == set(cfg.eval)
    assert (s.data_template, s.data_pad_to_square, s.label_attributes, dict(s.mesh),
            s.init_from) == (cfg.data.template, cfg.data.pad_to_square,
                             cfg.data.label_attributes, cfg.mesh.to_dict(), cfg.model.init_from)
    assert EvalSettings.from_config_dict(cfg) == s
    assert s.resolved_protocol.name == "training"
    # A preset's values come through, and the (locked) config is only read.
    cfg = llava_1_5_config("llava-1.5-7b")
    cfg.model.init_from, cfg.mesh.tensor, cfg.data.label_attributes = "/base", 2, True
    cfg.lock()
    before = cfg.to_dict()
    s = EvalSettings.from_config_dict(cfg)
    assert (s.protocol, s.data_template, s.data_pad_to_square, s.label_attributes, s.init_from,
            s.mesh["tensor"]) == ("llava_1_5", "vicuna_v1", True, True, "/base", 2)
    assert s.resolved_protocol.caption_tokens == 512 and cfg.to_dict() == before


def test_a_partial_saved_config_gets_defaults(tmp_path):
    """A train_config.json written before fields existed: those get their defaults."""
    saved = {"model": {"preset": "shapes"}, "data": {"template": "vicuna_v1"},
             "eval": {"batch_size": 3, "guided": True, "guidance": 2.5}}
    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    s = runner.settings_for(str(tmp_path))
    assert s == dataclasses.replace(EvalSettings(), batch_size=3, guided=True, guidance=2.5,
                                    data_template="vicuna_v1")
    assert (s.resolved_protocol.template, s.resolved_protocol.pad_to_square) == (
        "vicuna_v1", False)
    assert EvalSettings.from_config_dict({}) == EvalSettings()
    # A given config wins over the saved one; without either (a converted checkpoint), the
    # defaults under LLaVA-1.5's protocol.
    assert runner.settings_for(str(tmp_path), default_config()) == EvalSettings()
    assert runner.settings_for(str(tmp_path / "converted")) == EvalSettings(protocol="llava_1_5")
    assert runner.settings_for(str(tmp_path), s) is s


BAD = [({"batch_size": 0}, "batch_size: 0 must be >= 1"),
       ({"max_new_tokens": -1}, "max_new_tokens: -1 must be >= 0"),
       ({"answer_tokens": -1}, "answer_tokens: -1 must be >= 0"),
       ({"temperature": -0.5}, "temperature: -0.5 must be >= 0"),
       ({"top_p": 0.0}, r"top_p: 0.0 must lie in \(0, 1\]"),
       ({"top_p": 1.5}, r"top_p: 1.5 must lie in \(0, 1\]"),
       ({"guidance_top_k": 0}, "guidance_top_k: 0 must be >= 1"),
       ({"guidance_score": "sigmoid"}, "guidance_score: 'sigmoid' is not"),
       ({"dtype": "fp8"}, "dtype: 'fp8' is not"),
       ({"contrast": "dola"}, "contrast: 'dola' is not"),
       ({"contrast": "vcd", "guided": True}, "contrast: contrastive decoding and grounding"),
       ({"contrast_beta": 1.5}, r"contrast_beta: 1.5 must lie in \[0, 1\]"),
       ({"contrast_noise_step": 1000}, r"contrast_noise_step: 1000 must lie in \[0, 1000\)"),
       ({"chair_matcher": "fuzzy"}, "chair_matcher: 'fuzzy' is not"),
       ({"chair_images": -1}, "chair_images: -1 must be >= 0"),
       ({"limit": -1}, "limit: -1 must be >= 0"),
       ({"heatmaps": -1}, "heatmaps: -1 must be >= 0"),
       ({"protocol": "llava"}, "protocol: 'llava' is not one of"),
       ({"template": "chatml"}, "template: 'chatml' is not one of"),
       ({"image_aspect_ratio": "stretch"}, "image_aspect_ratio: 'stretch' is not one of"),
       ({"pope_parser": "exact"}, "pope_parser: 'exact' is not one of"),
       ({"mme_parser": "exact"}, "mme_parser: 'exact' is not one of"),
       ({"guidence": 3.0}, "guidence: not an evaluation setting")]


@pytest.mark.parametrize("fields,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_a_bad_eval_field_is_named(fields, message):
    cfg = default_config().to_dict()
    cfg["eval"].update(fields)
    with pytest.raises(EvalConfigError, match=f"^config.eval.{message}"):
        EvalSettings.from_config_dict(cfg)
    assert EvalSettings.from_config_dict(default_config().to_dict()) == EvalSettings()


def test_a_bad_eval_field_is_one_line_from_the_cli(tmp_path):
    """A user's mistake, not our bug: the CLI prints it in one line and exits non-zero."""
    from jaxground import cli

    error = EvalConfigError("config.eval.x: wrong")
    assert isinstance(error, ValueError) and isinstance(error, cli.USER_ERRORS)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxground.evaluate", "--config", "configs/shapes.py",
         "--workdir", str(tmp_path), "--task", "pope", "--data", str(tmp_path),
         "--config.eval.guidance_top_k=0"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == "error: config.eval.guidance_top_k: 0 must be >= 1"
    assert "Traceback" not in proc.stderr


def _read(out, name):
    with open(os.path.join(out, name)) as f:
        return f.read()


def test_run_task_as_a_library_gives_the_clis_results(converted, tmp_path):  # noqa: F811
    jg, data, images = (str(converted / n) for n in ("jg", "coco_pope_random.json", "images"))
    cli_out, lib_out = str(tmp_path / "cli"), str(tmp_path / "lib")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxground.evaluate", "--workdir", jg, "--task", "pope",
         "--data", data, "--images", images, "--out", cli_out], cwd=REPO, capture_output=True,
        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    settings = runner.settings_for(jg)
    results = runner.run_task(jg, "pope", data, settings, images=images, out=lib_out)
    timing = ("seconds", "tokens_per_s")
    from_cli, from_lib = (json.loads(_read(d, runner.RESULTS_FILE)) for d in (cli_out, lib_out))
    assert ({k: v for k, v in from_lib.items() if k not in timing}
            == {k: v for k, v in from_cli.items() if k not in timing})
    for name in (runner.SAMPLES_FILE, runner.ANSWERS_FILE):
        assert _read(lib_out, name) == _read(cli_out, name)
    # What was run: LLaVA-1.5's protocol, scored by LLaVA's POPE parser.
    assert results["protocol"]["name"] == "llava_1_5" and results["samples"] == 5
    assert results["decode"]["max_new_tokens"] == 128
    samples = [json.loads(line) for line in _read(lib_out, runner.SAMPLES_FILE).splitlines()]
    expected = pope.score_splits(
        [{"question_id": s["question_id"], "label": s["label"], "category": s["split"]}
         for s in samples], [{"question_id": s["question_id"], "text": s["text"]}
                             for s in samples], parser="llava")
    assert from_lib["metrics"] == json.loads(json.dumps(runner._finite(expected)))
    assert proc.stdout.splitlines()[-1] == report.task_summary(from_cli)
