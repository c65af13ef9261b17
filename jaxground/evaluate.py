"""Evaluate a checkpoint for hallucination.

  python -m jaxground.evaluate --workdir DIR --task pope|chair|mme|grounding --data PATH \
      [--config configs/X.py] [--step N] [--images DIR] [--out DIR] \
      [--config.eval.guided=True --config.eval.batch_size=16 ...]

DIR is a training workdir (its latest checkpoint, or --step) or a converted checkpoint dir.
The config defaults to the one the workdir was trained with; a converted checkpoint without
--config is evaluated under the `llava_1_5` protocol (LLaVA-1.5's own prompts, image padding
and decoding: jaxground.eval.protocols). The config's `eval` section names the protocol and
says how to decode, its `mesh` how to shard the model; the protocol applied is printed.
--data: pope - official POPE .json(l) files (comma-separated or a folder; images under
--images) or a COCO-format folder (questions built from it); chair / grounding - a
COCO-format folder (a caption is generated per image); grounding also takes a .jsonl of
caption records (given positive and hallucinated captions, scored teacher forced; images
under --images); mme - the MME benchmark folder.

Writes OUT (default DIR/eval/<task>, DIR/eval/<task>-guided with eval.guided) with
samples.jsonl (per-sample outputs), results.json and report.md; grounding also writes
heatmaps/<image>/index.html. --rescore recomputes results from samples.jsonl alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxground.data.objects import token_ids, vocabulary_for
from jaxground.utils.jsonl import read_jsonl, write_jsonl
from jaxground.data.processor import (TOKENIZER_FILES, Processor, clip_image_processor,
                                      load_tokenizer)
from jaxground.eval import protocols, report, tasks
from jaxground.inference.batching import DecodeSettings, generate_all, score_all
from jaxground.checkpoints import restore_model
from jaxground.checkpoints.converted import read_config
from jaxground.checkpoints.workdir import (TRAIN_CONFIG_FILE, init_from_of, is_workdir,
                                          latest_step)
from jaxground.parallel import sharding
from jaxground.training.config import default_config, validate_eval, with_eval_defaults

log = logging.getLogger("jaxground.evaluate")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags; defined only when run as a program, so that importing this module
    next to `jaxground.train` (whose --config flag has the same name) works."""
    config_flags.DEFINE_config_file("config", None, "Config file (default: the one the "
                                    "workdir was trained with).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Training workdir or converted checkpoint.")
    flags.DEFINE_enum("task", None, list(tasks.TASKS), "What to evaluate.")
    flags.DEFINE_string("data", None, "Benchmark data (see the module docstring).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("images", None, "Image folder for POPE question files.")
    flags.DEFINE_string("out", None, "Output folder (default WORKDIR/eval/<task>).")
    flags.DEFINE_bool("rescore", False, "Re-score OUT/samples.jsonl; no model.")


SAMPLES_FILE, RESULTS_FILE, REPORT_FILE = "samples.jsonl", "results.json", "report.md"
ANSWERS_FILE = "answers.jsonl"  # pope / mme: {"question_id", "prompt", "text"}, LLaVA's format


# ---- config, model, processor --------------------------------------------------------------
def resolve_config(workdir: str, given) -> ml_collections.ConfigDict:
    """The given config, else the workdir's training config, else (a converted checkpoint)
    the defaults under the `llava_1_5` protocol; every eval field present (configs written
    before a field existed get its default)."""
    saved = os.path.join(workdir, TRAIN_CONFIG_FILE)
    if given is not None:
        cfg = given
    elif os.path.exists(saved):
        with open(saved) as f:
            cfg = ml_collections.ConfigDict(json.load(f))
    else:  # a converted LLaVA checkpoint: evaluate it the way its authors did
        cfg = default_config()
        cfg.eval.protocol = "llava_1_5"
    cfg = with_eval_defaults(cfg)
    validate_eval(cfg.eval)
    protocols.resolve(cfg)  # an unknown protocol or parser fails here, naming the field
    return cfg


def load_model(workdir: str, cfg, step: int | None):
    """The model placed on the config's mesh (parameters sharded by the logical-axis
    table; activations follow the parameters), in `eval.dtype` when set."""
    mesh = sharding.make_mesh(dict(cfg.mesh))
    return restore_model(workdir, dtype=cfg.eval.dtype or None, step=step, mesh=mesh), mesh


def load_eval_processor(workdir: str, cfg, config, protocol: protocols.Protocol) -> Processor:
    """The processor of the evaluation protocol: its prompt template and image handling,
    not necessarily the training data's."""
    source = workdir
    if not any(os.path.exists(os.path.join(workdir, n)) for n in TOKENIZER_FILES):
        # Fine-tunes keep the base's tokenizer.
        source = init_from_of(workdir) or cfg.model.get("init_from") or workdir
    return Processor(load_tokenizer(source),
                     clip_image_processor(config.vision.image_size, source),
                     config.image_seq_length, config.image_token_id, protocol.template,
                     protocol.pad_to_square,
                     max_length=1 << 20)  # evaluation never truncates a prompt


def decode_settings(e, protocol: protocols.Protocol, task: str) -> DecodeSettings:
    short = task in ("pope", "mme")
    tokens = ((protocol.mme_answer_tokens if task == "mme" else protocol.answer_tokens)
              if short else protocol.caption_tokens)
    return DecodeSettings(max_new_tokens=tokens,
                          temperature=e.temperature, top_p=e.top_p, seed=e.seed,
                          guidance=e.guidance if e.guided and not short else None,
                          guidance_top_k=e.guidance_top_k, guidance_score=e.guidance_score,
                          flag_threshold=e.flag_threshold,
                          contrast=e.contrast or None, contrast_alpha=e.contrast_alpha,
                          contrast_beta=e.contrast_beta,
                          contrast_noise_step=e.contrast_noise_step)


def task_data(task: str, data: str, cfg, protocol: protocols.Protocol, images: str | None,
              out: str) -> tasks.TaskData:
    e = cfg.eval
    split = e.split or None
    suffix = protocol.short_answer_suffix
    if task == "pope":
        return tasks.pope_data(data, images, e.limit, e.seed, split, suffix)
    if task == "mme":
        return tasks.mme_data(data, e.limit)
    if task == "grounding" and os.path.isfile(data):
        return tasks.given_caption_data(data, protocol.caption_prompt, images, e.limit)
    if task == "chair":
        ids = tasks.chair_image_ids(data, split, e.image_ids or None, e.chair_images, e.seed,
                                    os.path.join(out, tasks.IMAGE_IDS_FILE))
        return tasks.caption_data(data, protocol.caption_prompt, e.limit, split, ids)
    return tasks.caption_data(data, protocol.caption_prompt, e.limit, split)


# ---- running ------------------------------------------------------------------------------
def run_samples(model, processor: Processor, data: tasks.TaskData, cfg, data_path: str,
                settings: DecodeSettings) -> tuple[list[dict], dict]:
    """Generates every prompt in batches with a progress bar; returns (samples, stats)."""
    from tqdm import tqdm

    e = cfg.eval
    given = bool(data.prompts) and data.prompts[0].answer is not None
    objects = guidance_tokens = None
    if not data.short_answers and not given:
        from jaxground.data.coco import load_coco

        vocab = vocabulary_for(load_coco(data_path, e.split or None).categories)
        objects = token_ids(processor.tokenizer, vocab)
        if settings.guidance is not None and e.guidance_objects_only:
            # Attribute words carry trained scores when the model was taught them.
            guidance_tokens = token_ids(processor.tokenizer, vocab,
                                        attributes=cfg.data.get("label_attributes", False))
    samples, new_tokens = [], 0
    t0 = time.perf_counter()
    with tqdm(total=len(data.prompts), desc="evaluate", dynamic_ncols=True,
              disable=not sys.stderr.isatty() and "JAXGROUND_PROGRESS" not in os.environ) as bar:
        results = (score_all(model, processor, data.prompts, e.batch_size,
                             progress=bar.update) if given else
                   generate_all(model, processor, data.prompts, settings, e.batch_size,
                                guidance_tokens=guidance_tokens, flag_tokens=objects,
                                progress=bar.update))
        for result in results:
            key = result.pop("key")
            sample = {**data.records[key], **result}
            if "error" not in result:
                sample["text"] = processor.tokenizer.decode(
                    result["token_ids"], skip_special_tokens=True).strip()
                new_tokens += len(result["token_ids"])
            samples.append(sample)
    seconds = time.perf_counter() - t0
    if given:
        return samples, {"seconds": seconds, "teacher_forced": True}
    return samples, {"seconds": seconds, "new_tokens": new_tokens,
                     "tokens_per_s": new_tokens / seconds if seconds else float("nan"),
                     "decode": settings.__dict__}


def score_samples(task: str, samples: list[dict], data: str, cfg,
                  protocol: protocols.Protocol, tokenizer) -> dict:
    e = cfg.eval
    if task == "pope":
        return tasks.score_pope(samples, protocol.pope_parser)
    if task == "mme":
        return tasks.score_mme(samples, protocol.mme_parser)
    if task == "chair":
        return tasks.score_chair(samples, data, e.split or None, e.chair_matcher)
    return tasks.score_grounding(samples, tokenizer, data, e.split or None, e.flag_threshold)


def output_dir(workdir: str, task: str, data: str, cfg) -> str:
    """WORKDIR/eval/<task>, with "-guided" when captions are generated with guidance and
    "-vcd" with visual contrastive decoding."""
    guided = cfg.eval.guided and task in ("chair", "grounding") and os.path.isdir(data)
    contrast = cfg.eval.get("contrast", "")
    return os.path.join(workdir, "eval", task + ("-guided" if guided else "")
                        + (f"-{contrast}" if contrast else ""))


def evaluate(workdir: str, task: str, data: str, cfg=None, step: int | None = None,
             images: str | None = None, out: str | None = None, rescore: bool = False) -> dict:
    """Runs (or, with `rescore`, re-scores) one task; returns the results written to
    OUT/results.json."""
    if task not in tasks.TASKS:
        raise ValueError(f"task {task!r} is not one of {list(tasks.TASKS)}")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir {workdir} does not exist")
    if not os.path.exists(data):
        raise FileNotFoundError(f"--data {data} does not exist")
    cfg = resolve_config(workdir, cfg)
    protocol = protocols.resolve(cfg)
    log.info("protocol %s", protocol.describe())
    out = out or output_dir(workdir, task, data, cfg)
    os.makedirs(out, exist_ok=True)
    config = read_config(workdir)
    processor = load_eval_processor(workdir, cfg, config, protocol)
    samples_path = os.path.join(out, SAMPLES_FILE)
    if rescore:
        if not os.path.exists(samples_path):
            raise FileNotFoundError(f"{samples_path} is missing: run the evaluation once "
                                    "without --rescore")
        samples, stats = read_jsonl(samples_path), _kept_stats(out)
    else:
        task_inputs = task_data(task, data, cfg, protocol, images, out)
        model, mesh = load_model(workdir, cfg, step)
        with jax.set_mesh(mesh):
            samples, stats = run_samples(model, processor, task_inputs, cfg, data,
                                         decode_settings(cfg.eval, protocol, task))
        write_jsonl(samples, samples_path)
        if task in ("pope", "mme"):  # LLaVA's answer-file format, for its scripts too
            write_jsonl(tasks.llava_answers(task, samples), os.path.join(out, ANSWERS_FILE))
    metrics = score_samples(task, samples, data, cfg, protocol, processor.tokenizer)
    step = stats.pop("step", step)
    results = {"task": task, "checkpoint": os.path.abspath(workdir),
               "step": step if step is not None else _latest_step(workdir),
               "protocol": dataclasses.asdict(protocol), "dtype": cfg.eval.dtype or None,
               "data": os.path.abspath(data), "samples": len(samples),
               "failed": sum("error" in s for s in samples), **stats, "metrics": metrics}
    heads = bool(config.grounded_layers)
    if task == "grounding" and os.path.isdir(data) and heads and not rescore \
            and cfg.eval.heatmaps:
        results["heatmaps"], results["heatmap_examples"] = report.heatmap_pages(
            model, processor, samples, data, cfg, out)
    with open(os.path.join(out, RESULTS_FILE), "w") as f:
        json.dump(_finite(results), f, indent=1)
    with open(os.path.join(out, REPORT_FILE), "w") as f:
        f.write(report.task_markdown(results))
    return results


def _kept_stats(out: str) -> dict:
    """What a re-scored run keeps from the run that generated its samples."""
    path = os.path.join(out, RESULTS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    keep = ("step", "seconds", "new_tokens", "tokens_per_s", "decode", "teacher_forced",
            "heatmaps", "heatmap_examples")
    return {k: old[k] for k in keep if k in old}


def _latest_step(workdir: str) -> int | None:
    return latest_step(workdir) if is_workdir(workdir) else None


def _finite(x):
    """NaN -> None, numpy scalars -> Python: strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    f = FLAGS
    if not f.workdir or not f.task or not f.data:
        raise app.UsageError("--workdir, --task and --data are required")
    results = evaluate(f.workdir, f.task, f.data, f.config, f.step, f.images, f.out, f.rescore)
    print(f"protocol {protocols.Protocol(**results['protocol']).describe()}")
    print(report.task_summary(results))


if __name__ == "__main__":
    from jaxground import cli

    cli.run(main, define_flags)
