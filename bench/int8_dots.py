"""One decode-step dot with weight-only int8 (per-channel) weights: [M, K] @ [K, N] for M = 1
(batch-1 decoding), in the formulations XLA:CPU offers, against the fp32 dot and the
measured streaming-read bandwidth.

    .venv/bin/python bench/int8_dots.py                  # K=512, N=1376 (the mid MLP)
    .venv/bin/python bench/int8_dots.py --k 4096 --n 11008 --weights 4

An int8 decode step can only beat fp32 if its dots read the 1-byte codes and never write a
dequantized copy to memory. Each timed call runs the dot against --weights different weights
(together larger than the caches). Reported: microseconds per dot, GB/s of the bytes the
formulation *must* read (codes + scales; fp32: the kernel) as a share of the read bandwidth,
and the speedup over the fp32 dot. Results: bench/out/int8_dots.json.
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
from jaxground.models.quant import dequantize, quantize  # noqa: E402

OUT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "int8_dots.json")
F32, BF16 = jnp.float32, jnp.bfloat16
DN = (((1,), (0,)), ((), ()))


def w8a8(x, q, s):
    """Activations quantized per row too (absmax), int8 x int8 -> int32 dot, rescaled."""
    sx = jnp.maximum(jnp.max(jnp.abs(x), axis=1, keepdims=True), 1e-12) / 127.0
    xq = jnp.clip(jnp.round(x / sx), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot_general(xq, q, DN, preferred_element_type=jnp.int32)
    return acc.astype(F32) * sx * s[0]


# name -> fn(x [M, K] f32, codes [K, N] int8, scale [1, N] f32) -> [M, N] f32
FORMULATIONS = {
    "library: dequantize, then dot": lambda x, q, s: ops.dot_general(
        x, dequantize(q, s, "int8", F32), DN),
    "dot(x, f32(q)) * scale": lambda x, q, s: jax.lax.dot_general(x, q.astype(F32), DN) * s[0],
    "dequantize to bf16, bf16 dot (M padded)": lambda x, q, s: ops.dot_general(
        x.astype(BF16), dequantize(q, s, "int8", BF16), DN, preferred_element_type=F32),
    "int8 x int8 -> int32 dot (W8A8)": w8a8,
    "multiply + reduce over K": lambda x, q, s: jnp.sum(
        x[:, :, None] * q[None].astype(F32), axis=1) * s[0],
}
# "[N,K]": the codes transposed (reduce over the minor axis)
TRANSPOSED = {
    "multiply + reduce, codes [N,K]": lambda x, qt, s: jnp.sum(
        x[:, None, :] * qt[None].astype(F32), axis=-1) * s[0],
}


def time_call(run, args, repeats: int) -> float:
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def per_weight(fn, chained: bool):
    """A jitted call over every weight; `chained`: each dot's inputs tied to the previous
    dot's output (optimization_barrier), so XLA cannot schedule every dequantize first."""
    def run(x, qs, ss):
        outs, dep = [], None
        for q, s in zip(qs, ss):
            if chained and dep is not None:
                x_, _, q, s = jax.lax.optimization_barrier((x, dep, q, s))
            else:
                x_ = x
            dep = fn(x_, q, s)
            outs.append(dep)
        return outs
    return jax.jit(run)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--n", type=int, default=1376)
    p.add_argument("--rows", default="1")
    p.add_argument("--weights", type=int, default=40, help="weight matrices per timed call")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=OUT_JSON)
    args = p.parse_args(argv)

    limits = measure_limits(repeats=3)
    print(describe(limits))
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((args.k, args.n)), F32) for _ in range(args.weights)]
    quant = [quantize(w, "int8", args.k) for w in ws]
    qs, ss = [q for q, _ in quant], [s for _, s in quant]
    qts = [q.T.copy() for q in qs]
    q_bytes = qs[0].nbytes + ss[0].nbytes
    out = {"machine": {"limits": limits, "cpu": describe(limits)}, "k": args.k, "n": args.n,
           "weights": args.weights, "results": []}
    print(f"[M, {args.k}] @ int8 [{args.k}, {args.n}] (per-channel scales), {args.weights} "
          f"weights per call; read bandwidth {limits['read_gbps']} GB/s")
    for m in (int(r) for r in args.rows.split(",")):
        x = jnp.asarray(rng.standard_normal((m, args.k)), F32)
        ref = jax.jit(lambda x, ws: [ops.dot_general(x, w, DN) for w in ws])
        t_ref = time_call(ref, (x, ws), args.repeats) / args.weights
        rows = [("fp32 dot (reference)", False, t_ref, ws[0].nbytes)]
        for name, fn in {**FORMULATIONS, **TRANSPOSED}.items():
            for chained in (False, True):
                run = per_weight(fn, chained)
                t = time_call(run, (x, qts if name in TRANSPOSED else qs, ss),
                              args.repeats) / args.weights
                rows.append((name, chained, t, q_bytes))
        for name, chained, t, nbytes in rows:
            gbps = nbytes / t / 1e9
            row = {"rows": m, "formulation": name, "chained": chained, "us": round(t * 1e6, 1),
                   "gbps_of_must_read_bytes": round(gbps, 2),
                   "share_of_read_bandwidth": round(gbps / limits["read_gbps"], 3),
                   "speedup_vs_fp32": round(t_ref / t, 3)}
            out["results"].append(row)
            label = name + (", chained" if chained else "")
            print(f"M={m} {label:50s} {row['us']:8.1f} us {gbps:6.1f} GB/s "
                  f"({row['share_of_read_bandwidth']:.0%} of read) {row['speedup_vs_fp32']:5.2f}x"
                  " fp32")
    save_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
