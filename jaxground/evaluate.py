"""Evaluate a checkpoint for hallucination.

  python -m jaxground.evaluate --workdir DIR --task pope|chair|mme|grounding --data PATH \
      [--config configs/X.py] [--step N] [--images DIR] [--out DIR] \
      [--merge] [--config.eval.guided=True --config.eval.batch_size=16 ...]

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
--merge evaluates a LoRA run with its adapters folded into the weights at load (else they
are applied as they are: the same numbers up to float rounding, without quantization).

Flags -> config -> `jaxground.eval.settings.EvalSettings` -> `jaxground.eval.runner.run_task`
(the library, for programs that evaluate).
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from jaxground.eval import protocols, report, runner, tasks

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
    flags.DEFINE_bool("merge", False, "Fold a LoRA run's adapters into its weights at load.")


def evaluate(workdir: str, task: str, data: str, cfg=None, step: int | None = None,
             images: str | None = None, out: str | None = None, rescore: bool = False,
             merge: bool = False) -> dict:
    """`jaxground.eval.runner.run_task` under the settings of `cfg` (a run's config), else
    of the config the workdir was trained with, else LLaVA-1.5's protocol; returns the
    results written to OUT/results.json. `merge`: fold a LoRA run's adapters in at load."""
    return runner.run_task(workdir, task, data, runner.settings_for(workdir, cfg), step=step,
                           images=images, out=out, rescore=rescore, merge=merge)


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    f = FLAGS
    if not f.workdir or not f.task or not f.data:
        raise app.UsageError("--workdir, --task and --data are required")
    for flag, path in (("--workdir", f.workdir), ("--data", f.data)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path} does not exist")
    results = evaluate(f.workdir, f.task, f.data, f.config, f.step, f.images, f.out, f.rescore,
                       f.merge)
    print(f"protocol {protocols.Protocol(**results['protocol']).describe()}")
    print(report.task_summary(results))


if __name__ == "__main__":
    from jaxground import cli

    cli.run(main, define_flags)
