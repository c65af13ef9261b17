"""Train-step time of the shapes config with each pair's image encoded once vs per row.

    .venv/bin/python bench/pair_images.py [--steps 20] [--repeats 3] [--groups 8]

A training batch holds G positive/negative pairs, 2G rows that share G images. The pipeline
now stores each image once ([G, C, H, W]) and the model repeats its features for the two
rows (`rows_per_image=2`); before, every row carried its own copy ([2G, C, H, W]) and CLIP
encoded each image twice. Both variants run here, on the same batches, in one process,
alternating `--repeats` times; the first step's losses are checked equal. Prints the CPU
model and writes bench/out/pair_images.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from jaxground.data import shapes
from jaxground.data.coco import build_records
from jaxground.data.pipeline import PipelineConfig, build_dataset
from jaxground.data.processor import load_tokenizer, make_processor
from jaxground.models.config import PRESETS
from jaxground.models.llava import init_model
from jaxground.config import shapes_config
from jaxground.training.losses import LossConfig
from jaxground.training.optim import make_optimizer, trainable_filter
from jaxground.training.step import BATCH_KEYS, init_state, make_step_fn
from machine import cpu_model  # bench/machine.py (this script's folder is on sys.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--groups", type=int, default=8, help="pairs per batch (the config's)")
    p.add_argument("--images", type=int, default=200, help="shapes world size")
    args = p.parse_args()

    cfg = shapes_config()
    with tempfile.TemporaryDirectory() as world:
        run(args, cfg, world)


def run(args, cfg, world: str) -> None:
    """Everything, while the world's directory exists (the pipeline prefetches)."""
    shapes.write_world(world, args.images, seed=0)
    tokenizer = load_tokenizer(world)
    config = PRESETS["shapes"](len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    processor = make_processor(tokenizer, config, cfg.data)
    records = build_records(world, attributes=True)
    it = iter(build_dataset(records, processor, world, PipelineConfig(
        groups_per_batch=args.groups, max_length=cfg.data.max_length), 0, 1))
    batches = [{k: next(it)[k] for k in BATCH_KEYS} for _ in range(args.steps)]

    tx, schedule = make_optimizer(cfg.train)
    graphdef, state0 = init_state(init_model(config, seed=0), trainable_filter(".*"), tx, 0)
    step = jax.jit(make_step_fn(graphdef, tx, LossConfig(), schedule))
    variants = {
        "once": batches,
        "per_row": [{**b, "pixel_values": np.repeat(b["pixel_values"], 2, axis=0)}
                    for b in batches],
    }
    first = {}
    for name, bs in variants.items():  # compile, and the same first-step loss
        _, m = step(state0, bs[0])
        first[name] = float(m["loss"])
    assert abs(first["once"] - first["per_row"]) <= 1e-5 * abs(first["once"]), first
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, bs in variants.items():
            state = state0
            jax.block_until_ready(step(state, bs[0]))  # warm
            t0 = time.perf_counter()
            for b in bs:
                state, m = step(state, b)
            jax.block_until_ready(m["loss"])
            times[name].append((time.perf_counter() - t0) / len(bs) * 1e3)
    result = {"cpu": cpu_model(), "devices": str(jax.devices()[0].platform),
              "groups": args.groups, "rows": 2 * args.groups, "steps": args.steps,
              "first_loss": first,
              "ms_per_step": {k: round(statistics.median(v), 1) for k, v in times.items()}}
    result["speedup"] = round(result["ms_per_step"]["per_row"] / result["ms_per_step"]["once"],
                              3)
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.join(os.path.dirname(__file__), "out"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "out", "pair_images.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
