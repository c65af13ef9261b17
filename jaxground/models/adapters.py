"""LoRA adapters and quantized frozen weights on a model's linear layers.

Both are chosen by a regex over linear-layer paths ("language_model/layers/self_attn/q_proj"
for the stacked decoder's q projection, whose kernel is [L, in, out]) and applied in two
places that must agree:

- on modules (`attach_lora`, `quantize_linears`): how `LlavaModel` builds a model of a
  config with `lora` / `quant` (also abstractly, for restore targets and AOT compiles);
- on nested parameter dicts (`fresh_lora`, `merge_lora`, `quantize_params`): how restore
  turns base weights (a converted dir, a base run) into that model's arrays, and how export
  folds adapters back into full weights.

A LoRA run trains and saves only the adapters (and whatever else it trains); the base is
always read from `model.init_from` and quantized again at load, which is deterministic.
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxground.models.config import ConfigError, LoraConfig, QuantConfig
from jaxground.models.ops import Linear, QuantizedWeight
from jaxground.models.quant import quantize_layers
from jaxground.utils.trees import path_string

LORA_LEAVES = ("lora_a", "lora_b")


# ---- modules ---------------------------------------------------------------------------------
def linear_layers(model: nnx.Module) -> Iterator[tuple[str, Linear]]:
    """(path, module) of every linear layer (a stacked layer counts once)."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            yield path_string(path), node


def _matching(model: nnx.Module, regex: str, field: str) -> list[tuple[str, Linear]]:
    pattern = re.compile(regex)
    found = [(p, m) for p, m in linear_layers(model) if pattern.search(p)]
    if not found:
        names = sorted({re.sub(r"/\d+(/|$)", r"/*\1", p) for p, _ in linear_layers(model)})
        raise ConfigError(f"{field}={regex!r} matches no linear layer; the model's linear "
                          f"layers are: {', '.join(names)}")
    return found


def lora_init(key, kernel_shape, rank: int, dtype):
    """PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)), B = 0.
    Shapes: A [..., in, r], B [..., r, out] for a kernel [..., in, out]."""
    *lead, n_in, n_out = kernel_shape
    bound = n_in ** -0.5
    a = jax.random.uniform(key, (*lead, n_in, rank), jnp.float32, -bound, bound)
    return a.astype(dtype), jnp.zeros((*lead, rank, n_out), dtype)


def attach_lora(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> None:
    """Gives every linear layer matching `cfg.targets` a fresh adapter."""
    for _, linear in _matching(model, cfg.targets, "lora.targets"):
        a, b = lora_init(rngs.params(), linear.kernel.shape, cfg.rank, linear.param_dtype)
        linear.lora_a, linear.lora_b = nnx.Param(a), nnx.Param(b)
        linear.lora_scale = cfg.scale


def quantize_linears(model: nnx.Module, cfg: QuantConfig) -> None:
    """Replaces the kernel of every linear layer matching `cfg.targets` by its quantized
    codes and scales."""
    for _, linear in _matching(model, cfg.targets, "quant.targets"):
        kernel = linear.kernel[...]
        codes, scale = quantize_layers(kernel, cfg.mode, cfg.group_for(kernel.shape[-2]))
        del linear.kernel
        linear.kernel_q, linear.kernel_scale = QuantizedWeight(codes), QuantizedWeight(scale)
        linear.quant_mode = cfg.mode


# ---- parameter dicts -------------------------------------------------------------------------
def _linear_dicts(params: dict, regex: str, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """(path, dict) of every nested dict holding a linear layer's leaves whose path matches."""
    for name, value in params.items():
        if not isinstance(value, dict):
            continue
        path = f"{prefix}/{name}" if prefix else str(name)
        if ("kernel" in value or "kernel_q" in value) and re.search(regex, path):
            yield path, value
        yield from _linear_dicts(value, regex, path)


def has_lora(params: dict) -> bool:
    return any("lora_a" in d for _, d in _linear_dicts(params, ""))


def fresh_lora(params: dict, cfg: LoraConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """{path: {"lora_a", "lora_b"}} nested like `params`: new adapters in `dtype` (the
    model's parameter dtype: a bf16 base still trains fp32 adapters) for the matching
    linear layers, each seeded by `seed` and its path, so any process draws the same."""
    out: dict[str, Any] = {}
    for path, linear in _linear_dicts(params, cfg.targets):
        kernel = linear["kernel"]
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))
        a, b = lora_init(key, kernel.shape, cfg.rank, dtype)
        node = out
        for k in path.split("/"):
            node = node.setdefault(k, {})
        node.update(lora_a=a, lora_b=b)
    if not out:
        raise ConfigError(f"lora.targets={cfg.targets!r} matches no linear layer")
    return out


def merge_lora(params: dict, cfg: LoraConfig) -> dict:
    """Folds every adapter into its kernel, in place: W + scale * A @ B in fp32, cast back
    to W's dtype; the adapters are removed. Returns `params`."""
    for _, linear in _linear_dicts(params, ""):
        if "lora_a" not in linear:
            continue
        if "kernel" not in linear:
            raise ValueError("cannot merge an adapter into a quantized kernel; restore the "
                             "model without quantization (its base weights) to merge")
        a, b = linear.pop("lora_a"), linear.pop("lora_b")
        w = linear["kernel"]
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        linear["kernel"] = (w.astype(jnp.float32) + cfg.scale * delta).astype(w.dtype)
    return params


def quantize_params(params: dict, cfg: QuantConfig) -> dict:
    """Replaces, in place, each matching kernel by its codes and scales, releasing the full
    kernel as soon as it is quantized (the peak is one layer's fp32 temporaries more). The
    caller places the new leaves on their shardings. Returns `params`."""
    for _, linear in _linear_dicts(params, cfg.targets):
        kernel = linear.pop("kernel")
        codes, scale = quantize_layers(kernel, cfg.mode, cfg.group_for(kernel.shape[-2]))
        del kernel
        linear.update(kernel_q=codes, kernel_scale=scale)
    return params
