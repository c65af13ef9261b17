"""Examples/s of the grain pipeline on the shapes world, in-process and with workers.

    .venv/bin/python bench/data_throughput.py [--images 400] [--batches 40] [--workers 0,2]

Builds a shapes world and its grounding records in a temp dir, then times `--batches`
batches (after one warm-up batch, which includes worker start-up) for each worker count.
An example is one row (a batch of G groups has 2G rows). Writes bench/out/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from jaxground.data import shapes
from jaxground.data.coco import build_records
from jaxground.data.pipeline import PipelineConfig, build_dataset
from jaxground.data.processor import Processor, clip_image_processor, load_tokenizer


def measure(world: str, records, workers: int, batches: int, groups: int) -> dict:
    tok = load_tokenizer(world)
    proc = Processor(tok, clip_image_processor(64), 64, tok.convert_tokens_to_ids("<image>"),
                     max_length=128)
    cfg = PipelineConfig(groups_per_batch=groups, max_length=128, workers=workers)
    it = iter(build_dataset(records, proc, world, cfg, 0, 1))
    t0 = time.perf_counter()
    next(it)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    rows = batches * 2 * groups
    return {"workers": workers, "examples_per_s": round(rows / dt, 1),
            "batches_per_s": round(batches / dt, 2), "first_batch_s": round(warm, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--groups", type=int, default=8, help="groups per batch (rows = 2x)")
    p.add_argument("--workers", default="0,2")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shapes.write_world(tmp, args.images, seed=0)
        records = build_records(tmp)
        results = [measure(tmp, records, int(w), args.batches, args.groups)
                   for w in args.workers.split(",")]
    print(f"{'workers':>8} {'examples/s':>11} {'batches/s':>10} {'first batch s':>14}")
    for r in results:
        print(f"{r['workers']:>8} {r['examples_per_s']:>11} {r['batches_per_s']:>10} "
              f"{r['first_batch_s']:>14}")
    os.makedirs(os.path.join(os.path.dirname(__file__), "out"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "out", "data_throughput.json"), "w") as f:
        json.dump({"config": vars(args), "cpus": os.cpu_count(), "results": results}, f,
                  indent=1)


if __name__ == "__main__":
    main()
