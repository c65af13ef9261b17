"""Running one evaluation task on a checkpoint: the library behind `python -m jaxground.evaluate`.

  settings = settings_for(checkpoint)     # or EvalSettings.from_config_dict(cfg)
  results = run_task(checkpoint, "pope", data, settings, images=..., out=...)

A checkpoint is a training workdir (its latest checkpoint, or `step`) or a converted
checkpoint dir; `settings_for` gives the settings of the config it was trained with, and a
converted checkpoint without one is evaluated under the `llava_1_5` protocol (LLaVA-1.5's
own prompts, image padding and decoding: jaxground.eval.protocols).

`run_task` writes OUT (default `output_dir(...)`: CHECKPOINT/eval/<task>, "-guided" with
guided captions, "-vcd" with visual contrastive decoding) with samples.jsonl (per-sample
outputs), results.json and report.md; pope and mme also answers.jsonl (LLaVA's answer-file
format), chair the image_ids.json it captioned, grounding heatmaps/<image>/index.html. With
`rescore` it recomputes results from OUT/samples.jsonl alone (no model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import jax
import numpy as np

from jaxground.checkpoints import restore_model
from jaxground.checkpoints.converted import read_config
from jaxground.checkpoints.workdir import (is_workdir, latest_step,
                                          read_train_config, tokenizer_source)
from jaxground.data.objects import token_ids, vocabulary_for
from jaxground.data.processor import (TOKENIZER_FILES, Processor, clip_image_processor,
                                      load_tokenizer)
from jaxground.eval import report, tasks
from jaxground.eval.settings import EvalSettings
from jaxground.inference.batching import DecodeSettings, generate_all, score_all
from jaxground.parallel import sharding
from jaxground.utils.jsonl import read_jsonl, write_jsonl

log = logging.getLogger(__name__)

SAMPLES_FILE, RESULTS_FILE, REPORT_FILE = "samples.jsonl", "results.json", "report.md"
ANSWERS_FILE = "answers.jsonl"  # pope / mme: {"question_id", "prompt", "text"}, LLaVA's format


# ---- settings, model, processor ------------------------------------------------------------
def settings_for(checkpoint: str, given_cfg=None) -> EvalSettings:
    """The settings of `given_cfg` (EvalSettings, a run's ConfigDict or its dict), else of
    the config the checkpoint's workdir was trained with (train_config.json), else (a
    converted checkpoint) the defaults under the `llava_1_5` protocol."""
    if isinstance(given_cfg, EvalSettings):
        return given_cfg
    if given_cfg is not None:
        return EvalSettings.from_config_dict(given_cfg)
    saved = read_train_config(checkpoint)
    if saved is not None:
        return EvalSettings.from_config_dict(saved)
    # A converted LLaVA checkpoint: evaluate it the way its authors did.
    return EvalSettings(protocol="llava_1_5")


def load_model(checkpoint: str, settings: EvalSettings, step: int | None,
               merge: bool = False):
    """The model placed on the settings' mesh (parameters sharded by the logical-axis
    table; activations follow the parameters), in `dtype` when set; and the mesh. The
    decoder is unrolled (`decode_layout`): evaluation is mostly decoding, whose steps then
    read each layer's weights in place (mid config, batch 8: 28 -> 18 ms a step; see the
    README). `merge`
    folds a LoRA run's adapters into its weights (else they are applied as they are)."""
    mesh = sharding.make_mesh(dict(settings.mesh))
    config = read_config(checkpoint)
    if settings.quant:  # quantized at load, whatever the checkpoint holds
        config = config.replace(quant=dataclasses.replace(config.quant, mode=settings.quant))
    return restore_model(checkpoint, config=config, dtype=settings.dtype or None, step=step,
                         mesh=mesh, layout=decode_layout(config), merge_adapters=merge), mesh


