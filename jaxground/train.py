"""Train LLaVA with grounding heads.

  python -m jaxground.train --config configs/shapes.py --workdir runs/shapes \
      [--config.train.steps=200 --config.mesh.fsdp=2 ...]

Flags -> ConfigDict -> `RunConfig` (typed and checked once, the eval section too, so a
typo there fails now rather than after training) -> the trainer
(jaxground.training.trainer.train). Resumes from the latest checkpoint in WORKDIR;
SIGTERM/SIGINT save a checkpoint at the current step first. Logs to WORKDIR/metrics.jsonl
and TensorBoard event files in WORKDIR/tb; prints the last step's metrics as one JSON line.
"""

from __future__ import annotations

import json
import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxground.config import RunConfig
from jaxground.training import trainer

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when run as a program (see `jaxground.evaluate.define_flags`)."""
    config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).")


def train(cfg, workdir: str) -> dict:
    """Trains the run a ConfigDict describes (see `trainer.train` for the result)."""
    return trainer.train(RunConfig.from_config_dict(cfg).train, workdir)


def main(argv) -> None:
    del argv
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger = logging.getLogger("jaxground")  # every module logs under it
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if FLAGS.config is None or not FLAGS.workdir:
        raise app.UsageError("--config and --workdir are required")
    result = train(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, bool)}))


if __name__ == "__main__":
    from jaxground import cli

    cli.run(main, define_flags)
