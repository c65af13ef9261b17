"""jaxground vs HF transformers (PyTorch) on CPU, measured in the same process.

    .venv/bin/python bench/cpu_vs_hf.py                      # forward, 7 repeats, batch 2
    .venv/bin/python bench/cpu_vs_hf.py --repeats 11 --also-eager --wait-quiet 120
    .venv/bin/python bench/cpu_vs_hf.py --sections generate --wait-quiet 120  # B 1 and 8

Builds the "mid" LLaVA (CLIP 6x384 @224/14 + LLaMA 8x512, vocab 32064) in transformers with
random weights, saves it, converts it with `jaxground.checkpoints.hf_convert.hf_to_jaxground`, loads it
with `jaxground.load`, then times each section for both frameworks and checks that the two
agree. Results go to stdout as a table and to bench/out/cpu_vs_hf.json as
{"machine": ..., "config": ..., "<section>": {...}}.

Sections are functions `bench_<name>(ctx, args) -> dict` registered in SECTIONS; a new
benchmark adds one function and one SECTIONS entry, and reuses `time_interleaved` and the
models in `ctx`. Sections: `forward` (logits of a batch), `train_step` (one AdamW step) and
`generate`: greedy decoding of --new-tokens (64) per row with no EOS, `jaxground.generate` vs
HF `model.generate(do_sample=False)`, at each of --gen-batches (1,8) on left-padded prompts of
different lengths; it reports new tokens/s of both and their ratio (goal: jaxground >= 3x), the
share of generated tokens identical to HF's, and the cost per step of grounding-guided
decoding (--guidance 1.0, --guidance-top-k 5) vs plain greedy. Whole calls are timed (prefill
included); calls with 1 new token also give the decode step alone, (t(N) - t(1)) / (N - 1).
`lora_step`: one AdamW step on LoRA adapters (--lora-rank 64, alpha 2 x rank, the LLM's 7
linears), the real jaxground step vs HF + PEFT, plus its GFLOP/s as a share of the matmul
rate. `int8_decode`: batch-1 greedy decoding with int8 / nf4 frozen LLM linears vs our fp32,
each decode step against the memory floor of the bytes that model reads, the compiled
program's temporaries, and bench-only formulations of the int8 matmul (--int8-variants).

Timing: after warm-up (which includes XLA compilation), the frameworks are run alternately
(A B, B A, ...) with a short pause before each call, so that a load change on the machine
hits both alike; the reported times are medians over --repeats runs. CPU time used by
*other* processes during the timed runs is measured from /proc/stat and reported, because
on a shared 2-core machine it decides the result (PyTorch's OpenMP pool usually degrades more
under contention than XLA's); --wait-quiet waits for a quiet machine first.

Threads: both frameworks run in this one process, pinned (sched_setaffinity, before jax or
torch is imported) to the same --threads cores; torch additionally gets
torch.set_num_threads. XLA:CPU has no working thread-count flag: `intra_op_parallelism_threads`
is a TensorFlow option (written with `--` in XLA_FLAGS it aborts with "Unknown flag", written
without, it is silently ignored), so the affinity mask is what bounds XLA's intra-op pool,
which sizes itself from the schedulable CPUs (checked: 1 tf_XLAEigen thread per allowed CPU).
"""

from __future__ import annotations

import argparse
import os
import sys


def _pin_threads(n: int) -> list[int]:
    """Restricts this process (and every thread created later) to the first n usable CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if n > len(cpus):
        raise SystemExit(f"--threads {n}: only {len(cpus)} CPUs usable ({cpus})")
    chosen = cpus[:n]
    os.sched_setaffinity(0, chosen)
    return chosen


def _early_setup(argv: list[str]) -> tuple[list[int], str]:
    """Thread settings that must precede `import jax` / `import torch`."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=2)
    known, _ = pre.parse_known_args(argv)
    cpus = _pin_threads(known.threads)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        flags = (flags + " --xla_cpu_multi_thread_eigen=true").strip()
    os.environ["XLA_FLAGS"] = flags
    os.environ["JAX_PLATFORMS"] = "cpu"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(known.threads))
    return cpus, flags


_CPUS, _XLA_FLAGS = _early_setup(sys.argv[1:])

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (CLIPVisionConfig, LlamaConfig,  # noqa: E402
                          LlavaConfig as HFLlavaConfig, LlavaForConditionalGeneration)

import jaxground  # noqa: E402
from jaxground.checkpoints.hf_convert import hf_to_jaxground  # noqa: E402
from jaxground.models import config as jg_config  # noqa: E402
from machine import (cpu_info, decode_step_bytes, describe, measure_limits,  # noqa: E402
                     save_json)  # bench/machine.py

OUT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "cpu_vs_hf.json")
IMAGE_TOKEN = 32000
RATIO_GOAL = 0.7
GEN_SPEEDUP_GOAL = 3.0  # generate: jaxground new tokens/s >= 3x HF's
PAD_TOKEN = 32001  # the mid config's pad_token_id
PEAK_KEY = {"float32": "fp32_gflops", "bfloat16": "bf16_gflops"}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PAUSE_S = 0.05  # before each timed call: lets the other pool's spinning threads go idle