def decode_layout(config) -> str:
    """"unrolled" (decode steps read each layer's weights in place), except for a quantized
    model: unrolled, XLA hoists every dequantized kernel out of the decode loop (a 7B int8
    generate program: 13.0 GiB of 16-bit copies beside 7.1 GiB of codes), which undoes
    what quantizing was for; stacked, each layer is dequantized inside the loop (0.72 GiB;
    tests/test_bf16.py)."""
    return "stacked" if config.quant.enabled else "unrolled"


def load_eval_processor(checkpoint: str, settings: EvalSettings, config) -> Processor:
    """The processor of the evaluation protocol: its prompt template and image handling,
    not necessarily the training data's."""
    protocol = settings.resolved_protocol
    source = tokenizer_source(checkpoint)  # fine-tunes keep their base's tokenizer
    if not any(os.path.exists(os.path.join(source, n)) for n in TOKENIZER_FILES):
        source = settings.init_from or checkpoint
    return Processor(load_tokenizer(source),
                     clip_image_processor(config.vision.image_size, source),
                     config.image_seq_length, config.image_token_id, protocol.template,
                     protocol.pad_to_square,
                     max_length=1 << 20)  # evaluation never truncates a prompt


def decode_settings(settings: EvalSettings, task: str) -> DecodeSettings:
    """How `task`'s answers are decoded: the protocol's lengths, guidance on captions only."""
    s, protocol = settings, settings.resolved_protocol
    short = task in ("pope", "mme")
    tokens = ((protocol.mme_answer_tokens if task == "mme" else protocol.answer_tokens)
              if short else protocol.caption_tokens)
    return DecodeSettings(max_new_tokens=tokens,
                          temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                          guidance=s.guidance if s.guided and not short else None,
                          guidance_top_k=s.guidance_top_k, guidance_score=s.guidance_score,
                          flag_threshold=s.flag_threshold,
                          contrast=s.contrast or None, contrast_alpha=s.contrast_alpha,
                          contrast_beta=s.contrast_beta,
                          contrast_noise_step=s.contrast_noise_step)


def task_data(task: str, data: str, settings: EvalSettings, images: str | None,
              out: str) -> tasks.TaskData:
    s, protocol = settings, settings.resolved_protocol
    split = s.split or None
    if task == "pope":
        return tasks.pope_data(data, images, s.limit, s.seed, split,
                               protocol.short_answer_suffix)
    if task == "mme":
        return tasks.mme_data(data, s.limit)
    if task == "grounding" and os.path.isfile(data):
        return tasks.given_caption_data(data, protocol.caption_prompt, images, s.limit)
    if task == "chair":
        ids = tasks.chair_image_ids(data, split, s.image_ids or None, s.chair_images, s.seed,
                                    os.path.join(out, tasks.IMAGE_IDS_FILE))
        return tasks.caption_data(data, protocol.caption_prompt, s.limit, split, ids)
    return tasks.caption_data(data, protocol.caption_prompt, s.limit, split)


