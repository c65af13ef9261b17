"""Memory you can read before you rent the GPU: the real llava-1.5-7b / 13b train step,
compiled ahead of time on abstract arrays, and XLA's memory analysis of it per device.

    .venv/bin/python bench/memory_7b.py                      # the default subset (~6 min)
    .venv/bin/python bench/memory_7b.py --models 7b,13b --rows full,lora-bf16,lora-int8,lora-nf4 \\
        --batches 1,16 --remat none,full                     # the whole matrix
    .venv/bin/python bench/memory_7b.py --models 13b --rows lora-nf4 --batches 1 --remat full

Nothing is allocated: the model is built with `abstract_model` (ShapeDtypeStruct leaves),
the TrainState comes from `jax.eval_shape` over `init_state` (so the optimizer state is
AdamW's real one), frozen floats are cast to `frozen_dtype` and placed by
`sharding.tree_shardings` as `setup.train_state` does, the batch is ShapeDtypeStructs on
`sharding.batch_sharding` as in `setup.compile_steps`, and the step compiled is
`make_step_fn(graphdef, tx, LossConfig(), schedule)` through `step.compile_step` (donated
state, `ops.compiler_options`). The CPU backend simulates 8 devices
(`--xla_force_host_platform_device_count=8`, set before jax is imported); the LoRA rows use
one of them.

Rows (all: bf16 compute, fp32 master copy of what is trained, AdamW, LossConfig() = LM +
BCE grounding loss, default `similarity` heads on layers 28-31 / 36-39):
- `full`: everything trainable but the vision tower (LLaVA-1.5 stage 2 freezes CLIP; the
  frozen CLIP is kept in bf16), FSDP over 8 devices (mesh data=1, fsdp=8, tensor=1);
- `lora-bf16`: LoRA r=128, alpha=256 on the LLM's q/k/v/o/gate/up/down (LLaVA's
  finetune_lora.sh), trainable "lora,projector,grounding_heads", frozen weights bf16, 1 device;
- `lora-int8` / `lora-nf4`: the same with the frozen LLM linears quantized (int8 per
  channel / NF4 blocks of 64; everything else frozen in bf16), 1 device.

Sequence length: LLaVA-1.5's scripts/v1_5/finetune_lora.sh (and finetune.sh) pass
`--model_max_length 2048`, and llava_arch.py truncates the sequence *after* the 576 image
features are merged in (`x[:tokenizer_model_max_length]`), so T = 2048 positions, image
included (576 image + 1472 text). `--seq-len` changes it.

Batch: rows per device. One row (1 image) is the minimum: the step takes `rows_per_image`
from the batch, so a single row with its own image compiles (`pair_index` -1, no partner).
16 rows = 8 positive/negative pairs sharing 8 images. For `full` on 8 devices the global
batch is 8x the rows per device (batch 1: 8 rows, 8 images; batch 16: 128 rows, 64 pairs =
LLaVA's global batch of 128).

Per device, from `compiled.memory_analysis()`: arguments (state + batch), outputs (new state
+ metrics), aliased (outputs written into donated arguments: the state), temporaries
(activations kept for the backward, gradients, optimizer temporaries, ...).
peak = arguments + temporaries + outputs - aliased (XLA:CPU's own `peak_memory_in_bytes`
counts only the arguments; it is kept in the JSON as `xla_peak_gib`). This is XLA:CPU's
buffer assignment, a proxy for the GPU's: the GPU compiler fuses and schedules differently
(and cuDNN attention would not materialize [T, T] scores), so read the numbers as +/- a
few GiB, not to the byte.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxground.models import config as model_config  # noqa: E402
from jaxground.models.llava import abstract_model  # noqa: E402
from jaxground.parallel import sharding  # noqa: E402
from jaxground.training import setup  # noqa: E402
from jaxground.training.config import TrainSettings  # noqa: E402
from jaxground.training.losses import LossConfig  # noqa: E402
from jaxground.training.optim import make_optimizer, trainable_filter  # noqa: E402
from jaxground.training.step import BATCH_KEYS, compile_step, init_state, make_step_fn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_info, describe, save_json  # noqa: E402  (bench/machine.py)

OUT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "memory_7b.json")
GIB = 2**30
MODELS = {"7b": "llava-1.5-7b", "13b": "llava-1.5-13b"}
LLAVA_T = 2048  # scripts/v1_5/finetune*.sh --model_max_length, image tokens included
GPU_SIZES = (16, 24, 40, 48, 80, 141)  # GiB of common cards (the last: H200)
DEFAULT = dict(extra="13b:lora-int8,lora-nf4:1:full")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    what: str
    devices: int
    trainable: str
    lora: bool
    quant: str = "none"
    target_gib: float | None = None  # at batch 1 (7B), from the issue


ROWS = {
    "full": Row("full", "full FT (CLIP frozen), fsdp 8", 8, r"^(?!vision_tower/)", False),
    "lora-bf16": Row("lora-bf16", "LoRA r128 + bf16 frozen", 1,
                     "lora,projector,grounding_heads", True, "none", 40),
    "lora-int8": Row("lora-int8", "LoRA r128 + int8 frozen", 1,
                     "lora,projector,grounding_heads", True, "int8", 24),
    "lora-nf4": Row("lora-nf4", "LoRA r128 + nf4 frozen", 1,
                    "lora,projector,grounding_heads", True, "nf4", 16),
}
ANCHORS = [
    "LLaVA-1.5 (haotian-liu/LLaVA): 7B LoRA r128 on 8x RTX 3090 24 GB with DeepSpeed ZeRO-3 "
    "(finetune_lora.sh: bf16, model_max_length 2048, gradient checkpointing); full FT on 8x "
    "A100 80 GB (40 GB with ZeRO-3 and a smaller per-device batch)",
    "tunix: Llama-3-8B QLoRA (nf4) on one 16 GB GPU, LoRA (bf16 base) on 24 GB",
]


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def make_mesh(devices: int) -> jax.sharding.Mesh:
    if jax.device_count() < devices:
        raise SystemExit(f"{devices} devices needed, {jax.device_count()} available: set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
    fsdp = devices
    return jax.make_mesh((1, fsdp, 1), sharding.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:devices])


def model_cfg(model: str, row: Row, remat: str) -> model_config.LlavaConfig:
    """As `setup.model_config` builds it for a run of `row`."""
    base = model_config.PRESETS[MODELS[model]]()
    return base.replace(dtype="bfloat16", param_dtype="float32", remat=remat,
                        lora=model_config.LoraConfig(enabled=row.lora),
                        quant=model_config.QuantConfig(mode=row.quant))


def train_settings(row: Row) -> TrainSettings:
    """LLaVA-1.5's recipe (finetune_lora.sh / finetune.sh): AdamW, no weight decay, LoRA at
    2e-4 with the projector at 2e-5; full FT at 2e-5."""
    if row.lora:
        return TrainSettings(lr=2e-4, weight_decay=0.0, b2=0.999, trainable=row.trainable,
                             lr_groups="projector=2e-5", steps=5000, warmup_steps=150)
    return TrainSettings(lr=2e-5, weight_decay=0.0, b2=0.999, trainable=row.trainable,
                         steps=5000, warmup_steps=150)


def abstract_state(cfg, row: Row, tx, mesh, frozen_dtype=jnp.bfloat16):
    """(graphdef, TrainState of ShapeDtypeStructs on the mesh, its shardings): what
    `setup.train_state` would place, without allocating anything."""
    model = abstract_model(cfg)
    select = trainable_filter(row.trainable)
    graphdef, trainable, frozen = nnx.split(model, select, ...)

    def build(trainable, frozen):
        _, state = init_state(nnx.merge(graphdef, trainable, frozen), select, tx, seed=0)
        return state

    state = jax.eval_shape(build, trainable, frozen)
    state = state.replace(frozen=jax.tree.map(  # setup.train_state's frozen_dtype cast
        lambda a: jax.ShapeDtypeStruct(a.shape, frozen_dtype)
        if jnp.issubdtype(a.dtype, jnp.floating) else a, state.frozen))
    shardings = sharding.tree_shardings(state, mesh)
    return graphdef, setup.abstract(state, shardings), shardings


def abstract_batch(cfg, rows_per_device: int, seq_len: int, mesh) -> dict:
    """The pipeline's batch (`collate`'s dtypes) as ShapeDtypeStructs on the batch sharding."""
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = rows_per_device * batch_devices
    images = rows // 2 if rows_per_device % 2 == 0 else rows  # pairs share an image
    size, t = cfg.vision.image_size, seq_len
    shapes = {"input_ids": ((rows, t), jnp.int32), "attention_mask": ((rows, t), jnp.int32),
              "pixel_values": ((images, 3, size, size), jnp.float32),
              "labels": ((rows, t), jnp.int32), "grounding_labels": ((rows, t), jnp.int32),
              "lm_rows": ((rows,), jnp.bool_), "is_positive": ((rows,), jnp.bool_),
              "pair_index": ((rows,), jnp.int32)}
    assert set(shapes) == set(BATCH_KEYS)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s)))
            for k, (s, d) in shapes.items()}


_ITEMSIZE = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1,
             "pred": 1}
_SHAPE = re.compile(r"\b(f64|f32|s32|u32|bf16|f16|s8|u8|pred)\[([\d,]*)\]")


def _nbytes(dtype: str, dims: str) -> int:
    return _ITEMSIZE[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))


def kernel_dims(cfg, shards: int = 1) -> set[tuple[int, int]]:
    """(in, out) of the LLM's linear kernels, whole or split `shards` ways along one axis."""
    t = cfg.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    d, i = t.hidden_size, t.intermediate_size
    whole = {(d, q), (d, kv), (q, d), (d, i), (i, d)}
    return whole | {(a // shards, b) for a, b in whole} | {(a, b // shards) for a, b in whole}


def hlo_findings(hlo: str, cfg, seq_len: int, shards: int = 1) -> dict:
    """What the optimized program spends temporaries on that the state does not explain,
    read from its text: copies of donated state (kept in the JSON; not a cost, see
    `measure`), fp32 copies of 16-bit/quantized state
    (a convert of a whole state leaf at the top level), per-layer values a layer scan stacks
    for the backward (dynamic-update-slice fusions [L', ...]) that are LLM kernels [L', in,
    out] (copies of the weights) or attention scores/probabilities [..., T, T], and the
    largest collective."""
    entry = hlo[hlo.index("\nENTRY "):]
    entry = entry[:entry.index("\n}")]
    params = set(re.findall(r"^\s+(%\S+) = \S+ parameter\(\d+\)", entry, re.M))
    copies = converts = 0
    for m in re.finditer(r"^\s+%\S+ = (\w+)\[([\d,]*)\]\S* copy\((%[^,()]+)\)", entry, re.M):
        if m.group(3) in params:
            copies += _nbytes(m.group(1), m.group(2))
    for m in re.finditer(r"^\s+%\S*convert\S* = f32\[([\d,]*)\]\S* fusion\((%[^,()]+)\)",
                         entry, re.M):
        if m.group(2) in params:
            converts += _nbytes("f32", m.group(1))
    dims, layers = kernel_dims(cfg, shards), cfg.text.num_layers
    compute = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}[cfg.dtype]
    weights = scores = 0
    for m in re.finditer(r"^\s+%\S*dynamic-update-slice\S* = (\w+)\[([\d,]+)\]\S* fusion\(",
                         hlo, re.M):
        shape = tuple(int(d) for d in m.group(2).split(","))
        if shape[0] > layers:
            continue
        if len(shape) == 3 and shape[1:] in dims and m.group(1) == compute:
            # in the compute dtype: a weight as the matmul reads it (gradients of trained
            # kernels are stacked the same way, but in the fp32 parameter dtype)
            weights += _nbytes(m.group(1), m.group(2))
        elif len(shape) >= 3 and shape[-2:] == (seq_len, seq_len):
            scores += _nbytes(m.group(1), m.group(2))
    collective, biggest = "", 0
    for m in re.finditer(r"= (\(?[^=]*?\)?) (all-reduce|all-gather|reduce-scatter|all-to-all)"
                         r"(-start)?\(", hlo):
        for shape in _SHAPE.finditer(m.group(1)):
            size = _nbytes(*shape.groups())
            if size > biggest:
                biggest, collective = size, f"{m.group(2)} {shape.group(0)}"
    return {"state_copies_gib": copies / GIB, "fp32_weight_copies_gib": converts / GIB,
            "saved_weights_gib": weights / GIB, "saved_attention_gib": scores / GIB,
            "largest_collective": collective, "largest_collective_gib": biggest / GIB}


def measure(model: str, row: Row, rows_per_device: int, remat: str, seq_len: int) -> dict:
    t0 = time.perf_counter()
    cfg = model_cfg(model, row, remat)
    mesh = make_mesh(row.devices)
    tx, schedule = make_optimizer(train_settings(row))
    graphdef, state, shardings = abstract_state(cfg, row, tx, mesh)
    batch = abstract_batch(cfg, rows_per_device, seq_len, mesh)
    step = make_step_fn(graphdef, tx, LossConfig(), schedule)
    with jax.set_mesh(mesh):  # as the trainer compiles it (activations follow the mesh)
        compiled = compile_step(step, shardings, {k: v.sharding for k, v in batch.items()},
                                state, batch)
    m = compiled.memory_analysis()
    args, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes,
                              m.alias_size_in_bytes, m.temp_size_in_bytes)
    trainable = per_device_bytes(state.trainable)
    res = {
        "model": model, "row": row.name, "what": row.what, "devices": row.devices,
        "rows_per_device": rows_per_device,
        "global_rows": rows_per_device * row.devices,
        "images_per_device": batch["pixel_values"].shape[0] // row.devices,
        "seq_len": seq_len, "remat": remat,
        "trainable_params_m": round(sum(x.size for x in jax.tree.leaves(state.trainable)) / 1e6,
                                    1),
        # per device, GiB
        "frozen_gib": per_device_bytes(state.frozen) / GIB,
        "trainable_gib": trainable / GIB,
        "opt_state_gib": per_device_bytes(state.opt_state) / GIB,
        "batch_gib": per_device_bytes(batch) / GIB,
        "arguments_gib": args / GIB, "outputs_gib": out / GIB, "aliased_gib": alias / GIB,
        "temporaries_gib": temp / GIB,
        "peak_gib": (args + temp + out - alias) / GIB,
        "xla_peak_gib": getattr(m, "peak_memory_in_bytes", 0) / GIB,
        "compile_s": round(time.perf_counter() - t0, 1),
        **hlo_findings(compiled.as_text(), cfg, seq_len, row.devices),
    }
    # Temporaries = fp32 gradients of the trainable parameters + the rest (activations kept
    # for the backward, attention scores, logits, any fp32 copy of a frozen weight). Copies
    # of the donated state (`state_copies_gib`) are not counted: XLA hands the donated
    # buffers to the outputs, so a copy holds the old value instead of the argument buffer
    # (the same step without them, e.g. without the non-finite guard, has the same
    # temporaries).
    res["activations_gib"] = max(res["temporaries_gib"] - res["trainable_gib"], 0.0)
    if row.target_gib and model == "7b" and rows_per_device == 1:
        res["target_gib"] = row.target_gib
    return res


