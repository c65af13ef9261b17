"""Conversion between HF LLaVA checkpoint dirs and jaxground checkpoints.

`hf_to_jaxground` streams tensors one at a time into preallocated arrays of the target dtype
(never two copies of the model), validating every key and shape from the file headers before
any data is read. `jaxground_to_hf` writes safetensors shards + `config.json` in the Hub
layout, which `LlavaForConditionalGeneration.from_pretrained` loads in every transformers
version (a LoRA run's adapters merged in); `jaxground_to_peft` writes a LoRA run as a PEFT
adapter dir instead. Both map names with `hf_weights`' one table.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np

from jaxground.checkpoints import converted
from jaxground.checkpoints.converted import read_config
from jaxground.checkpoints.workdir import trained_paths
from jaxground.checkpoints.hf_weights import canonical_key, hf_tensors, hub_layout, nnx_target
from jaxground.models.adapters import LORA_LEAVES
from jaxground.models.config import (ConfigError, GroundingConfig, LlavaConfig, QuantConfig,
                                     dtype_of)
from jaxground.models.llava import abstract_model, fresh_grounding_heads, param_dict
from jaxground.utils.trees import flatten
from jaxground.checkpoints.safetensors_io import (HEADS_FILE, SafetensorsFile, iter_checkpoint_files,
                                      write_safetensors)

HEADS_PREFIX = ("language_model", "grounding_heads")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class ConversionError(ValueError):
    """The checkpoint does not fit the model its config describes; the message lists how."""


@dataclasses.dataclass
class _Source:
    """One tensor in a checkpoint file: enough to validate it before reading it."""

    file: str
    key: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    # rows [start, stop) of the first axis; None where only whole reads are possible
    read_rows: Callable[[int, int], np.ndarray] | None = None


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"HF checkpoint dir {hf_dir} does not exist")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: an HF LLaVA checkpoint dir needs its "
                                "config.json (LlavaConfig)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e


def _safetensors_sources(hf_dir: str) -> Iterator[_Source]:
    for st in iter_checkpoint_files(hf_dir):
        for key in st.keys():
            yield _Source(st.path, key, st.shape(key), lambda st=st, key=key: st.read(key),
                          lambda a, b, st=st, key=key: st.read(key, (a, b)))


def _pickle_sources(files: list[str]) -> Iterator[_Source]:
    import torch  # only on the explicit --allow-pickle path

    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for key, t in state.items():
            def read(t=t):
                t = t.detach()
                if t.dtype == torch.bfloat16:
                    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                return t.numpy()
            yield _Source(path, key, tuple(t.shape), read)


def tensor_sources(hf_dir: str, allow_pickle: bool = False) -> list[_Source]:
    has_st = any(os.path.basename(f) != HEADS_FILE
                 for f in glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if has_st:
        return list(_safetensors_sources(hf_dir))
    pickles = sorted(glob.glob(os.path.join(hf_dir, "*.bin")) + glob.glob(
        os.path.join(hf_dir, "*.pt")) + glob.glob(os.path.join(hf_dir, "*.pth")))
    if pickles and not allow_pickle:
        raise ConversionError(
            f"{hf_dir} holds only pickled weights ({', '.join(map(os.path.basename, pickles))}); "
            "unpickling can execute arbitrary code, so they are refused. Convert them to "
            "safetensors, or pass --allow-pickle if you trust the source.")
    if pickles:
        return list(_pickle_sources(pickles))
    raise FileNotFoundError(f"no weights in {hf_dir}: expected model.safetensors, "
                            "sharded *.safetensors with model.safetensors.index.json, "
                            "or (with --allow-pickle) pytorch_model*.bin")


def _plan(sources: list[_Source], expected: dict[tuple[str, ...], tuple[int, ...]],
          tie_word_embeddings: bool):
    """Matches every checkpoint tensor to a parameter slot; raises listing all problems."""
    plan, filled = [], {}
    unexpected, wrong_shape, duplicate = [], [], []
    for src in sources:
        canon = canonical_key(src.key)
        if canon is None or (tie_word_embeddings and canon == "lm_head.weight"):
            continue  # buffers, or an lm_head tied to the embedding
        target = nnx_target(canon)
        if target is None or target.path not in expected:
            unexpected.append(f"{src.key} (in {os.path.basename(src.file)})")
            continue
        full = expected[target.path]
        want = full[1:] if target.layer is not None else full
        if target.layer is not None and not 0 <= target.layer < full[0]:
            unexpected.append(f"{src.key} (layer {target.layer}, but the config has "
                              f"{full[0]} layers)")
            continue
        if tuple(src.shape) != target.hf_shape(want):
            wrong_shape.append(f"{src.key}: checkpoint {list(src.shape)}, config.json implies "
                               f"{list(target.hf_shape(want))}")
            continue
        slot = (target.path, target.layer)
        if slot in filled:
            duplicate.append(f"{src.key} and {filled[slot]} (both -> {'.'.join(target.path)})")
            continue
        filled[slot] = src.key
        plan.append((src, target))
    missing = []
    for path, shape in expected.items():
        dotted = ".".join(path)
        stacked = _is_stacked(path)
        layers = range(shape[0]) if stacked else [None]
        absent = [l for l in layers if (path, l) not in filled]
        if absent:
            missing.append(dotted + (f" (layers {_ranges(absent)})" if stacked else ""))
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrongly shaped", wrong_shape), ("duplicated", duplicate)):
        if items:
            shown = "\n    ".join(items[:25])
            more = f"\n    ... and {len(items) - 25} more" if len(items) > 25 else ""
            problems.append(f"  {len(items)} {title} tensor(s):\n    {shown}{more}")
    if problems:
        raise ConversionError("checkpoint does not match its config.json:\n" +
                              "\n".join(problems))
    return plan


def _is_stacked(path: tuple[str, ...]) -> bool:
    return "layers" in path


def _ranges(xs: list[int]) -> str:
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def load_hf_params(hf_dir: str, config: LlavaConfig, allow_pickle: bool = False
                   ) -> dict[tuple[str, ...], np.ndarray]:
    """Flat {NNX path: array in config.param_dtype} read tensor by tensor from `hf_dir`."""
    abstract = flatten(param_dict(abstract_model(config)))
    heads = grounding_heads(hf_dir, config)
    expected = {p: tuple(a.shape) for p, a in abstract.items() if p not in heads}
    plan = _plan(tensor_sources(hf_dir, allow_pickle), expected, config.tie_word_embeddings)
    # np.empty reserves address space only; pages become resident as tensors land in them.
    params = {p: np.empty(a.shape, np.dtype(a.dtype)) for p, a in abstract.items()
              if p not in heads}
    params.update(heads)
    for src, target in plan:
        dest = params[target.path]
        _fill(dest[target.layer] if target.layer is not None else dest, src, target)
    return params


_BLOCK_BYTES = 16 << 20  # the most a tensor read holds beyond the parameters themselves


def _fill(dest: np.ndarray, src: _Source, target) -> None:
    """Copies `src` into its slot `dest` (a view), casting to dest's dtype in place.

    Large tensors are read in blocks of rows of their first (HF) axis: converting holds the
    parameters plus at most `_BLOCK_BYTES`, not plus the largest tensor (the embedding).
    """
    shape = tuple(src.shape)
    row_bytes = int(np.prod(shape[1:])) * max(dest.itemsize, 4) if shape else 0
    if src.read_rows is None or not shape or shape[0] * row_bytes <= _BLOCK_BYTES:
        dest[...] = target.to_nnx(src.read())
        return
    # Where the HF first axis lands in the NNX layout (to_nnx only transposes): probe it on
    # a view that takes no memory and whose only non-zero stride is the first axis.
    probe = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape,
                                            (1,) + (0,) * (len(shape) - 1))
    axis = target.to_nnx(probe).strides.index(1)
    step = max(1, _BLOCK_BYTES // row_bytes)
    index = [slice(None)] * dest.ndim
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        index[axis] = slice(start, stop)
        dest[tuple(index)] = target.to_nnx(src.read_rows(start, stop))


def grounding_heads(hf_dir: str, config: LlavaConfig) -> dict[tuple[str, ...], np.ndarray]:
    """Head parameters: from `grounding_heads.safetensors` (written by `jaxground_to_hf`)
    when present, else freshly initialised (HF checkpoints have no heads)."""
    fresh = {p: np.asarray(v) for p, v in flatten(fresh_grounding_heads(config)).items()}
    if not fresh:
        return {}
    path = os.path.join(hf_dir, HEADS_FILE)
    if not os.path.exists(path):
        return fresh
    st = SafetensorsFile(path)
    saved = {tuple(k.split(".")): k for k in st.keys()}
    if set(saved) != set(fresh) or any(st.shape(saved[p]) != fresh[p].shape for p in fresh):
        raise ConversionError(f"{path} holds heads for another grounding config than "
                              f"{config.grounding}; pass the matching grounding options or "
                              "remove the file to start from fresh heads")
    return {p: st.read(saved[p]).astype(fresh[p].dtype) for p in fresh}


# What an HF dir needs beside its weights to be used (training workdirs hold other files).
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                   "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
                   "generation_config.json")


def processor_sources(ckpt_dir: str) -> list[str]:
    """Where a checkpoint's processor files are: the dir itself, then (a workdir that
    fine-tuned a converted model) its `model.init_from`."""
    from jaxground.checkpoints.workdir import init_from_of, is_workdir

    init_from = init_from_of(ckpt_dir) if is_workdir(ckpt_dir) else ""
    return [ckpt_dir] + ([init_from] if init_from and os.path.isdir(init_from) else [])


def copy_side_files(hf_dir: str, out_dir: str, exclude: tuple[str, ...] = (),
                    only: tuple[str, ...] | None = None) -> list[str]:
    """Copies tokenizer / processor / generation files: everything but weights and the
    names in `exclude`, or only the names in `only`."""
    copied = []
    for name in sorted(os.listdir(hf_dir)):
        src = os.path.join(hf_dir, name)
        if (os.path.isfile(src) and not name.endswith(WEIGHT_SUFFIXES)
                and name not in WEIGHT_INDEXES and name not in exclude
                and (only is None or name in only)):
            shutil.copy2(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def hf_to_jaxground(hf_dir: str, out_dir: str, dtype: str | None = None,
                    allow_pickle: bool = False, grounding: GroundingConfig | None = None
                    ) -> LlavaConfig:
    """Converts an HF LLaVA dir to a jaxground checkpoint dir; returns the model config.

    `dtype` sets both the stored parameter dtype and the compute dtype (default: float32).
    `grounding` sets the heads (default: the config saved beside exported heads, else
    `GroundingConfig()`: similarity heads on the last four layers, freshly initialised).
    """
    overrides = {"param_dtype": dtype, "dtype": dtype} if dtype else {}
    grounding = grounding or saved_grounding_config(hf_dir) or GroundingConfig()
    config = LlavaConfig.from_hf(read_hf_config(hf_dir), grounding=grounding, **overrides)
    params = load_hf_params(hf_dir, config, allow_pickle)
    os.makedirs(out_dir, exist_ok=True)
    copy_side_files(hf_dir, out_dir)
    converted.save_params(out_dir, config, params)
    return config


def jaxground_to_hf(ckpt_dir: str, out_dir: str, max_shard_bytes: int = 5 << 30,
                    step: int | None = None) -> list[str]:
    """Writes `config.json` + safetensors shards (+ index when sharded); returns file names.

    `ckpt_dir`: a converted dir, or a training workdir (its latest checkpoint, or `step`;
    the weights it did not save come from its `model.init_from`). A LoRA / quantized run is
    written as full weights: adapters folded into the base's (never dequantized) kernels,
    in the base's dtype.
    """
    config, params = export_params(ckpt_dir, step, merge_adapters=True)
    os.makedirs(out_dir, exist_ok=True)
    heads = _write_heads(out_dir, config, params)
    tensors = list(hf_tensors(params, hub_layout))
    shards, current, size = [], [], 0
    for name, arr in tensors:
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, arr))
        size += arr.nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        total += write_safetensors(os.path.join(out_dir, name), shard)
        weight_map.update({k: name for k, _ in shard})
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    _copy_processor_files(ckpt_dir, out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_hf(), f, indent=2)
    return names + heads + ["config.json"]


def export_params(ckpt_dir: str, step: int | None = None, merge_adapters: bool = True
                  ) -> tuple[LlavaConfig, dict[tuple[str, ...], np.ndarray]]:
    """(config, flat host arrays) to export. A LoRA / quantized run is read without
    quantization (its base's full weights), with its adapters folded in when
    `merge_adapters` (else kept as `lora_a` / `lora_b` leaves), and written in the base's
    dtype (its adapters and heads keep theirs)."""
    from jaxground.checkpoints.restore import restore_params_tree

    saved = read_config(ckpt_dir)
    base_dtype = None
    if saved.lora.enabled or saved.quant.enabled:
        base_dtype = read_config(base_checkpoint(ckpt_dir, saved)).param_dtype
    config, tree = restore_params_tree(ckpt_dir, config=saved.replace(quant=QuantConfig()),
                                       step=step, merge_adapters=merge_adapters)
    params = {p: np.asarray(v) for p, v in flatten(tree).items()}
    del tree
    if base_dtype is not None:
        dtype = np.dtype(dtype_of(base_dtype))
        for p, v in params.items():
            if p[:2] != HEADS_PREFIX and p[-1] not in LORA_LEAVES and v.dtype != dtype:
                params[p] = v.astype(dtype)
        config = config.replace(param_dtype=base_dtype)
    return config, params


def base_checkpoint(ckpt_dir: str, config: LlavaConfig) -> str:
    """The base a LoRA / quantized run adapts (its `model.init_from`, resolved); raises
    naming the field when the run's config does not lead to one."""
    from jaxground.checkpoints.workdir import TRAIN_CONFIG_FILE, init_from_of, is_workdir

    what = "LoRA adapters" if config.lora.enabled else f"{config.quant.mode} quantization"
    init_from = init_from_of(ckpt_dir) if is_workdir(ckpt_dir) else ""
    if not init_from:
        raise ValueError(f"{ckpt_dir} holds {what} but no base: model.init_from is not set in "
                         f"its {TRAIN_CONFIG_FILE}")
    if not os.path.isdir(init_from):
        raise FileNotFoundError(f"{ckpt_dir}: its base, model.init_from={init_from} (in "
                                f"{TRAIN_CONFIG_FILE}), does not exist")
    return init_from


def _write_heads(out_dir: str, config: LlavaConfig, params: dict) -> list[str]:
    """Pops the grounding heads out of `params` into `HEADS_FILE` (HF's LLaVA has no heads:
    they travel in a side file HF ignores); returns [HEADS_FILE], or [] without heads."""
    heads = {p: params.pop(p) for p in list(params) if p[:2] == HEADS_PREFIX}
    if not heads:
        return []
    write_safetensors(os.path.join(out_dir, HEADS_FILE),
                      [(".".join(p), v) for p, v in sorted(heads.items())],
                      {"jaxground_grounding": json.dumps(config.to_dict()["grounding"])})
    return [HEADS_FILE]


def _copy_processor_files(ckpt_dir: str, out_dir: str) -> None:
    """Tokenizer / processor files travel along (never over what `out_dir` already holds)."""
    for source in processor_sources(ckpt_dir):
        copy_side_files(source, out_dir, only=PROCESSOR_FILES,
                        exclude=tuple(os.listdir(out_dir)))


# ---- PEFT adapters -----------------------------------------------------------------------------
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model


def peft_layout(canonical: str) -> str:
    """Canonical key -> the module path in `LlavaForConditionalGeneration` (transformers >=
    4.52), which PEFT's adapter keys and `modules_to_save` name."""
    head, _, rest = canonical.partition(".")
    return {"text": "model.language_model.", "vision": _vision_module(),
            "projector": "model.multi_modal_projector.", "lm_head": "lm_head."}[head] + rest


@functools.cache
def _vision_module() -> str:
    """The installed transformers' CLIP module path (it lost `vision_model.` in 5.6)."""
    import transformers

    major_minor = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "model.vision_tower." + ("" if major_minor >= (5, 6) else "vision_model.")


def jaxground_to_peft(ckpt_dir: str, out_dir: str, step: int | None = None,
                      base_name: str | None = None) -> list[str]:
    """Writes a LoRA run as a PEFT LoRA adapter dir: `adapter_config.json` +
    `adapter_model.safetensors` (+ the heads' side file), which
    `peft.PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(BASE), out)`
    loads. BASE: the run's base exported to HF; `base_name` (default: the base checkpoint's
    path) is recorded as `base_model_name_or_path`.

    Adapters A [in, r], B [r, out] per layer become PEFT's `lora_A.weight` [r, in] and
    `lora_B.weight` [out, r] (PEFT's scale is lora_alpha / r, as ours); other parameters
    the run trained (LLaVA's recipe: the projector) travel whole as `modules_to_save`.
    """
    saved = read_config(ckpt_dir)
    if not saved.lora.enabled:
        raise ValueError(f"{ckpt_dir} has no adapters to export (config.model.lora.enabled is "
                         "off); export its full weights without --adapter")
    base = base_checkpoint(ckpt_dir, saved)
    config, params = export_params(ckpt_dir, step, merge_adapters=False)
    trained = trained_paths(ckpt_dir, step)
    os.makedirs(out_dir, exist_ok=True)
    heads = _write_heads(out_dir, config, params)
    adapted = {p[:-1] for p in params if p[-1] == "lora_a"}
    whole = {p[:-1] for p in trained if p[-1] not in LORA_LEAVES and p[:2] != HEADS_PREFIX}
    if adapted & whole:
        raise ValueError(f"{ckpt_dir} trained both adapters and the full weights of "
                         f"{', '.join(sorted('/'.join(m) for m in adapted & whole))}, which "
                         "PEFT cannot express; export merged full weights without --adapter")
    tensors = []
    for module in sorted(adapted):
        for leaf, peft_name in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            # An adapter matrix maps like the kernel it adapts: [.., in, r] -> [r, in] per layer.
            for key, arr in hf_tensors({module + ("kernel",): params[module + (leaf,)]},
                                       peft_layout):
                tensors.append((f"{PEFT_PREFIX}{key.removesuffix('.weight')}."
                                f"{peft_name}.weight", arr))
    targets = sorted({_any_layer(k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0])
                      for k, _ in tensors})
    modules = list(hf_tensors({p: v for p, v in params.items() if p[:-1] in whole},
                              peft_layout))
    tensors += [(PEFT_PREFIX + k, v) for k, v in modules]
    write_safetensors(os.path.join(out_dir, ADAPTER_WEIGHTS), tensors)
    alpha = saved.lora.alpha
    adapter_config = {
        "peft_type": "LORA", "task_type": None, "r": saved.lora.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        # PEFT fullmatches a string against each module's path: exactly the adapted ones.
        "target_modules": "|".join(targets),
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k, _ in modules}) or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_name or os.path.abspath(base),
    }
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config, f, indent=2)
    _copy_processor_files(ckpt_dir, out_dir)
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS] + heads


def _any_layer(module: str) -> str:
    """A module path as a regex matching it in every layer: `a.3.b` -> `a\\.\\d+\\.b`."""
    return r"\.\d+\.".join(re.escape(part) for part in re.split(r"\.\d+\.", module))


def saved_grounding_config(hf_dir: str) -> GroundingConfig | None:
    path = os.path.join(hf_dir, HEADS_FILE)
    if not os.path.exists(path):
        return None
    d = json.loads(SafetensorsFile(path).metadata.get("jaxground_grounding", "{}"))
    if isinstance(d.get("layers"), list):
        d["layers"] = tuple(d["layers"])
    return GroundingConfig(**d)
