"""The dots of a decode step alone: [M, K] @ [K, N] for M = 1, 2, 8 rows (batch rows of one
token each), in bf16 and fp32, in every formulation XLA:CPU offers, as bytes of weight read
per second against the measured streaming-read bandwidth.

    .venv/bin/python bench/small_dots.py                 # K=512, N=1376 (the mid MLP)
    .venv/bin/python bench/small_dots.py --k 4096 --n 11008 --weights 4

A decode step reads every weight once, so its floor is the weight bytes over the read
bandwidth; this shows how near each formulation of one dot gets to it. Each timed call runs
the dot against --weights different weight matrices (together larger than the caches), so
the weights come from memory as in a real step. Results go to bench/out/small_dots.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe, measure_limits, save_json  # noqa: E402

from jaxground.models import ops  # noqa: E402

OUT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "small_dots.json")
F32 = jnp.float32


def _contract(x, w, rhs_dim: int):
    return jax.lax.dot_general(x, w, (((1,), (rhs_dim,)), ((), ())), preferred_element_type=F32)


# name -> (x [M, K], w) -> [M, N] f32; "[N,K]" variants take the weight transposed (HF's
# layout), the others [K, N] (ours).
FORMULATIONS = {
    "ops.dot_general (what the model runs)":
        (lambda x, w: ops.dot_general(x, w, (((1,), (0,)), ((), ()))), False),
    "dot, f32 accumulation": (lambda x, w: _contract(x, w, 0), False),
    "dot on [N,K], f32 accumulation": (lambda x, w: _contract(x, w, 1), True),
    "weights upcast to f32, then dot": (lambda x, w: x.astype(F32) @ w.astype(F32), False),
    "multiply + reduce over K": (lambda x, w: jnp.sum(
        x[:, :, None].astype(F32) * w[None].astype(F32), axis=1), False),
    "multiply + reduce, [N,K]": (lambda x, w: jnp.sum(
        x[:, None, :].astype(F32) * w[None].astype(F32), axis=-1), True),
}


def time_per_dot(fn, x, weights, repeats: int) -> float:
    """Median seconds of one dot, over calls that each run it against every weight."""
    run = jax.jit(lambda x, ws: [fn(x, w) for w in ws])
    jax.block_until_ready(run(x, weights))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x, weights))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / len(weights)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--n", type=int, default=1376)
    p.add_argument("--rows", default="1,2,8")
    p.add_argument("--weights", type=int, default=40, help="weight matrices per timed call")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=OUT_JSON)
    args = p.parse_args(argv)

    limits = measure_limits(repeats=3)
    print(describe(limits))
    rng = np.random.default_rng(0)
    out = {"machine": {"limits": limits, "cpu": describe(limits)}, "k": args.k, "n": args.n,
           "results": []}
    print(f"[M, {args.k}] @ [{args.k}, {args.n}], {args.weights} weights per call; GB/s = "
          f"weight bytes / time (read bandwidth {limits['read_gbps']} GB/s)")
    for dtype in ("bfloat16", "float32"):
        kn = [jnp.asarray(rng.standard_normal((args.k, args.n)), dtype)
              for _ in range(args.weights)]
        nk = [w.T.copy() for w in kn]
        for m in (int(r) for r in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((m, args.k)), dtype)
            for name, (fn, transposed) in FORMULATIONS.items():
                if dtype == "float32" and name != "ops.dot_general (what the model runs)":
                    continue  # fp32 dots take XLA's own fast paths; one line is the reference
                s = time_per_dot(fn, x, nk if transposed else kn, args.repeats)
                gbps = kn[0].nbytes / s / 1e9
                row = {"dtype": dtype, "rows": m, "formulation": name, "us": round(s * 1e6, 1),
                       "weight_gbps": round(gbps, 2),
                       "share_of_read_bandwidth": round(gbps / limits["read_gbps"], 3)}
                out["results"].append(row)
                print(f"{dtype:9s} M={m} {name:40s} {row['us']:9.1f} us {gbps:6.1f} GB/s "
                      f"({row['share_of_read_bandwidth']:.0%} of read)")
    save_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