# ---- machine ----------------------------------------------------------------------------------
def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def machine_info(threads: int) -> dict:
    model, simd = cpu_info()
    return {
        "cpu": model,
        "cpu_simd": simd,
        "cpus_online": os.cpu_count(),
        "pinned_cpus": _CPUS,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "xla_flags": _XLA_FLAGS,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


class CpuMeter:
    """CPU seconds used by this process and by everything else, from /proc."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                s = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        busy = sum(v) - v[3] - v[4]  # all but idle and iowait
        own = int(s[11]) + int(s[12])  # utime + stime, all threads
        return busy / self.tick, own / self.tick

    @staticmethod
    def others(a, b) -> float:
        """CPU seconds other processes used between two samples."""
        if a is None or b is None:
            return 0.0
        return max(0.0, (b[0] - a[0]) - (b[1] - a[1]))


def wait_quiet(max_wait_s: float, threshold: float = 0.1) -> float:
    """Waits (up to max_wait_s) until other processes use < threshold of one CPU over 2 s;
    returns that fraction as last seen."""
    meter, deadline, frac = CpuMeter(), time.monotonic() + max_wait_s, 0.0
    while True:
        a = meter.sample()
        time.sleep(2.0)
        frac = CpuMeter.others(a, meter.sample()) / 2.0
        if frac < threshold or time.monotonic() > deadline:
            return frac
        print(f"  waiting for a quiet machine: other processes use {frac:.0%} of a CPU",
              flush=True)


# ---- models and inputs -------------------------------------------------------------------------
def hf_mid_config() -> HFLlavaConfig:
    """The HF twin of `jaxground.models.config.mid()`."""
    vision = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                              num_attention_heads=6, image_size=224, patch_size=14,
                              projection_dim=384)
    text = LlamaConfig(vocab_size=32064, hidden_size=512, intermediate_size=1376,
                       num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                       head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=1024,
                       pad_token_id=PAD_TOKEN)
    return HFLlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         pad_token_id=PAD_TOKEN)


def _shape_fields(c) -> tuple:
    return (c.vision, c.text, c.image_token_id, c.feature_layers,
            c.vision_feature_select_strategy, c.image_seq_length, c.tie_word_embeddings)


def check_matches_preset(converted) -> None:
    """The converted config must describe the same model as our `mid()` preset."""
    preset = jg_config.mid()
    if _shape_fields(converted) != _shape_fields(preset):
        raise SystemExit("converted HF config differs from jaxground mid():\n"
                         f"  converted {_shape_fields(converted)}\n"
                         f"  preset    {_shape_fields(preset)}")


def build_models(workdir: str, args, seed: int = 0) -> dict:
    """HF model(s) and jaxground model(s) holding the same random weights."""
    torch.manual_seed(seed)
    hf_dir = os.path.join(workdir, "hf")
    LlavaForConditionalGeneration(hf_mid_config()).save_pretrained(hf_dir)
    ctx = {"hf_dir": hf_dir, "jg_dirs": {}}
    # The converted model as users get it (default grounding heads), and without heads:
    # the like-for-like comparison with HF's plain LLaVA.
    cfg = hf_to_jaxground(hf_dir, os.path.join(workdir, "jaxground"))
    ctx["jg_dirs"]["jg"] = os.path.join(workdir, "jaxground")
    check_matches_preset(cfg)
    dtype = None if args.dtype == "float32" else args.dtype
    ctx["config"], ctx["jg"] = cfg, jaxground.load(os.path.join(workdir, "jaxground"), dtype)
    if cfg.grounded_layers and not args.no_plain:
        no_heads = jg_config.GroundingConfig(layers=())
        hf_to_jaxground(hf_dir, os.path.join(workdir, "jaxground_plain"), grounding=no_heads)
        ctx["jg_dirs"]["jg_plain"] = os.path.join(workdir, "jaxground_plain")
        ctx["jg_plain"] = jaxground.load(os.path.join(workdir, "jaxground_plain"), dtype)
    if "generate" in args.sections:  # the decoding layout, beside the stacked one
        for key in [k for k in ("jg", "jg_plain") if k in ctx]:
            ctx[f"{key}_unrolled"] = jaxground.load(ctx["jg_dirs"][key], dtype,
                                                    layout="unrolled")
    load = lambda attn: LlavaForConditionalGeneration.from_pretrained(
        hf_dir, attn_implementation=attn, dtype=TORCH_DTYPES[args.dtype]).eval()
    ctx["hf"] = load(args.attn)
    if args.also_eager and args.attn != "eager":
        ctx["hf_eager"] = load("eager")
    return ctx


def make_inputs(batch: int, text_tokens: int, image_tokens: int, image_size: int, seed: int = 0):
    """LLaVA-style rows: `<s> USER:` (text), image tokens, `\\n... ASSISTANT:` (text)."""
    rng = np.random.default_rng(seed)
    before = 5  # BOS + "USER:" + space, roughly what LLaVA's prompt puts before <image>
    after = text_tokens - before
    ids = np.empty((batch, before + image_tokens + after), np.int64)
    ids[:, 0] = 1
    ids[:, 1:before] = rng.integers(3, 32000, (batch, before - 1))
    ids[:, before:before + image_tokens] = IMAGE_TOKEN
    ids[:, before + image_tokens:] = rng.integers(3, 32000, (batch, after))
    mask = np.ones_like(ids)
    pixels = rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    return ids, mask, pixels


# ---- timing -----------------------------------------------------------------------------------
def time_interleaved(fns: dict, repeats: int, warmup: int, quiet: float = 0.1) -> dict:
    """Times each fn (which must block until its result is ready) `repeats` times, the fns
    alternating, in reversed order every other round.

    Returns {name: {"median_ms", "min_ms", "runs_ms", "busy"}} and "_stats". `busy` is, per
    run, the share of one CPU that other processes used meanwhile. When every fn has at
    least max(3, repeats // 2) runs with busy < `quiet`, the medians are over those quiet
    runs only ("_stats"["quiet_only"]); otherwise over all runs.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    meter = CpuMeter()
    runs = {k: [] for k in fns}
    busy = {k: [] for k in fns}
    for i in range(repeats):
        for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            time.sleep(PAUSE_S)
            a = meter.sample()
            t0 = time.perf_counter()
            fns[name]()
            dt = time.perf_counter() - t0
            runs[name].append(dt * 1e3)
            busy[name].append(CpuMeter.others(a, meter.sample()) / dt)
    need = max(3, repeats // 2)
    quiet_only = all(sum(b < quiet for b in busy[k]) >= need for k in fns)
    out = {}
    for k in fns:
        kept = [t for t, b in zip(runs[k], busy[k]) if b < quiet or not quiet_only]
        out[k] = {"median_ms": round(statistics.median(kept), 2), "min_ms": round(min(kept), 2),
                  "runs_ms": [round(t, 1) for t in runs[k]],
                  "busy": [round(b, 2) for b in busy[k]]}
    all_busy = [b for k in fns for b in busy[k]]
    out["_stats"] = {"quiet_only": quiet_only, "quiet_threshold": quiet,
                     "others_cpu_frac_median": round(statistics.median(all_busy), 3),
                     "quiet_runs": {k: sum(b < quiet for b in busy[k]) for k in fns}}
    return out


# ---- sections ---------------------------------------------------------------------------------
def bench_forward(ctx: dict, args) -> dict:
    """Full forward: vision tower + projector + LLaMA + lm_head logits [B, T, V]."""
    cfg = ctx["config"]
    ids, mask, px = make_inputs(args.batch, args.text_tokens, cfg.image_seq_length,
                                cfg.vision.image_size)
    ids_t, mask_t, px_t = map(torch.from_numpy, (ids, mask, px))
    px_t = px_t.to(TORCH_DTYPES[args.dtype])
    ids_j, mask_j, px_j = map(jax.numpy.asarray, (ids, mask, px))  # already on the device
    px_j = px_j.astype(args.dtype)

    def jax_run(model):
        # Blocks on every output (logits, grounding scores), not just the logits.
        return lambda: jax.block_until_ready(
            model(input_ids=ids_j, pixel_values=px_j, attention_mask=mask_j))

    def hf_run(model):
        def run():
            with torch.inference_mode():
                return model(input_ids=ids_t, pixel_values=px_t, attention_mask=mask_t,
                             use_cache=False)
        return run

    fns = {"jaxground": jax_run(ctx["jg"]), "hf": hf_run(ctx["hf"])}
    if "jg_plain" in ctx:
        fns["jaxground_no_heads"] = jax_run(ctx["jg_plain"])
    if "hf_eager" in ctx:
        fns["hf_eager"] = hf_run(ctx["hf_eager"])

    t0 = time.perf_counter()
    jax_logits = np.asarray(fns["jaxground"]().logits, np.float32)
    first_call_s = time.perf_counter() - t0
    hf_logits = fns["hf"]().logits.float().numpy()
    diffs = {"max_abs_logit_diff": float(np.max(np.abs(jax_logits - hf_logits)))}
    if "jaxground_no_heads" in fns:
        diffs["max_abs_logit_diff_no_heads"] = float(np.max(np.abs(
            np.asarray(fns["jaxground_no_heads"]().logits, np.float32) - hf_logits)))
    flops = forward_flops(cfg, *ids.shape)
    diffs["max_abs_logit"] = float(np.max(np.abs(hf_logits)))

    t = time_interleaved(fns, args.repeats, args.warmup)
    result = {
        "workload": (f"B={args.batch} T={ids.shape[1]} ({cfg.image_seq_length} image + "
                     f"{args.text_tokens} text tokens per row)"),
        "batch": args.batch, "seq_len": int(ids.shape[1]),
        "image_tokens": cfg.image_seq_length, "text_tokens": args.text_tokens,
        "grounded_layers": list(cfg.grounded_layers), "grounding_type": cfg.grounding.type,
        "jaxground_ms": t["jaxground"]["median_ms"], "hf_ms": t["hf"]["median_ms"],
        "ratio": round(t["jaxground"]["median_ms"] / t["hf"]["median_ms"], 3),
        "hf_attn_implementation": args.attn,
        "jaxground_first_call_s": round(first_call_s, 2),
        "gflop": round(flops / 1e9, 2),
        **diffs,
        "timing": t.pop("_stats"),
        "runs_ms": {k: v["runs_ms"] for k, v in t.items()},
        "runs_others_cpu_frac": {k: v["busy"] for k, v in t.items()},
    }
    if "jaxground_no_heads" in t:
        result["jaxground_no_heads_ms"] = t["jaxground_no_heads"]["median_ms"]
        result["ratio_no_heads"] = round(
            t["jaxground_no_heads"]["median_ms"] / t["hf"]["median_ms"], 3)
    if "hf_eager" in t:
        result["hf_eager_ms"] = t["hf_eager"]["median_ms"]
    peak = ctx["limits"][PEAK_KEY[args.dtype]]
    for k in ("jaxground_no_heads", "hf"):
        if k in t:  # achieved rate, and as a share of the measured matmul rate
            rate = flops / (t[k]["median_ms"] / 1e3) / 1e9
            result[f"{k}_gflops_per_s"] = round(rate, 1)
            result[f"{k}_of_matmul_peak"] = round(rate / peak, 3)
    return result


def training_model(path: str, compute_dtype: str):
    """The converted model at `path` with fp32 parameters computing in `compute_dtype`
    (mixed precision, as training runs it)."""
    from flax import nnx

    from jaxground.models.llava import LlavaModel
    loaded = jaxground.load(path)
    model = LlavaModel(loaded.config.replace(dtype=compute_dtype, param_dtype="float32"),
                       rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(loaded, nnx.Param))
    return model


def adamw_settings(lr: float):
    """AdamW at a constant rate, no clipping or decay: the optimizer both sides run."""
    import ml_collections

    return ml_collections.ConfigDict(dict(lr=lr, warmup_steps=0, steps=1000,
                                          end_lr_fraction=0.1, b1=0.9, b2=0.999,
                                          weight_decay=0.0, clip_norm=1e9, grad_accum=1))


def train_batch(cfg, args):
    """(ids, mask, pixels, the train step's batch): LM labels on every text token, grounding
    labels (0/1) on a fifth of them, each row its own image."""
    ids, mask, px = make_inputs(args.batch, args.text_tokens, cfg.image_seq_length,
                                cfg.vision.image_size)
    labels = np.where(ids == IMAGE_TOKEN, -100, ids)
    rng = np.random.default_rng(1)
    g_labels = np.where((ids != IMAGE_TOKEN) & (rng.random(ids.shape) < 0.2),
                        rng.integers(0, 2, ids.shape), -1)
    batch = {k: jax.numpy.asarray(v) for k, v in dict(
        input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels,
        grounding_labels=g_labels, lm_rows=np.ones(args.batch, bool),
        is_positive=np.ones(args.batch, bool),
        pair_index=-np.ones(args.batch, np.int32)).items()}
    return ids, mask, px, batch


def forward_flops(cfg, batch: int, seq: int) -> float:
    """Multiply-adds x 2 of the LLaVA forward without heads, one image per row, attention
    over all T x T pairs (what both implementations compute; XLA's own cost analysis counts a
    scanned layer once, not once per layer)."""
    v, t = cfg.vision, cfg.text
    tokens_v = v.num_patches + 1
    vision_layers = max(cfg.feature_layers)
    per_layer_v = (tokens_v * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
                   + 2 * tokens_v**2 * v.hidden_size)
    vision = v.num_patches * 3 * v.patch_size**2 * v.hidden_size + vision_layers * per_layer_v
    d_in = v.hidden_size * len(cfg.feature_layers)
    projector = cfg.image_seq_length * (d_in + t.hidden_size) * t.hidden_size
    qkvo = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    per_layer_t = (seq * (qkvo + 3 * t.hidden_size * t.intermediate_size)
                   + 2 * seq**2 * t.num_heads * t.head_dim)
    lm_head = seq * t.hidden_size * t.vocab_size
    return 2.0 * batch * (vision + projector + t.num_layers * per_layer_t + lm_head)


def bench_train_step(ctx: dict, args) -> dict:
    """One AdamW step (forward, backward, update of every parameter): our jitted, donating
    train step (jaxground.training.step) vs torch.optim.AdamW on the HF model. fp32
    parameters either way; with --dtype bfloat16 both compute in bf16 (ours: the model's
    compute dtype; HF: torch.autocast). The like-for-like pair is the model without heads
    and the LM loss only; the default model adds its heads and the BCE grounding loss."""
    from jaxground.training.losses import LossConfig
    from jaxground.training.optim import make_optimizer, trainable_filter
    from jaxground.training.step import init_state, make_step_fn

    cfg = ctx["config"]
    ids, mask, px, batch = train_batch(cfg, args)
    train_cfg = adamw_settings(lr=1e-5)

    def jax_step(model, grounding_weight):
        tx, schedule = make_optimizer(train_cfg)
        graphdef, state = init_state(model, trainable_filter(".*"), tx, 0)
        step = jax.jit(make_step_fn(graphdef, tx, LossConfig(grounding_weight), schedule),
                       donate_argnums=(0,))
        holder = {"state": state}

        def run():
            holder["state"], metrics = step(holder["state"], batch)
            return jax.block_until_ready(metrics)
        return run

    hf = LlavaForConditionalGeneration.from_pretrained(
        ctx["hf_dir"], attn_implementation=args.attn, dtype=torch.float32)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    ids_t, mask_t, px_t, labels_t = map(torch.from_numpy,
                                        (ids, mask, px, np.asarray(batch["labels"])))

    def hf_step():
        torch.set_grad_enabled(True)  # main() turns autograd off for the other sections
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = hf(input_ids=ids_t, attention_mask=mask_t, pixel_values=px_t,
                      labels=labels_t, use_cache=False).loss
        loss.backward()
        opt.step()
        return loss

    models = {k: training_model(path, args.dtype) for k, path in ctx["jg_dirs"].items()}
    fns = {"jaxground": jax_step(models["jg"], 1.0), "hf": hf_step}
    if "jg_plain" in models:
        fns["jaxground_no_heads"] = jax_step(models["jg_plain"], 0.0)
    t = time_interleaved(fns, args.repeats, args.warmup)
    torch.set_grad_enabled(False)
    out = {
        "workload": (f"AdamW step, fp32 parameters, {args.dtype} compute, B={args.batch} "
                     f"T={ids.shape[1]}"),
        "jaxground_ms": t["jaxground"]["median_ms"], "hf_ms": t["hf"]["median_ms"],
        "ratio": round(t["jaxground"]["median_ms"] / t["hf"]["median_ms"], 3),
        "hf_attn_implementation": args.attn,
        "timing": t.pop("_stats"),
        "runs_ms": {k: v["runs_ms"] for k, v in t.items()},
    }
    if "jaxground_no_heads" in t:
        out["jaxground_no_heads_ms"] = t["jaxground_no_heads"]["median_ms"]
        out["ratio_no_heads"] = round(out["jaxground_no_heads_ms"] / out["hf_ms"], 3)
    return out


def make_gen_inputs(batch: int, image_tokens: int, image_size: int, seed: int = 0):
    """`batch` prompts of different lengths, left padded: BOS and 2-6 text tokens, the image
    tokens, then 8-23 text tokens (row r: 3 + 2r mod 5 tokens before the image, 8 + 7r mod 17
    after it). Padding holds PAD_TOKEN with mask 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(batch):
        before, after = 3 + (2 * r) % 5, 8 + (7 * r) % 17
        rows.append([1] + rng.integers(3, 32000, before - 1).tolist()
                    + [IMAGE_TOKEN] * image_tokens + rng.integers(3, 32000, after).tolist())
    t = max(map(len, rows))
    ids = np.full((batch, t), PAD_TOKEN, np.int64)
    mask = np.zeros((batch, t), np.int64)
    for i, row in enumerate(rows):
        ids[i, t - len(row):] = row
        mask[i, t - len(row):] = 1
    pixels = rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    return ids, mask, pixels


def _agreement(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Share of generated tokens equal to the reference's, position by position, and the mean
    share of each row before its first difference (after one, the sequences diverge)."""
    same = ours == ref
    first_diff = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
    return {"token_match_frac": round(float(same.mean()), 4),
            "prefix_match_frac": round(float(first_diff.mean() / same.shape[1]), 4)}


def _bench_generate_batch(ctx: dict, args, batch: int) -> dict:
    cfg, n = ctx["config"], args.new_tokens
    ids, mask, px = make_gen_inputs(batch, cfg.image_seq_length, cfg.vision.image_size,
                                    seed=batch)
    ids_t, mask_t, px_t = map(torch.from_numpy, (ids, mask, px))
    px_t = px_t.to(TORCH_DTYPES[args.dtype])
    px_j = jax.numpy.asarray(px).astype(args.dtype)  # already on the device, like a user's

    def jg_run(model, new, **kw):
        # Blocks on every output (tokens, grounding scores, ...).
        return lambda: jax.block_until_ready(jaxground.generate(
            model, ids, px_j, attention_mask=mask, max_new_tokens=new, temperature=0.0,
            eos_token_id=None, **kw))

    def hf_run(model, new):
        def run():
            with torch.inference_mode():
                # eos_token_id=None: no stopping, exactly `new` tokens (min_new_tokens is a
                # guard in case an EOS id came from the model's generation config).
                return model.generate(input_ids=ids_t, attention_mask=mask_t,
                                      pixel_values=px_t, do_sample=False, max_new_tokens=new,
                                      min_new_tokens=new, eos_token_id=None,
                                      pad_token_id=PAD_TOKEN)
        return run

    guided = dict(guidance=args.guidance, guidance_top_k=args.guidance_top_k)
    makers = {"jaxground": lambda new: jg_run(ctx["jg"], new)}
    if "jg_plain" in ctx:
        makers["jaxground_no_heads"] = lambda new: jg_run(ctx["jg_plain"], new)
    if cfg.grounded_layers:  # guidance needs grounding heads
        makers["jaxground_guided"] = lambda new: jg_run(ctx["jg"], new, **guided)
    for key in ("jg_unrolled", "jg_plain_unrolled"):
        if key in ctx:
            name = "jaxground_no_heads_unrolled" if "plain" in key else "jaxground_unrolled"
            makers[name] = lambda new, key=key: jg_run(ctx[key], new)
    makers["hf"] = lambda new: hf_run(ctx["hf"], new)
    if "hf_eager" in ctx:
        makers["hf_eager"] = lambda new: hf_run(ctx["hf_eager"], new)
    fns = {k: make(n) for k, make in makers.items()}
    split = n > 1 and not args.no_gen_split
    if split:  # prefill + 1 token: (t(N) - t(1)) / (N - 1) is the cost of one decode step
        fns.update({f"{k}@1": make(1) for k, make in makers.items()})

    # First calls: tracing + XLA compilation for jaxground, and the tokens to compare.
    first_call_s, tokens = {}, {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        res = fn()
        if k.startswith("jaxground"):
            first_call_s[k] = round(time.perf_counter() - t0, 2)
        if "@" not in k:
            tokens[k] = (res[:, ids.shape[1]:].numpy() if k.startswith("hf")
                         else np.asarray(res.tokens))
    for k, tok in tokens.items():
        if tok.shape != (batch, n):
            raise SystemExit(f"generate: {k} produced tokens of shape {tok.shape}, expected "
                             f"{(batch, n)} (stopped early?)")

    t = time_interleaved(fns, args.repeats, args.warmup)
    stats = t.pop("_stats")
    ms = {k: v["median_ms"] for k, v in t.items()}
    impls = {}
    for k in makers:
        row = {"ms": ms[k], "tokens_per_s": round(batch * n / ms[k] * 1e3, 1),
               "ms_per_step": round(ms[k] / n, 3),
               "ms_per_new_token": round(ms[k] / (batch * n), 3)}
        if split:
            row["prefill_and_1_token_ms"] = ms[f"{k}@1"]
            row["decode_ms_per_step"] = round((ms[k] - ms[f"{k}@1"]) / (n - 1), 3)
        if k in first_call_s:
            row["first_call_s"] = first_call_s[k]
        impls[k] = row

    out = {
        "workload": (f"B={batch}, prompts of {sorted(set(mask.sum(1).tolist()))} tokens "
                     f"({cfg.image_seq_length} image + text) left padded to T={ids.shape[1]}, "
                     f"{n} new tokens"),
        "batch": batch, "seq_len": int(ids.shape[1]),
        "prompt_lengths": mask.sum(1).tolist(), "new_tokens": n,
        "jaxground_tokens_per_s": impls["jaxground"]["tokens_per_s"],
        "hf_tokens_per_s": impls["hf"]["tokens_per_s"],
        "speedup": round(ms["hf"] / ms["jaxground"], 3),
        **{f"hf_{k}": v for k, v in _agreement(tokens["jaxground"], tokens["hf"]).items()},
        "impls": impls,
        "timing": stats,
        "runs_ms": {k: v["runs_ms"] for k, v in t.items()},
        "runs_others_cpu_frac": {k: v["busy"] for k, v in t.items()},
    }
    floor_ms = decode_floor_ms(ctx, batch, ids.shape[1] + n / 2)
    out["decode_floor_ms"] = round(floor_ms, 3)
    for k, row in impls.items():
        if "decode_ms_per_step" in row:
            row["decode_vs_floor"] = round(row["decode_ms_per_step"] / floor_ms, 3)
    if "jaxground_no_heads" in impls:
        out["jaxground_no_heads_tokens_per_s"] = impls["jaxground_no_heads"]["tokens_per_s"]
        out["speedup_no_heads"] = round(ms["hf"] / ms["jaxground_no_heads"], 3)
        out["no_heads_hf_token_match_frac"] = _agreement(tokens["jaxground_no_heads"],
                                                         tokens["hf"])["token_match_frac"]
    if "jaxground_guided" in impls:
        g, p = impls["jaxground_guided"], impls["jaxground"]
        out["guided_ms_per_step"] = g["ms_per_step"]
        out["greedy_ms_per_step"] = p["ms_per_step"]
        out["guidance_cost_ratio"] = round(g["ms"] / p["ms"], 3)
        if split and p["decode_ms_per_step"] > 0:
            out["guidance_decode_cost_ratio"] = round(
                g["decode_ms_per_step"] / p["decode_ms_per_step"], 3)
        out["guided_tokens_equal_greedy_frac"] = round(
            float(np.mean(tokens["jaxground_guided"] == tokens["jaxground"])), 4)
    return out


def decode_floor_ms(ctx: dict, batch: int, positions: float) -> float:
    """The least a decode step can take: the bytes it must read (`decode_step_bytes`) at the
    measured streaming-read bandwidth."""
    model = ctx.get("jg_plain", ctx["jg"])
    return decode_step_bytes(model, batch, positions) / (ctx["limits"]["read_gbps"] * 1e9) * 1e3


def bench_generate(ctx: dict, args) -> dict:
    """Greedy decoding with a KV cache, `--new-tokens` per row (no EOS, so every row makes all
    of them): `jaxground.generate` vs HF `model.generate(do_sample=False)`, and jaxground's
    grounding-guided decoding (`--guidance`, `--guidance-top-k`) vs its plain greedy, for each
    batch size in `--gen-batches`. Times are whole calls (prefill included); with the split
    (default), the prefill + 1 token calls give the cost of one decode step alone."""
    batches = [int(b) for b in args.gen_batches.split(",") if b.strip()]
    out = {"new_tokens": args.new_tokens, "hf_attn_implementation": args.attn,
           "guidance": args.guidance, "guidance_top_k": args.guidance_top_k,
           "goal_speedup": GEN_SPEEDUP_GOAL, "batches": {}}
    for b in batches:
        out["batches"][str(b)] = _bench_generate_batch(ctx, args, b)
    return out


# ---- LoRA train step ---------------------------------------------------------------------------
HF_LORA_TARGETS = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
                   r"down_proj)")  # the LLM's 7 linears only (CLIP also has q/k/v_proj)


def lora_model(path: str, compute_dtype: str, rank: int, alpha: float):
    """The converted model at `path` with fresh LoRA adapters (B = 0) on the LLM's q/k/v/o
    and gate/up/down, fp32 parameters computing in `compute_dtype`."""
    from jaxground.checkpoints.converted import read_config
    from jaxground.checkpoints.restore import restore_model
    from jaxground.models.config import LoraConfig
    cfg = read_config(path).replace(lora=LoraConfig(enabled=True, rank=rank, alpha=alpha),
                                    dtype=compute_dtype, param_dtype="float32")
    return restore_model(path, config=cfg)


def lora_step_flops(cfg, batch: int, seq: int, rank: int) -> float:
    """Multiply-adds x 2 of a LoRA step without heads: the full forward (`forward_flops`) and
    the adapters' forward; backward through the LLM only (nothing below it trains): the
    activation gradients of every frozen linear, attention and lm_head (1x their forward; 2x
    for attention's two matmuls) and the adapters' weight + activation gradients (2x)."""
    t = cfg.text
    d, f = t.hidden_size, t.intermediate_size
    q_out, kv_out = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    pairs = [(d, q_out), (d, kv_out), (d, kv_out), (q_out, d), (d, f), (d, f), (f, d)]
    tokens = batch * seq * t.num_layers
    base_linear = 2.0 * tokens * sum(i * o for i, o in pairs)
    lora = 2.0 * tokens * rank * sum(i + o for i, o in pairs)
    attention = 2.0 * tokens * 2 * seq * t.num_heads * t.head_dim
    lm_head = 2.0 * batch * seq * d * t.vocab_size
    return (forward_flops(cfg, batch, seq) + lora
            + base_linear + 2 * attention + lm_head + 2 * lora)


def bench_lora_step(ctx: dict, args) -> dict:
    """One AdamW step on LoRA adapters only (rank --lora-rank, alpha --lora-alpha, on the
    LLM's q/k/v/o/gate/up/down; CLIP, projector and the LLM frozen): the real jaxground step
    (`make_step_fn` on `trainable_filter("lora")`, jitted and donating, LM loss) vs HF +
    PEFT (`get_peft_model(LoraConfig(r, lora_alpha, target_modules=the same 7, dropout 0))`,
    torch.optim.AdamW on the adapters). Same batch as `train_step`. The like-for-like pair
    is the model without heads, grounding_weight 0; the default model adds its similarity
    heads and the BCE grounding loss (its adapters get that gradient too)."""
    import peft

    from jaxground.training.losses import LossConfig
    from jaxground.training.optim import make_optimizer, trainable_filter
    from jaxground.training.step import init_state, make_step_fn

    cfg, rank = ctx["config"], args.lora_rank
    alpha = args.lora_alpha or 2.0 * rank  # LLaVA's recipe: alpha = 2 x rank (128 / 256)
    ids, mask, px, batch = train_batch(cfg, args)
    train_cfg = adamw_settings(lr=2e-4)

    def jax_step(model, grounding_weight):
        tx, schedule = make_optimizer(train_cfg)
        graphdef, state = init_state(model, trainable_filter("lora"), tx, 0)
        n_train = sum(x.size for x in jax.tree.leaves(state.trainable))
        step = jax.jit(make_step_fn(graphdef, tx, LossConfig(grounding_weight), schedule),
                       donate_argnums=(0,))
        holder = {"state": state, "n_train": n_train}

        def run():
            holder["state"], metrics = step(holder["state"], batch)
            return jax.block_until_ready(metrics)
        run.holder = holder
        return run

    hf = LlavaForConditionalGeneration.from_pretrained(
        ctx["hf_dir"], attn_implementation=args.attn, dtype=torch.float32)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=HF_LORA_TARGETS, bias="none"))
    hf.train()
    n_hf_lora = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in hf.modules())
    hf_params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(hf_params, lr=2e-4, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    ids_t, mask_t, px_t, labels_t = map(torch.from_numpy,
                                        (ids, mask, px, np.asarray(batch["labels"])))

    def hf_step():
        torch.set_grad_enabled(True)
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = hf(input_ids=ids_t, attention_mask=mask_t, pixel_values=px_t,
                      labels=labels_t, use_cache=False).loss
        loss.backward()
        opt.step()
        return loss

    fns = {}
    if "jg_plain" in ctx["jg_dirs"]:
        fns["jaxground_no_heads"] = jax_step(lora_model(ctx["jg_dirs"]["jg_plain"],
                                                        args.dtype, rank, alpha), 0.0)
    fns["hf"] = hf_step
    fns["jaxground"] = jax_step(lora_model(ctx["jg_dirs"]["jg"], args.dtype, rank, alpha), 1.0)
    # First calls (jaxground: tracing + compile): the step-0 LM losses must agree (B = 0).
    first_s, loss0 = {}, {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        res = fn()
        first_s[k] = round(time.perf_counter() - t0, 2)
        loss0[k] = float(res.item() if k == "hf" else res["lm_loss"])
    t = time_interleaved(fns, args.repeats, args.warmup)
    torch.set_grad_enabled(False)
    like = "jaxground_no_heads" if "jaxground_no_heads" in t else "jaxground"
    flops = lora_step_flops(cfg, args.batch, ids.shape[1], rank)
    peak = ctx["limits"][PEAK_KEY[args.dtype]]
    out = {
        "workload": (f"LoRA r={rank} alpha={alpha:g} on q/k/v/o/gate/up/down of the LLM, "
                     f"AdamW on adapters only, fp32 parameters, {args.dtype} compute, "
                     f"B={args.batch} T={ids.shape[1]}"),
        "rank": rank, "alpha": alpha,
        "jaxground_trainable_params": fns[like].holder["n_train"],
        "hf_trainable_params": sum(p.numel() for p in hf_params),
        "hf_lora_layers": n_hf_lora,
        "step0_lm_loss": {k: round(v, 5) for k, v in loss0.items()},
        "first_call_s": first_s,
        # The like-for-like row (no heads, LM loss only) is the headline ratio here.
        "jaxground_ms": t[like]["median_ms"], "hf_ms": t["hf"]["median_ms"],
        "ratio": round(t[like]["median_ms"] / t["hf"]["median_ms"], 3),
        "ratio_compares": like,
        "jaxground_with_heads_ms": t["jaxground"]["median_ms"],
        "ratio_with_heads": round(t["jaxground"]["median_ms"] / t["hf"]["median_ms"], 3),
        "hf_attn_implementation": args.attn,
        "gflop": round(flops / 1e9, 2),
        "timing": t.pop("_stats"),
        "runs_ms": {k: v["runs_ms"] for k, v in t.items()},
        "runs_others_cpu_frac": {k: v["busy"] for k, v in t.items()},
    }
    for k in (like, "hf"):
        rate = flops / (t[k]["median_ms"] / 1e3) / 1e9
        out[f"{k}_gflops_per_s"] = round(rate, 1)
        out[f"{k}_of_matmul_peak"] = round(rate / peak, 3)
    return out


# ---- int8 / nf4 decoding --------------------------------------------------------------------------
_FORCE_NO_LICM = {"on": False}


def _install_bench_hooks() -> None:
    """Bench-only experiments, without touching the library: (1) `ops.compiler_options`
    answers "no while-loop LICM" while _FORCE_NO_LICM is on (model_jit caches programs per
    options, so both variants coexist); (2) `Linear.__call__` runs another formulation of the
    quantized matmul on layers carrying a static `bench_formulation` attribute (static, so it
    is part of the graphdef and each formulation gets its own compiled program)."""
    from jaxground.models import ops
    if getattr(ops, "_bench_hooked", False):
        return
    library_options, library_call = ops.compiler_options, ops.Linear.__call__

    def compiler_options(state, backend=None):
        if _FORCE_NO_LICM["on"] and (backend or jax.default_backend()) == "cpu":
            return dict(ops.CPU_COMPILER_OPTIONS)
        return library_options(state, backend)

    def call(self, inputs, out_sharding=None):
        how = getattr(self, "bench_formulation", None)
        if how is None or self.quant_mode != "int8" or self.lora_scale or self.use_bias:
            return library_call(self, inputs, out_sharding)
        jnp = jax.numpy
        codes, scale = self.kernel_q[...], self.kernel_scale[...]  # [in, out] int8, [G, out]
        if scale.shape[-2] != 1:
            raise ValueError("bench formulations assume per-channel int8 (group_size 0)")
        scale = scale[..., 0, :]
        contract = (((inputs.ndim - 1,), (0,)), ((), ()))
        x = inputs.astype(jnp.float32)
        if how == "scale_after_dot":  # dot(x, f32(q)) * s: no multiply over the kernel
            y = jax.lax.dot_general(x, codes.astype(jnp.float32), contract) * scale
        elif how == "bf16_codes":  # bf16(q) is exact; x rounded to bf16 (changes numerics)
            y = ops.dot_general(x.astype(jnp.bfloat16), codes.astype(jnp.bfloat16), contract,
                                preferred_element_type=jnp.float32) * scale
        elif how == "barrier":  # the library's dequantize, tied to x: neither hoisted out
            # of the decode loop (LICM) nor scheduled ahead of the layer that uses it
            x, codes, scale = jax.lax.optimization_barrier((x, codes, scale))
            y = jax.lax.dot_general(x, codes.astype(jnp.float32) * scale, contract)
        elif how == "barrier_bf16":  # the same with the kernel dequantized to bf16
            x, codes, scale = jax.lax.optimization_barrier((x, codes, scale))
            y = ops.dot_general(x.astype(jnp.bfloat16),
                                (codes.astype(jnp.float32) * scale).astype(jnp.bfloat16),
                                contract, preferred_element_type=jnp.float32)
        elif how == "chunked":  # barrier, per block of columns whose fp32 copy is ~256 KiB
            # (stays in L2 between the dequantize and the dot), blocks chained in order
            n_in, n_out = codes.shape
            cols = max(16, (1 << 18) // (4 * n_in) // 16 * 16)
            outs, dep = [], x
            for a in range(0, n_out, cols):
                x_b, _, q_b, s_b = jax.lax.optimization_barrier(
                    (x, dep, codes[:, a:a + cols], scale[a:a + cols]))
                dep = jax.lax.dot_general(x_b, q_b.astype(jnp.float32) * s_b, contract)
                outs.append(dep)
            y = jnp.concatenate(outs, axis=-1)
        elif how == "mul_reduce":  # one row: multiply + reduce, one fusion reading int8
            if int(np.prod(inputs.shape[:-1])) != 1:
                return library_call(self, inputs, out_sharding)
            y = jnp.sum(x.reshape(-1, 1) * codes.astype(jnp.float32), axis=0) * scale
            y = y.reshape(*inputs.shape[:-1], -1)
        else:
            raise ValueError(f"unknown bench formulation {how!r}")
        return y.astype(self.dtype or inputs.dtype)

    ops.compiler_options, ops.Linear.__call__, ops._bench_hooked = compiler_options, call, True


def step_weight_bytes(model) -> tuple[float, float]:
    """(bytes of weights one decode step reads, of which quantized codes + scales): every
    parameter and quantized array of the LLM but the embedding table (one row of it), plus
    the lm_head. `machine.decode_step_bytes` counts `nnx.Param` only, so it misses codes."""
    from flax import nnx

    from jaxground.models.ops import QuantizedWeight
    kinds = nnx.Any(nnx.Param, QuantizedWeight)
    lm = model.language_model
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(lm, kinds)))
    emb = lm.embed_tokens.embedding[...]
    total -= emb.nbytes - emb.nbytes // emb.shape[0]
    parts = [lm] + ([] if model.config.tie_word_embeddings else [model.lm_head])
    total += sum(x.nbytes for p in parts[1:] for x in jax.tree.leaves(nnx.state(p, kinds)))
    quant = sum(x.nbytes for p in parts for x in jax.tree.leaves(nnx.state(p, QuantizedWeight)))
    return float(total), float(quant)


def bench_int8_decode(ctx: dict, args) -> dict:
    """Greedy decoding at batch 1 (--new-tokens, no EOS) with weight-only quantized LLM
    linears (`LlavaConfig.quant`, dequantized inside the matmul) vs our fp32 model, all
    without grounding heads: decode step (t(N) - t(1)) / (N - 1), new tokens/s, the step
    against the memory floor of the bytes that model must read per step (quantized codes +
    scales, what stays fp32: lm_head, norms, one embedding row; KV cache), and the compiled
    program's temporaries (XLA memory analysis: a dequantized copy of every kernel hoisted
    out of the decode loop shows up there). Variants: the library formulation in both
    layouts, int8 also on the lm_head, nf4, and bench-only formulations of the int8 matmul
    (`_install_bench_hooks`)."""
    from jaxground.checkpoints.converted import read_config
    from jaxground.checkpoints.restore import restore_model
    from jaxground.inference.generate import lower_generate
    from jaxground.models.adapters import linear_layers
    from jaxground.models.config import LLM_LINEARS, QuantConfig

    _install_bench_hooks()
    path = ctx["jg_dirs"].get("jg_plain", ctx["jg_dirs"]["jg"])
    base_cfg = read_config(path)
    dtype = None if args.dtype == "float32" else args.dtype
    modes = [m.strip() for m in args.quant_modes.split(",") if m.strip()]
    forms = [f.strip() for f in args.int8_formulations.split(",") if f.strip()]

    def load(quant: QuantConfig, layout: str, formulation: str | None = None):
        model = restore_model(path, config=base_cfg.replace(quant=quant), dtype=dtype,
                              layout=layout)
        if formulation:
            for _, linear in linear_layers(model):
                if linear.quant_mode != "none":
                    linear.bench_formulation = formulation
        return model

    int8 = QuantConfig(mode="int8")
    # nf4's default block of 64 input rows does not divide the mid MLP's 1376 (= 32 x 43)
    nf4 = QuantConfig(mode="nf4", group_size=32)
    int8_head = QuantConfig(mode="int8", targets=LLM_LINEARS + "|^lm_head$")
    specs = [  # (name, quant, layout, bench formulation, force no LICM)
        ("fp32 unrolled", QuantConfig(), "unrolled", None, False),
        ("fp32 stacked", QuantConfig(), "stacked", None, False),
        ("int8 unrolled", int8, "unrolled", None, False),
        ("int8 stacked", int8, "stacked", None, False),
        ("int8 unrolled, no LICM", int8, "unrolled", None, True),
        ("int8+lm_head unrolled", int8_head, "unrolled", None, False),
        ("nf4/32 unrolled", nf4, "unrolled", None, False),
        ("int8 unrolled, scale_after_dot, no LICM", int8, "unrolled", "scale_after_dot", True),
        ("int8 unrolled, bf16_codes, no LICM", int8, "unrolled", "bf16_codes", True),
        ("int8 unrolled, mul_reduce, no LICM", int8, "unrolled", "mul_reduce", True),
        ("int8 unrolled, barrier", int8, "unrolled", "barrier", False),
        ("int8 unrolled, barrier_bf16", int8, "unrolled", "barrier_bf16", False),
        ("int8 unrolled, chunked", int8, "unrolled", "chunked", False),
        ("int8+lm_head unrolled, chunked", int8_head, "unrolled", "chunked", False),
    ]
    wanted = [w.strip() for w in args.int8_variants.split(";") if w.strip()]
    variants = {name: (load(q, layout, f), no_licm) for name, q, layout, f, no_licm in specs
                if name in ("fp32 unrolled", "int8 unrolled")
                or ((not wanted or name in wanted) and (f is None or f in forms)
                    and ("nf4" not in name or "nf4" in modes))}
    n = args.new_tokens
    cfg = ctx["config"]
    ids, mask, px = make_gen_inputs(1, cfg.image_seq_length, cfg.vision.image_size, seed=1)
    px_j = jax.numpy.asarray(px).astype(args.dtype)

    def run(model, no_licm, new):
        def fn():
            _FORCE_NO_LICM["on"] = no_licm
            try:
                return jax.block_until_ready(jaxground.generate(
                    model, ids, px_j, attention_mask=mask, max_new_tokens=new,
                    temperature=0.0, eos_token_id=None))
            finally:
                _FORCE_NO_LICM["on"] = False
        return fn

    def temp_mib(model, no_licm):
        _FORCE_NO_LICM["on"] = no_licm
        try:
            mem = lower_generate(model, ids, px_j, attention_mask=mask, max_new_tokens=n,
                                 temperature=0.0, eos_token_id=None).compile().memory_analysis()
            return round(mem.temp_size_in_bytes / 2**20, 1)
        except Exception as e:  # noqa: BLE001  (memory analysis is best effort)
            return f"n/a ({type(e).__name__})"
        finally:
            _FORCE_NO_LICM["on"] = False

    fns, first_s, tokens, info = {}, {}, {}, {}
    for name, (model, no_licm) in variants.items():
        for new in (n, 1):
            key = name if new == n else f"{name}@1"
            fns[key] = run(model, no_licm, new)
            t0 = time.perf_counter()
            res = fns[key]()
            first_s[key] = round(time.perf_counter() - t0, 2)
            if new == n:
                tokens[name] = np.asarray(res.tokens)
        w, q = step_weight_bytes(model)
        info[name] = {"weight_bytes": w, "quant_bytes": q, "temp_mib": temp_mib(model, no_licm)}
        print(f"  int8_decode: {name}: compiled, temporaries {info[name]['temp_mib']} MiB",
              flush=True)

    t = time_interleaved(fns, args.repeats, args.warmup)
    stats = t.pop("_stats")
    read_bps = ctx["limits"]["read_gbps"] * 1e9
    t_cfg = cfg.text
    positions = ids.shape[1] + n / 2
    itemsize = np.dtype(args.dtype).itemsize
    kv_bytes = 2 * t_cfg.num_layers * t_cfg.num_kv_heads * t_cfg.head_dim * positions * itemsize
    ref = "fp32 unrolled"
    impls = {}
    for name in variants:
        ms, ms1 = t[name]["median_ms"], t[f"{name}@1"]["median_ms"]
        dec = (ms - ms1) / (n - 1)
        floor_ms = (info[name]["weight_bytes"] + kv_bytes) / read_bps * 1e3
        impls[name] = {
            "ms": ms, "prefill_and_1_token_ms": ms1, "decode_ms_per_step": round(dec, 3),
            "tokens_per_s": round(n / ms * 1e3, 1),
            "decode_tokens_per_s": round(1e3 / dec, 1) if dec > 0 else None,
            "step_bytes_mib": round((info[name]["weight_bytes"] + kv_bytes) / 2**20, 1),
            "quant_bytes_mib": round(info[name]["quant_bytes"] / 2**20, 1),
            "floor_ms": round(floor_ms, 3), "decode_vs_floor": round(dec / floor_ms, 3),
            "temp_mib": info[name]["temp_mib"],
            "first_call_s": first_s[name], "first_call_1_s": first_s[f"{name}@1"],
            "tokens_equal_fp32_frac": round(float(np.mean(tokens[name] == tokens[ref])), 4),
        }
    for name, row in impls.items():
        row["speedup_vs_fp32"] = round(impls[ref]["ms"] / row["ms"], 3)
        if row["decode_ms_per_step"] > 0:
            row["decode_speedup_vs_fp32"] = round(
                impls[ref]["decode_ms_per_step"] / row["decode_ms_per_step"], 3)
    return {
        "workload": (f"B=1, prompt of {int(mask.sum())} tokens ({cfg.image_seq_length} image "
                     f"+ text), {n} new tokens, greedy, no heads, {args.dtype} compute"),
        "new_tokens": n, "kv_positions": positions, "reference": ref,
        "goal_decode_vs_floor": 1.3, "goal_tokens_per_s_vs_fp32": 2.0,
        "impls": impls, "timing": stats,
        "runs_ms": {k: v["runs_ms"] for k, v in t.items()},
        "runs_others_cpu_frac": {k: v["busy"] for k, v in t.items()},
    }


def print_int8_decode(r: dict) -> None:
    print(f"int8_decode: {r['workload']}; decode ms/step = (t(N) - t(1)) / (N - 1); floor = "
          "the bytes that model reads per step / measured read bandwidth")
    print(f"{'implementation':<38} {'call ms':>8} {'tok/s':>6} {'dec ms':>7} {'MiB/step':>8} "
          f"{'floor':>6} {'vs floor':>8} {'vs fp32':>7} {'temps MiB':>9} {'same tok':>8}")
    print("-" * 112)
    for name, row in r["impls"].items():
        print(f"{name:<38} {row['ms']:>8.1f} {row['tokens_per_s']:>6.1f} "
              f"{row['decode_ms_per_step']:>7.2f} {row['step_bytes_mib']:>8.1f} "
              f"{row['floor_ms']:>6.2f} {row['decode_vs_floor']:>7.2f}x "
              f"{row['speedup_vs_fp32']:>6.2f}x {str(row['temp_mib']):>9} "
              f"{row['tokens_equal_fp32_frac']:>8.0%}")
    i8 = r["impls"]["int8 unrolled"]
    print(f"  goals (int8 unrolled): decode step {i8['decode_vs_floor']:.2f}x its floor "
          f"(goal <= {r['goal_decode_vs_floor']}x); new tokens/s {i8['speedup_vs_fp32']:.2f}x "
          f"fp32's (goal >= {r['goal_tokens_per_s_vs_fp32']}x; decode alone "
          f"{i8.get('decode_speedup_vs_fp32', float('nan')):.2f}x)")
    print_timing(r)


SECTIONS = {"forward": bench_forward, "train_step": bench_train_step,
            "generate": bench_generate, "lora_step": bench_lora_step,
            "int8_decode": bench_int8_decode}


OWN_PRINTER = ("lora_step", "int8_decode")  # printed by print_lora_step / print_int8_decode


def section_key(name: str, dtype: str) -> str:
    """The JSON key of a section's results: fp32 results keep the plain name."""
    return name if dtype == "float32" else f"{name}_{dtype}"


# ---- report -----------------------------------------------------------------------------------
def args_repeats(r: dict) -> int:
    return len(next(iter(r["runs_ms"].values())))


def print_report(results: dict) -> None:
    m, c = results["machine"], results["config"]
    dtype = c["dtype"]
    print(f"\n{describe(m['limits'])}")
    print(f"machine:  {m['cpu']} ({' '.join(m['cpu_simd'])}), {m['cpus_online']} CPUs "
          f"online; both frameworks pinned to CPUs {m['pinned_cpus']} ({m['threads']} threads:"
          f" torch.get_num_threads()={m['torch_threads']}, XLA pool sized by the affinity mask)")
    print(f"XLA_FLAGS: {m['xla_flags']}")
    print(f"versions: jax {m['jax']} (jaxlib {m['jaxlib']}), flax {m['flax']}, "
          f"torch {m['torch']}, transformers {m['transformers']}, python {m['python']}")
    print(f"model:    {c['name']}: CLIP {c['vision_layers']}x{c['vision_hidden']} "
          f"@{c['image_size']}px/{c['patch_size']}, LLaMA {c['text_layers']}x"
          f"{c['text_hidden']}, vocab {c['vocab_size']}, {c['dtype']}, random weights\n")
    rows = []
    for name in [s for s in SECTIONS if s not in OWN_PRINTER]:
        key = section_key(name, dtype)
        if key not in results or "jaxground_ms" not in results[key]:
            continue
        r = results[key]
        hf_label = f"HF {r['hf_attn_implementation']}"
        rows.append((name, "jaxground (as converted)", r["jaxground_ms"], r["ratio"]))
        if "jaxground_no_heads_ms" in r:
            rows.append((name, "jaxground, no grounding heads", r["jaxground_no_heads_ms"],
                         r["ratio_no_heads"]))
        rows.append((name, hf_label, r["hf_ms"], 1.0))
        if "hf_eager_ms" in r:
            rows.append((name, "HF eager", r["hf_eager_ms"], r["hf_eager_ms"] / r["hf_ms"]))
    if rows:
        print(f"{'section':<9} {'implementation':<30} {'median ms':>10} {'vs HF':>7}")
        print("-" * 60)
        for sec, impl, ms, ratio in rows:
            print(f"{sec:<9} {impl:<30} {ms:>10.1f} {ratio:>7.3f}")
        print()
    for name in [s for s in SECTIONS if s not in OWN_PRINTER]:
        key = section_key(name, dtype)
        if key not in results or "jaxground_ms" not in results[key]:
            continue
        r = results[key]
        verdict = "meets" if r["ratio"] <= RATIO_GOAL else "misses"
        print(f"{name}: {r.get('workload', '')}; jaxground/HF({r['hf_attn_implementation']})"
              f" = {r['ratio']:.3f}, {verdict} the goal <= {RATIO_GOAL}")
        if "max_abs_logit_diff" in r:
            extra = (f", no heads {r['max_abs_logit_diff_no_heads']:.2e}"
                     if "max_abs_logit_diff_no_heads" in r else "")
            print(f"  max |logits jaxground - HF| = {r['max_abs_logit_diff']:.2e}{extra} "
                  f"(max |logit| {r['max_abs_logit']:.2f})")
        if "gflop" in r:
            rates = ", ".join(f"{k} {r[f'{k}_gflops_per_s']:.0f} GFLOP/s = "
                              f"{r[f'{k}_of_matmul_peak']:.0%}" for k in ("jaxground_no_heads", "hf")
                              if f"{k}_gflops_per_s" in r)
            print(f"  {r['gflop']:.1f} GFLOP per forward; {rates} of the measured "
                  f"{dtype} matmul rate")
        if "jaxground_first_call_s" in r:
            print(f"  first jaxground call (tracing + XLA compile): "
                  f"{r['jaxground_first_call_s']:.1f} s")
        print_timing(r)
    if section_key("generate", dtype) in results:
        print_generate(results[section_key("generate", dtype)])
    if section_key("lora_step", dtype) in results:
        print_lora_step(results[section_key("lora_step", dtype)], dtype)
    if section_key("int8_decode", dtype) in results:
        print_int8_decode(results[section_key("int8_decode", dtype)])
    print()


def print_timing(r: dict) -> None:
    tm = r.get("timing")
    if tm is None:
        return
    if tm["quiet_only"]:
        print(f"  medians over quiet runs only (other processes < {tm['quiet_threshold']:.0%}"
              f" of a CPU): {tm['quiet_runs']} of {args_repeats(r)} runs")
    else:
        print(f"  WARNING: the machine was busy (other processes used a median "
              f"{tm['others_cpu_frac_median']:.0%} of a CPU per run; quiet runs "
              f"{tm['quiet_runs']}): timings are unreliable, PyTorch's OpenMP pool "
              "usually degrades most. Rerun with --wait-quiet / more --repeats.")


def print_lora_step(r: dict, dtype: str) -> None:
    verdict = "meets" if r["ratio"] <= RATIO_GOAL else "misses"
    print(f"lora_step: {r['workload']}")
    print(f"  jaxground no heads, LM loss {r['jaxground_ms']:.1f} ms; with similarity heads + "
          f"grounding loss {r['jaxground_with_heads_ms']:.1f} ms; HF+PEFT ({r['hf_attn_implementation']}) "
          f"{r['hf_ms']:.1f} ms")
    print(f"  jaxground/HF = {r['ratio']:.3f} ({r['ratio_compares']}), {verdict} the goal <= "
          f"{RATIO_GOAL}; with heads {r['ratio_with_heads']:.3f}")
    like = r["ratio_compares"]
    print(f"  {r['gflop']:.1f} GFLOP per step; jaxground {r[f'{like}_gflops_per_s']:.0f} "
          f"GFLOP/s = {r[f'{like}_of_matmul_peak']:.0%}, HF {r['hf_gflops_per_s']:.0f} GFLOP/s = "
          f"{r['hf_of_matmul_peak']:.0%} of the measured {dtype} matmul rate")
    print(f"  trainable: jaxground {r['jaxground_trainable_params']:,}, HF {r['hf_trainable_params']:,}"
          f" ({r['hf_lora_layers']} LoRA layers); step-0 LM loss {r['step0_lm_loss']}")
    print(f"  first calls (jaxground: tracing + XLA compile): {r['first_call_s']}")
    print_timing(r)


GEN_LABELS = {"jaxground": "jaxground greedy (as converted)",
              "jaxground_no_heads": "jaxground greedy, no heads",
              "jaxground_guided": "jaxground guided",
              "jaxground_unrolled": "jaxground greedy, unrolled",
              "jaxground_no_heads_unrolled": "jaxground no heads, unrolled",
              "hf": "HF generate", "hf_eager": "HF eager"}


def print_generate(g: dict) -> None:
    n = g["new_tokens"]
    print(f"generate: {n} new tokens per row, greedy (no EOS); HF "
          f"attn_implementation={g['hf_attn_implementation']!r}; guided = guidance "
          f"{g['guidance']}, top-k {g['guidance_top_k']}. Times are whole calls, prefill "
          "included.")
    print("  step = one new token in every row; decode ms/step = (t(N) - t(prefill + 1 "
          "token)) / (N - 1)")
    print(f"{'B':>2} {'implementation':<32} {'median ms':>10} {'new tok/s':>10} "
          f"{'ms/step':>8} {'decode ms/step':>15} {'vs HF':>7}")
    print("-" * 90)
    for b, r in g["batches"].items():
        hf_ms = r["impls"]["hf"]["ms"]
        for k, row in r["impls"].items():
            dec = row.get("decode_ms_per_step")
            dec = f"{dec:>15.2f}" if dec is not None else f"{'-':>15}"
            print(f"{b:>2} {GEN_LABELS.get(k, k):<32} {row['ms']:>10.1f} "
                  f"{row['tokens_per_s']:>10.1f} {row['ms_per_step']:>8.2f} {dec} "
                  f"{hf_ms / row['ms']:>6.2f}x")
    print()
    for b, r in g["batches"].items():
        ms = {k: v["ms"] for k, v in r["impls"].items()}
        speedup = ms["hf"] / ms["jaxground"]  # unrounded, as in the table
        verdict = "meets" if speedup >= g["goal_speedup"] else "misses"
        no_heads = (f" (no heads {ms['hf'] / ms['jaxground_no_heads']:.2f}x)"
                    if "jaxground_no_heads" in ms else "")
        print(f"generate: {r['workload']}")
        floors = ", ".join(f"{k} {v['decode_vs_floor']:.2f}x" for k, v in r["impls"].items()
                           if "decode_vs_floor" in v)
        print(f"  decode step vs the memory floor ({r['decode_floor_ms']:.2f} ms: the bytes a "
              f"step must read / measured read bandwidth): {floors}")
        print(f"  new tokens/s jaxground {r['jaxground_tokens_per_s']:.1f} vs HF "
              f"{r['hf_tokens_per_s']:.1f}: {speedup:.2f}x{no_heads}, {verdict} the goal "
              f">= {g['goal_speedup']:g}x")
        no_heads = (f" (no heads {r['no_heads_hf_token_match_frac']:.1%})"
                    if "no_heads_hf_token_match_frac" in r else "")
        print(f"  greedy tokens identical to HF's: {r['hf_token_match_frac']:.1%}{no_heads}; "
              f"rows agree before their first difference for "
              f"{r['hf_prefix_match_frac']:.1%} of the tokens (random weights: near-ties)")
        if "guidance_cost_ratio" in r:
            dec = (f"; decode step alone {r['guidance_decode_cost_ratio']:.2f}x"
                   if "guidance_decode_cost_ratio" in r else "")
            print(f"  guided vs greedy: {r['guided_ms_per_step']:.2f} vs "
                  f"{r['greedy_ms_per_step']:.2f} ms/step = "
                  f"{r['guidance_cost_ratio']:.2f}x per call{dec}")
        firsts = {k: v["first_call_s"] for k, v in r["impls"].items() if "first_call_s" in v}
        print("  first call (tracing + XLA compile): "
              + ", ".join(f"{k} {s:.1f} s" for k, s in firsts.items()))
        print_timing(r)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="forward",
                   help=f"comma-separated, from {sorted(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (incl. compile)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=64,
                   help="text tokens per row, around the image tokens")
    p.add_argument("--threads", type=int, default=2,
                   help="CPUs both frameworks are pinned to (and torch.set_num_threads)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                   help="HF attn_implementation (sdpa: its fastest CPU path)")
    p.add_argument("--also-eager", action="store_true",
                   help="also time HF with attn_implementation='eager'")
    p.add_argument("--no-plain", action="store_true",
                   help="skip the jaxground model without grounding heads")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for other processes to go idle")
    p.add_argument("--new-tokens", type=int, default=64,
                   help="generate: new tokens per row (no EOS, so exactly this many)")
    p.add_argument("--gen-batches", default="1,8",
                   help="generate: comma-separated batch sizes")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="generate: alpha of the grounding-guided run")
    p.add_argument("--guidance-top-k", type=int, default=5,
                   help="generate: candidates per step of the guided run")
    p.add_argument("--no-gen-split", action="store_true",
                   help="generate: skip the prefill + 1 token runs that isolate the "
                        "decode step")
    p.add_argument("--dtype", default="float32", choices=sorted(TORCH_DTYPES),
                   help="compute dtype of both frameworks (bfloat16: jaxground.load(dtype=) vs "
                        "the HF model in bf16; the train step keeps fp32 parameters)")
    p.add_argument("--lora-rank", type=int, default=64,
                   help="lora_step: adapter rank (LLaVA's recipe is 128 on a 4096-wide LLM; "
                        "the mid LLM is 512 wide)")
    p.add_argument("--lora-alpha", type=float, default=0.0,
                   help="lora_step: adapter alpha (0: 2 x rank, as LLaVA's 128 / 256)")
    p.add_argument("--quant-modes", default="int8,nf4",
                   help="int8_decode: add nf4 to the int8 variants when listed")
    p.add_argument("--int8-variants", default="",
                   help="int8_decode: ';'-separated variant names to run (default: all; "
                        "'fp32 unrolled' and 'int8 unrolled' always run)")
    p.add_argument("--int8-formulations",
                   default="scale_after_dot,bf16_codes,mul_reduce,barrier,barrier_bf16,chunked",
                   help="int8_decode: bench-only formulations of the int8 matmul to try")
    p.add_argument("--out", default=OUT_JSON)
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; known: {sorted(SECTIONS)}")

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    results = {"machine": machine_info(args.threads)}
    with tempfile.TemporaryDirectory(prefix="jaxground_bench_") as workdir:
        ctx = build_models(workdir, args)
        cfg = ctx["config"]
        if args.wait_quiet > 0:
            results["machine"]["others_cpu_frac_before"] = round(wait_quiet(args.wait_quiet), 3)
        # The limits every result is also given against, measured in this run.
        ctx["limits"] = results["machine"]["limits"] = measure_limits()
        results["config"] = {
            "name": "mid", "vision_layers": cfg.vision.num_layers,
            "vision_hidden": cfg.vision.hidden_size, "image_size": cfg.vision.image_size,
            "patch_size": cfg.vision.patch_size, "text_layers": cfg.text.num_layers,
            "text_hidden": cfg.text.hidden_size, "vocab_size": cfg.text.vocab_size,
            "dtype": args.dtype}
        for name in sections:
            results[section_key(name, args.dtype)] = SECTIONS[name](ctx, args)

    print_report(results)
    merged = {}
    if os.path.exists(args.out):  # keep sections that earlier runs measured
        try:
            with open(args.out) as f:
                merged = json.load(f)
        except (OSError, json.JSONDecodeError):
            merged = {}
    merged.update(results)
    merged["command"] = " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    save_json(args.out, merged)
    return results


if __name__ == "__main__":
    main()
