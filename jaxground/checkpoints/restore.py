"""One way into a model: `restore_model` reads a converted dir or a training workdir.

Every array is read straight onto its final sharding (the mesh's, by the logical-axis
table) in its final dtype: no host copy of the whole model, no single-device detour, so a
model that fits the mesh restores on it. Train (`model.init_from`), evaluate, export, the
demo and `jaxground.load` all come through here.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxground.checkpoints.converted import read_config, restore_params_for
from jaxground.checkpoints.workdir import is_workdir, restore_trained_params
from jaxground.models.adapters import fresh_lora, has_lora, merge_lora, quantize_params
from jaxground.models.config import LlavaConfig, LoraConfig, QuantConfig, dtype_of
from jaxground.models.llava import LlavaModel, abstract_model, fresh_grounding_heads
from jaxground.parallel.sharding import param_shardings
from jaxground.utils.trees import merge


def restore_params_tree(path: str, *, config: LlavaConfig | None = None, step: int | None = None,
                        dtype: str | Any = None, mesh=None, seed: int = 0,
                        merge_adapters: bool = False) -> tuple[LlavaConfig, dict]:
    """(config, nested parameters) that `restore_model` builds its model from; the config
    is the one given (or saved), without `lora` when `merge_adapters` folded them in.

    A LoRA / quantized model is built from full base weights: adapters come from the
    workdir (fresh ones, seeded, for a config that adds them to a checkpoint without), and
    matching kernels are quantized after reading."""
    saved = read_config(path)
    config = saved if config is None else config
    if dtype is not None:
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
        dtype_of(name)  # an unknown name fails here, naming the choices
        config = config.replace(param_dtype=name, dtype=name)
    full_weights = config.replace(quant=QuantConfig())  # quantized after reading
    if is_workdir(path):
        if config.grounding != saved.grounding:
            raise ValueError(f"{path} was trained with {saved.grounding.type} heads on layers "
                             f"{list(saved.grounded_layers)}; restore it with its own grounding "
                             "config (start other heads from it with model.init_from)")
        params = restore_trained_params(path, full_weights, step, mesh, cast=dtype is not None)
    else:
        if step is not None:
            raise ValueError(f"{path} is a converted checkpoint dir: it has no steps "
                             f"(step={step})")
        params = restore_params_for(path, config.base, mesh)
    if config.lora.enabled and not has_lora(params):  # a LoRA run starts: fresh adapters
        adapters = fresh_lora(params, config.lora, seed, dtype_of(config.param_dtype))
        params = merge(params, jax.device_put(adapters, param_shardings(adapters, mesh)))
    if merge_adapters and config.lora.enabled:
        params = merge_lora(params, config.lora)
        config = config.replace(lora=LoraConfig())
    if config.quant.enabled:
        params = quantize_params(params, config.quant)
        params = jax.device_put(params, param_shardings(params, mesh))
    if config.grounded_layers and "grounding_heads" not in params.get("language_model", {}):
        # Heads of another grounding config (or none stored): start them fresh, seeded.
        heads = fresh_grounding_heads(config, seed)
        params["language_model"].update(jax.device_put(
            heads, param_shardings(heads, mesh))["language_model"])
    return config, params


LAYOUTS = ("stacked", "unrolled")


def restore_model(path: str, *, config: LlavaConfig | None = None, step: int | None = None,
                  dtype: str | Any = None, mesh=None, seed: int = 0,
                  layout: str = "stacked", merge_adapters: bool = False) -> LlavaModel:
    """The NNX model stored at `path`: a converted checkpoint dir, or a training workdir
    (its latest checkpoint, or `step`).

    config  the model to build (default: the one saved at `path`); a converted dir may be
            restored into another grounding config, whose heads start fresh (`seed`)
    dtype   "float32", "bfloat16", ... : parameter and compute dtype, cast while reading
            (default: as saved; a workdir's frozen weights may be bf16 beside fp32 ones)
    mesh    a `jax.sharding.Mesh`: every parameter is restored onto its sharding there
            (default: the first local device)
    layout  "stacked" (decoder layers as [L, ...] arrays, run by a scan: training, scoring)
            or "unrolled" (one module per layer: faster decoding, same results; see
            `LlamaModel.unroll`)
    merge_adapters  fold a LoRA model's adapters into its kernels (before quantizing, if
            the config quantizes): a plain model with the same outputs
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint dir {path} does not exist")
    config, params = restore_params_tree(path, config=config, step=step, dtype=dtype,
                                         mesh=mesh, seed=seed, merge_adapters=merge_adapters)
    graphdef, state = nnx.split(abstract_model(config))
    nnx.replace_by_pure_dict(state, params)
    del params
    model = nnx.merge(graphdef, state)
    del state
    if layout == "unrolled":
        model.language_model.unroll()
    return model


def load(path: str, dtype: str | Any = None, step: int | None = None, mesh=None,
         layout: str = "stacked", merge: bool = False) -> LlavaModel:
    """`jaxground.load`: `restore_model` with the public argument order (`merge`: fold a
    LoRA workdir's adapters into the weights)."""
    return restore_model(path, dtype=dtype, step=step, mesh=mesh, layout=layout,
                         merge_adapters=merge)