def fits(gib: float) -> str:
    return next((f"{s} GiB" for s in GPU_SIZES if gib <= s), f"> {GPU_SIZES[-1]} GiB")


def dominant(r: dict) -> str:
    parts = {"frozen weights": r["frozen_gib"],
             "trainable params + Adam moments": r["trainable_gib"] + r["opt_state_gib"],
             "gradients": r["trainable_gib"],
             "weights stacked for the backward": r["saved_weights_gib"],
             "[T, T] attention stacked for the backward": r["saved_attention_gib"],
             "other activations/temporaries": r["activations_gib"] - r["saved_weights_gib"]
             - r["saved_attention_gib"]}
    name = max(parts, key=parts.get)
    return f"{name} ({parts[name]:.1f} GiB)"


def verdict(r: dict) -> str:
    if "target_gib" not in r:
        return ""
    over = r["peak_gib"] - r["target_gib"]
    if over <= 0:
        return f"fits {r['target_gib']:.0f} GiB ({-over:.1f} spare)"
    return f"**over {r['target_gib']:.0f} GiB by {over:.1f}** (most: {dominant(r)})"


def notable(r: dict) -> str:
    """The temporaries that have a name: fp32 gradients, weights and [T, T] attention
    stacked for the backward, fp32 copies of frozen weights."""
    parts = [f"grads {r['trainable_gib']:.2f}"]
    for key, label in (("saved_weights_gib", "weight copy"),
                       ("saved_attention_gib", "T×T attn"),
                       ("fp32_weight_copies_gib", "f32 lm_head/weights")):
        if r[key] >= 0.01:
            parts.append(f"{label} {r[key]:.2f}")
    return ", ".join(parts)