# ---- running ------------------------------------------------------------------------------
def run_samples(model, processor: Processor, data: tasks.TaskData, settings: EvalSettings,
                data_path: str, decode: DecodeSettings) -> tuple[list[dict], dict]:
    """Generates every prompt in batches with a progress bar; returns (samples, stats)."""
    from tqdm import tqdm

    s = settings
    given = bool(data.prompts) and data.prompts[0].answer is not None
    objects = guidance_tokens = None
    if not data.short_answers and not given:
        from jaxground.data.coco import load_coco

        vocab = vocabulary_for(load_coco(data_path, s.split or None).categories)
        objects = token_ids(processor.tokenizer, vocab)
        if decode.guidance is not None and s.guidance_objects_only:
            # Attribute words carry trained scores when the model was taught them.
            guidance_tokens = token_ids(processor.tokenizer, vocab,
                                        attributes=s.label_attributes)
    samples, new_tokens = [], 0
    t0 = time.perf_counter()
    with tqdm(total=len(data.prompts), desc="evaluate", dynamic_ncols=True,
              disable=not sys.stderr.isatty() and "JAXGROUND_PROGRESS" not in os.environ) as bar:
        results = (score_all(model, processor, data.prompts, s.batch_size,
                             progress=bar.update) if given else
                   generate_all(model, processor, data.prompts, decode, s.batch_size,
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
                     "decode": decode.__dict__}


def score_samples(task: str, samples: list[dict], data: str, settings: EvalSettings,
                  tokenizer) -> dict:
    s, protocol = settings, settings.resolved_protocol
    if task == "pope":
        return tasks.score_pope(samples, protocol.pope_parser)
    if task == "mme":
        return tasks.score_mme(samples, protocol.mme_parser)
    if task == "chair":
        return tasks.score_chair(samples, data, s.split or None, s.chair_matcher)
    return tasks.score_grounding(samples, tokenizer, data, s.split or None, s.flag_threshold)


def output_dir(checkpoint: str, task: str, data: str, settings: EvalSettings) -> str:
    """CHECKPOINT/eval/<task>, with "-guided" when captions are generated with guidance and
    "-vcd" with visual contrastive decoding."""
    guided = settings.guided and task in ("chair", "grounding") and os.path.isdir(data)
    contrast = settings.contrast
    return os.path.join(checkpoint, "eval", task + ("-guided" if guided else "")
                        + (f"-{contrast}" if contrast else "")
                        + (f"-{settings.quant}" if settings.quant else ""))


def run_task(checkpoint: str, task: str, data: str, settings: EvalSettings, *,
             step: int | None = None, images: str | None = None, out: str | None = None,
             rescore: bool = False, merge: bool = False) -> dict:
    """Runs (or, with `rescore`, re-scores) one task; returns the results written to
    OUT/results.json. `merge`: a LoRA run's adapters are folded into its weights at load."""
    if task not in tasks.TASKS:
        raise ValueError(f"task {task!r} is not one of {list(tasks.TASKS)}")
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if not os.path.exists(data):
        raise FileNotFoundError(f"data {data} does not exist")
    protocol = settings.resolved_protocol
    log.info("protocol %s", protocol.describe())
    out = out or output_dir(checkpoint, task, data, settings)
    os.makedirs(out, exist_ok=True)
    config = read_config(checkpoint)
    processor = load_eval_processor(checkpoint, settings, config)
    samples_path = os.path.join(out, SAMPLES_FILE)
    if rescore:
        if not os.path.exists(samples_path):
            raise FileNotFoundError(f"{samples_path} is missing: run the evaluation once "
                                    "without --rescore")
        samples, stats = read_jsonl(samples_path), _kept_stats(out)
    else:
        task_inputs = task_data(task, data, settings, images, out)
        model, mesh = load_model(checkpoint, settings, step, merge)
        with jax.set_mesh(mesh):
            samples, stats = run_samples(model, processor, task_inputs, settings, data,
                                         decode_settings(settings, task))
        if config.lora.enabled:
            stats["adapters"] = "merged" if merge else "applied"
        write_jsonl(samples, samples_path)
        if task in ("pope", "mme"):  # LLaVA's answer-file format, for its scripts too
            write_jsonl(tasks.llava_answers(task, samples), os.path.join(out, ANSWERS_FILE))
    metrics = score_samples(task, samples, data, settings, processor.tokenizer)
    step = stats.pop("step", step)
    results = {"task": task, "checkpoint": os.path.abspath(checkpoint),
               "step": step if step is not None else _latest_step(checkpoint),
               "protocol": dataclasses.asdict(protocol), "dtype": settings.dtype or None,
               "data": os.path.abspath(data), "samples": len(samples),
               "failed": sum("error" in s for s in samples), **stats, "metrics": metrics}
    heads = bool(config.grounded_layers)
    if task == "grounding" and os.path.isdir(data) and heads and not rescore \
            and settings.heatmaps:
        results["heatmaps"], results["heatmap_examples"] = report.heatmap_pages(
            model, processor, samples, data, settings, out)
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
            "heatmaps", "heatmap_examples", "adapters")
    return {k: old[k] for k in keep if k in old}


def _latest_step(checkpoint: str) -> int | None:
    return latest_step(checkpoint) if is_workdir(checkpoint) else None


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
