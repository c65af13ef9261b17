"""Train-step throughput of a 7B-shaped LLaVA on one GPU, with and without grounding heads.

    python bench/gpu.py                      # on a lent H100/H200
    python bench/gpu.py --smoke              # shrunken widths: checks the script on a CPU

Full LLaVA-1.5-7B width (CLIP ViT-L/14-336, 4096-wide Vicuna layers, vocab 32064) with as
many decoder layers as `--layers` (the grounded ones are the last four of those), bf16
compute with fp32 master weights, AdamW over every parameter, cuDNN flash attention,
`dots` rematerialisation. Prints step time, tokens/s and MFU = model FLOPs / (time x peak),
for the similarity heads and for no heads, in the same process. Writes
bench/out/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxground.models import init_model
from jaxground.models.config import GroundingConfig, llava_1_5_7b
from jaxground.training.losses import LossConfig
from jaxground.training.optim import make_optimizer, trainable_filter
from jaxground.training.step import init_state, make_step_fn

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per chip


def peak_tflops() -> tuple[str, float | None]:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name in kind:
            return kind, peak
    return kind, None


def model_config(args, grounded: bool):
    base = llava_1_5_7b()
    text = base.text.__class__(**{**base.text.__dict__, "num_layers": args.layers,
                                  "attention_impl": args.attention})
    vision = base.vision
    if args.smoke:  # same structure, small widths
        text = text.__class__(**{**text.__dict__, "hidden_size": 256, "intermediate_size": 512,
                                 "num_heads": 4, "num_kv_heads": 4, "head_dim": 64})
        vision = vision.__class__(**{**vision.__dict__, "hidden_size": 128,
                                     "intermediate_size": 256, "num_layers": 4,
                                     "num_heads": 4})
    grounding = GroundingConfig(type="similarity") if grounded else GroundingConfig(layers=())
    return base.replace(text=text, vision=vision, grounding=grounding, dtype="bfloat16",
                        param_dtype="float32", remat=args.remat)


def flops_per_token(cfg, seq: int) -> float:
    """6 x (LLM + projector parameters) + attention; CLIP counted per image token."""
    t, v = cfg.text, cfg.vision
    llm = t.num_layers * (2 * t.hidden_size * t.num_heads * t.head_dim
                          + 2 * t.hidden_size * t.num_kv_heads * t.head_dim
                          + 3 * t.hidden_size * t.intermediate_size)
    llm += t.hidden_size * t.vocab_size
    attn = 2 * t.num_layers * seq * t.num_heads * t.head_dim  # QK^T and AV, causal ~1/2 x2
    clip = v.num_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    clip_per_token = clip * (v.num_patches + 1) / seq
    return 6 * (llm + clip_per_token) + 6 * attn


def run(args, grounded: bool) -> dict:
    cfg = model_config(args, grounded)
    model = init_model(cfg)
    train_cfg = ml_collections.ConfigDict(dict(lr=1e-5, warmup_steps=0, steps=1000,
                                               end_lr_fraction=0.1, b1=0.9, b2=0.95,
                                               weight_decay=0.0, clip_norm=1.0, grad_accum=1))
    tx, schedule = make_optimizer(train_cfg)
    graphdef, state = init_state(model, trainable_filter(".*"), tx, 0)
    del model
    step = jax.jit(make_step_fn(graphdef, tx, LossConfig(1.0 if grounded else 0.0), schedule),
                   donate_argnums=(0,))
    rng = np.random.default_rng(0)
    p, b, seq = cfg.image_seq_length, args.batch, args.seq
    ids = rng.integers(3, 32000, (b, seq)).astype(np.int32)
    ids[:, 5:5 + p] = cfg.image_token_id
    labels = np.where(np.arange(seq) > 5 + p, ids, -100)
    g = np.where((np.arange(seq) > 5 + p) & (rng.random((b, seq)) < 0.1),
                 rng.integers(0, 2, (b, seq)), -1)
    size = cfg.vision.image_size
    batch = {k: jnp.asarray(v) for k, v in dict(
        input_ids=ids, attention_mask=np.ones_like(ids), labels=labels, grounding_labels=g,
        lm_rows=np.ones(b, bool), is_positive=np.arange(b) % 2 == 0,
        pair_index=(np.arange(b) ^ 1).astype(np.int32),
        pixel_values=rng.standard_normal((b, 3, size, size)).astype(np.float32)).items()}
    compiled = step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    for _ in range(args.warmup):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tokens = b * seq
    kind, peak = peak_tflops()
    flops = flops_per_token(cfg, seq) * tokens
    n_params = sum(x.size for x in jax.tree.leaves(state.trainable))
    return {"grounded": grounded, "device": kind, "layers": args.layers,
            "params_b": round(n_params / 1e9, 3), "batch": b, "seq": seq,
            "step_s": round(dt, 4), "tokens_per_s": round(tokens / dt, 1),
            "model_tflops_per_s": round(flops / dt / 1e12, 1),
            "mfu": round(flops / dt / 1e12 / peak, 4) if peak else None,
            "loss": float(m["loss"]),
            "temp_gib": round(mem.temp_size_in_bytes / 2**30, 2) if mem else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="decoder layers (7B has 32)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=704, help="tokens per row (576 are image)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--remat", default="dots", choices=["none", "dots", "full"])
    p.add_argument("--attention", default="cudnn", choices=["cudnn", "xla"])
    p.add_argument("--smoke", action="store_true", help="small widths, XLA attention (CPU)")
    args = p.parse_args()
    if args.smoke:
        args.attention, args.layers, args.batch, args.steps = "xla", 5, 2, 2
    results = [run(args, grounded=True), run(args, grounded=False)]
    for r in results:
        print(json.dumps(r))
    on, off = results
    width = 'smoke (small) widths' if args.smoke else '7B width'
    print(f"\n{on['device']}: {args.layers} layers at {width}, B={args.batch} x {args.seq}")
    print(f"  grounding heads: {on['step_s'] * 1e3:.1f} ms/step, {on['tokens_per_s']:.0f} tok/s,"
          f" MFU {on['mfu']}")
    print(f"  no heads:        {off['step_s'] * 1e3:.1f} ms/step, {off['tokens_per_s']:.0f} "
          f"tok/s, MFU {off['mfu']}")
    print(f"  head overhead:   {100 * (on['step_s'] / off['step_s'] - 1):.1f}%")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