def table(results: list[dict]) -> str:
    head = ("| model | setup | rows/device (global) | remat | frozen weights | trainable + "
            "Adam | temporaries | of which | **peak/device** | smallest card | target (7B, "
            "batch 1) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['what']} | {r['rows_per_device']} ({r['global_rows']}) | "
            f"{r['remat']} | {r['frozen_gib']:.2f} | "
            f"{r['trainable_gib']:.2f} + {r['opt_state_gib']:.2f} | "
            f"{r['temporaries_gib']:.2f} | {notable(r)} | "
            f"**{r['peak_gib']:.2f}** | {fits(r['peak_gib'])} | {verdict(r)} |")
    return "\n".join(lines)


def parse_extra(text: str) -> list[tuple[str, str, int, str]]:
    """"13b:lora-int8,lora-nf4:1:full;..." -> (model, row, batch, remat) cells."""
    cells = []
    for part in (p for p in text.split(";") if p.strip()):
        models, rows, batches, remats = part.strip().split(":")
        cells += [(m, r, int(b), x) for m in models.split(",") for r in rows.split(",")
                  for b in batches.split(",") for x in remats.split(",")]
    return cells


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--rows", default=None, help=f"comma list of {list(ROWS)}")
    p.add_argument("--batches", default=None, help="rows per device, comma list")
    p.add_argument("--remat", default=None, help="comma list of none,full,dots")
    p.add_argument("--seq-len", type=int, default=LLAVA_T)
    p.add_argument("--out", default=OUT_JSON)
    args = p.parse_args(argv)

    picked = any(getattr(args, k) is not None for k in ("models", "rows", "batches", "remat"))
    if picked:  # the product of what was asked (defaults for the rest: the whole matrix)
        models = (args.models or "7b").split(",")
        rows = (args.rows or ",".join(ROWS)).split(",")
        batches = [int(b) for b in (args.batches or "1,16").split(",")]
        remats = (args.remat or "none,full").split(",")
        cells = [(m, r, b, x) for m in models for r in rows for b in batches for x in remats]
    else:  # the default subset (~6 min on 2 cores): every 7B row at batch 1 and 16 with
           # remat full, remat none once (its cost does not depend on the row's weights),
           # and the 13B's quantized LoRA rows at batch 1
        cells = [("7b", r, b, "full") for r in ROWS for b in (1, 16)]
        cells += [("7b", "lora-nf4", 1, "none")]
        cells += parse_extra(DEFAULT["extra"])
    for m, r, _, x in cells:
        if m not in MODELS or r not in ROWS or x not in ("none", "full", "dots"):
            raise SystemExit(f"unknown model/row/remat {m}/{r}/{x}: models {sorted(MODELS)}, "
                             f"rows {list(ROWS)}, remat none,full,dots")

    model_name, features = cpu_info()
    print(describe())
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} "
          f"devices; T = {args.seq_len} (LLaVA-1.5 model_max_length, 576 image tokens included)")
    print("XLA:CPU memory analysis is a proxy for the GPU's (its compiler assigns buffers "
          "differently); peak = arguments + temporaries + outputs - aliased (donated state).")
    t_all = time.perf_counter()
    results = []
    for m, r, b, x in cells:
        res = measure(m, ROWS[r], b, x, args.seq_len)
        results.append(res)
        print(f"  {m} {r:9s} rows/device {b:2d} remat {x:4s}: args {res['arguments_gib']:6.2f}"
              f" temps {res['temporaries_gib']:6.2f} out-alias "
              f"{res['outputs_gib'] - res['aliased_gib']:5.2f} -> peak {res['peak_gib']:6.2f} "
              f"GiB/device (compiled in {res['compile_s']} s)", flush=True)
        extra = [f"fp32 gradients {res['trainable_gib']:.2f} GiB"]
        if res["fp32_weight_copies_gib"] >= 0.01:
            extra.append(f"fp32 copies of frozen weights {res['fp32_weight_copies_gib']:.2f} GiB")
        if res["saved_weights_gib"] >= 0.01:
            extra.append(f"LLM kernels stacked for the backward (a weight copy) "
                         f"{res['saved_weights_gib']:.2f} GiB")
        if res["saved_attention_gib"] >= 0.01:
            extra.append(f"[T, T] attention scores/probabilities stacked for the backward "
                         f"{res['saved_attention_gib']:.2f} GiB")
        if res["largest_collective"]:
            extra.append(f"largest collective {res['largest_collective']} "
                         f"({res['largest_collective_gib']:.2f} GiB)")
        print("      in temporaries: " + "; ".join(extra), flush=True)
    wall = time.perf_counter() - t_all

    print(f"\n### Train-step memory per device (XLA:CPU AOT, {model_name})\n")
    print(table(results))
    print("\nGiB per device. frozen weights: bf16 (int8/nf4 codes + scales for the quantized "
          "LLM linears); trainable + Adam: fp32 parameters trained + AdamW's two moments; "
          "temporaries: everything else the step holds (activations kept for the backward, "
          "logits, ...); of which, read from the optimized HLO: fp32 gradients, per-layer "
          "weights (weight copy) and [T, T] attention scores/probabilities (T×T attn) a layer "
          "scan stacks for the backward, fp32 copies of frozen weights (lm_head). "
          "peak = arguments + temporaries + outputs - aliased.")
    print("Anchors: " + "; ".join(ANCHORS) + ".")
    for r in results:
        shape = re.match(r"\S+ \w+\[(\d+),", r["largest_collective"])
        if r["devices"] > 1 and shape and int(shape.group(1)) == r["global_rows"]:
            print(f"- {r['model']} {r['row']} batch {r['rows_per_device']} remat {r['remat']}: "
                  f"every device holds "
                  f"values of the whole global batch ({r['largest_collective']}, "
                  f"{r['largest_collective_gib']:.2f} GiB): the batch does not stay sharded "
                  "over fsdp through the layers and lm_head")
        v = verdict(r)
        if v.startswith("**over"):
            print(f"- {r['model']} {r['row']} batch {r['rows_per_device']} remat {r['remat']}: "
                  f"{v.replace('**', '')}")
    if not picked:
        print("\nDefault subset. The whole matrix (both models, every row, batches 1 and 16, "
              "remat none and full):\n  .venv/bin/python bench/memory_7b.py --models 7b,13b "
              "--rows full,lora-bf16,lora-int8,lora-nf4 --batches 1,16 --remat none,full")
    print(f"\n{len(results)} compiles in {wall:.0f} s")
    out = {"machine": {"cpu": model_name, "cpu_features": features},
           "jax": jax.__version__, "seq_len": args.seq_len, "wall_s": round(wall, 1),
           "command": " ".join(sys.argv), "results": results}
    save_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
