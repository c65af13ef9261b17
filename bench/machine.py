"""What machine a bench ran on, and what it can do: every result names its CPU (ratios differ
by family) and is also given as a fraction of the limits measured in the same run."""

from __future__ import annotations

import time

FEATURES = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx2", "fma")


def cpu_info() -> tuple[str, list[str]]:
    """(CPU model, the SIMD features that decide our ratios: avx512, bf16, amx, avx2)."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [x for x in FEATURES if x in flags]


def cpu_model() -> str:
    return cpu_info()[0]


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, first touch of the pages)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _read_seconds(count: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp
    big = jnp.ones((count,), jnp.float32)
    total = jax.jit(lambda a: jnp.sum(a))
    return _best_seconds(lambda: total(big).block_until_ready(), repeats)


def _copy_seconds(count: int, repeats: int) -> float:
    import numpy as np
    src, dst = np.ones(count, np.float32), np.empty(count, np.float32)
    return _best_seconds(lambda: np.copyto(dst, src), repeats)


def measure_limits(repeats: int = 5, gib: float = 1.0, n: int = 2048) -> dict:
    """The machine's limits as this process sees them (its threads, its affinity):
    - `read_gbps`: a streaming read (XLA sum over `gib` GiB of fp32, all threads): what a
      memory-bound decode step can at best draw, so the floor of a step is bytes / this;
    - `copy_gbps`: a streaming copy (numpy, one thread; bytes read + written);
    - `fp32_gflops` / `bf16_gflops`: an [n, n] @ [n, n] matmul through XLA (bf16 inputs,
      fp32 accumulation: the path jaxground's models take).
    Best of `repeats`."""
    import jax
    import jax.numpy as jnp

    count = int(gib * 2**30) // 4
    out = {"read_gbps": round(count * 4 / _read_seconds(count, repeats) / 1e9, 1),
           "copy_gbps": round(2 * count * 4 / _copy_seconds(count, repeats) / 1e9, 1)}
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    for dtype in ("float32", "bfloat16"):
        a = jnp.ones((n, n), dtype)
        s = _best_seconds(lambda: matmul(a, a).block_until_ready(), repeats)
        out[f"{dtype.replace('float', 'fp').replace('bfp', 'bf')}_gflops"] = round(
            2 * n**3 / s / 1e9, 1)
    return out


def describe(limits: dict | None = None) -> str:
    """One line: CPU, its features, and the measured limits."""
    model, features = cpu_info()
    line = f"CPU: {model} [{' '.join(features) or 'no avx512/avx2 flags'}]"
    if limits:
        line += (f"; measured: read {limits['read_gbps']} GB/s, copy {limits['copy_gbps']} GB/s"
                 f", matmul fp32 {limits['fp32_gflops']} / bf16 {limits['bf16_gflops']} "
                 "GFLOP/s")
    return line


def decode_step_bytes(model, batch: int, positions: float) -> float:
    """What one decode step of `model` must read: every decoder weight but the embedding
    table (of which it reads B rows), the heads, the lm_head, and the KV cache of `positions`
    positions per row. Over `read_gbps` it is the floor of a step."""
    import jax
    import numpy as np
    from flax import nnx

    lm = model.language_model
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(lm, nnx.Param)))
    weights -= lm.embed_tokens.embedding[...].nbytes
    if not model.config.tie_word_embeddings:
        weights += model.lm_head.kernel[...].nbytes
    t = model.config.text
    itemsize = np.dtype(model.config.dtype).itemsize
    return weights + 2 * t.num_layers * batch * t.num_kv_heads * t.head_dim * positions * itemsize


def save_json(path: str, results: dict) -> None:
    """Writes a bench's results (the folder made as needed) and says where."""
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
