"""A real-size llava-1.5-7b in bf16 on this machine: one forward (one image + 24 text tokens)
and greedy decoding, with time and peak RSS.

    .venv/bin/python bench/forward_7b.py                    # random bf16 weights, in memory
    .venv/bin/python bench/forward_7b.py --checkpoint DIR   # a converted dir or workdir
    .venv/bin/python bench/forward_7b.py --new-tokens 8 --preset llava-1.5-13b

Random weights are made in bf16, one layer of one weight at a time (13.2 GiB of bf16
parameters and little else). Before jaxground/models/ops.py, the first forward of a
converted llava-1.5-7b in bf16 failed on a 24 GiB machine with "Out of memory allocating
27787132760 bytes" (an fp32 copy of every weight). Prints XLA's memory analysis of each
program, the time of each call after the first (compilation), the decode step against the
memory floor (weights + KV cache bytes / the measured read bandwidth) and the process's
peak RSS; results go to bench/out/forward_7b.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxground
from jaxground.inference.generate import lower_generate
from jaxground.models import config as model_config
from jaxground.models.llava import LlavaModel, _forward_jit, abstract_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import (cpu_info, decode_step_bytes, describe, measure_limits,  # noqa: E402
                     save_json)  # bench/machine.py

OUT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "forward_7b.json")
GIB = 2**30


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.partial(jax.jit, donate_argnums=(0,))
def _put(stack, layer, i):
    return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)


def _random_array(key, shape, dtype):
    """N(0, 0.02) in `dtype`, a stacked [L, ...] weight one layer at a time: one compiled
    program for the whole model would hold every random bit at once (65 GB for the 7B)."""
    if len(shape) < 3:
        return _normal(key, shape, dtype)
    stack = jnp.zeros(shape, dtype)
    for i in range(shape[0]):
        stack = _put(stack, _normal(jax.random.fold_in(key, i), shape[1:], dtype), i)
    return stack


def random_model(preset: str, seed: int) -> LlavaModel:
    """The preset's model with random bf16 weights (bf16 all the way: no fp32 detour)."""
    cfg = model_config.PRESETS[preset]().replace(dtype="bfloat16", param_dtype="bfloat16")
    graphdef, abstract = nnx.split(abstract_model(cfg))
    leaves, tree = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    state = jax.tree.unflatten(tree, [_random_array(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])
    return nnx.merge(graphdef, state)


def prompt(cfg, text_tokens: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 32000, (1, text_tokens + cfg.image_seq_length)).astype(np.int32)
    ids[0, 0] = 1
    ids[0, 5:5 + cfg.image_seq_length] = cfg.image_token_id
    size = cfg.vision.image_size
    pixels = jnp.asarray(rng.standard_normal((1, 3, size, size)), jnp.bfloat16)
    return ids, pixels


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(first call s, later calls s)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    later = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        later.append(time.perf_counter() - t0)
    return first, later


def memory(lowered) -> dict:
    m = lowered.compile().memory_analysis()
    return {"arguments_gib": round(m.argument_size_in_bytes / GIB, 3),
            "temporaries_gib": round(m.temp_size_in_bytes / GIB, 3)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="a converted dir or training workdir (default: random "
                                        "weights of --preset)")
    p.add_argument("--preset", default="llava-1.5-7b", choices=sorted(model_config.PRESETS))
    p.add_argument("--text-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens (0: skip decoding)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layout", default="stacked", choices=("stacked", "unrolled"),
                   help="the decoder layout (jaxground.load's layout=)")
    p.add_argument("--out", default=OUT_JSON)
    args = p.parse_args(argv)

    limits = measure_limits(repeats=3)
    print(describe(limits))
    t0 = time.perf_counter()
    model = (jaxground.load(args.checkpoint, dtype="bfloat16", layout=args.layout)
             if args.checkpoint else random_model(args.preset, seed=0))
    if args.layout == "unrolled":
        model.language_model.unroll()  # in place: one extra stacked leaf at the peak
    params = nnx.state(model, nnx.Param)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    cfg = model.config
    out = {"machine": {"cpu": cpu_info()[0], "cpu_features": cpu_info()[1], "limits": limits},
           "model": args.checkpoint or f"{args.preset} (random bf16 weights)",
           "layout": args.layout,
           "param_gib": round(param_bytes / GIB, 3),
           "load_s": round(time.perf_counter() - t0, 1), "rss_after_load_gib": peak_rss_gib()}
    print(f"{out['model']}: {out['param_gib']} GiB of parameters, ready in {out['load_s']} s, "
          f"peak RSS {out['rss_after_load_gib']:.2f} GiB")

    ids, pixels = prompt(cfg, args.text_tokens, seed=0)
    mask = jnp.ones_like(jnp.asarray(ids))
    out["forward_memory"] = memory(_forward_jit.lower(model, jnp.asarray(ids), pixels, mask,
                                                      None))
    first, later = timed(lambda: model(ids, pixels), args.repeats)
    out["forward"] = {"tokens": int(ids.shape[1]), "first_call_s": round(first, 2),
                      "s": round(float(np.median(later)), 3)}
    out["rss_after_forward_gib"] = round(peak_rss_gib(), 2)
    print(f"forward, 1 image + {args.text_tokens} tokens ({ids.shape[1]} positions): "
          f"{out['forward']['s']:.2f} s (first call {first:.1f} s, compile included); XLA "
          f"temporaries {out['forward_memory']['temporaries_gib']:.2f} GiB; peak RSS "
          f"{out['rss_after_forward_gib']:.2f} GiB")

    if args.new_tokens:
        n = args.new_tokens
        out["generate_memory"] = memory(lower_generate(model, ids, pixels, max_new_tokens=n))
        gen = lambda k: (lambda: jaxground.generate(model, ids, pixels, max_new_tokens=k,
                                                    eos_token_id=None))
        _, one = timed(gen(1), args.repeats)
        _, full = timed(gen(n), args.repeats)
        step = (np.median(full) - np.median(one)) / (n - 1) if n > 1 else float("nan")
        floor_s = (decode_step_bytes(model, 1, ids.shape[1] + n / 2)
                   / (limits["read_gbps"] * 1e9))
        out["generate"] = {"new_tokens": n, "s": round(float(np.median(full)), 2),
                           "decode_step_s": round(float(step), 3),
                           "decode_floor_s": round(floor_s, 3),
                           "decode_vs_floor": round(float(step / floor_s), 2)}
        out["rss_after_generate_gib"] = round(peak_rss_gib(), 2)
        print(f"greedy, {n} new tokens: {out['generate']['s']:.1f} s; decode step "
              f"{step:.2f} s = {step / floor_s:.2f}x the memory floor ({floor_s:.2f} s); XLA "
              f"temporaries {out['generate_memory']['temporaries_gib']:.2f} GiB; peak RSS "
              f"{out['rss_after_generate_gib']:.2f} GiB")

    save_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
