"""jaxground checkpoint dirs: our model config (JSON) + an Orbax checkpoint of the parameters.

Layout of a converted checkpoint dir:
  jaxground_config.json   the LlavaConfig
  params/                 Orbax (PyTree) checkpoint of the nested parameter dict
  tokenizer*, preprocessor_config.json, ...   copied from the HF dir for `load_processor`
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxground.models.config import LlavaConfig, dtype_of
from jaxground.models.llava import LlavaModel, abstract_model, param_dict

CONFIG_FILE = "jaxground_config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it should restore into."""


def _nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        node = nested
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return nested


def save_params(out_dir: str, config: LlavaConfig, params: dict) -> None:
    """Writes config + parameters. `params`: nested dict, or flat {path tuple: array}."""
    if params and isinstance(next(iter(params)), tuple):
        params = _nest(params)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with ocp.Checkpointer(_save_handler()) as ckptr:  # synchronous: returns when written
        ckptr.save(os.path.join(out_dir, PARAMS_DIR), args=ocp.args.PyTreeSave(params),
                   force=True)
    # The config goes last: a dir with a config always has complete parameters.
    write_config(out_dir, config)


def _save_handler() -> ocp.PyTreeCheckpointHandler:
    """The PyTree handler `save_params` writes with: no second copy of the model.

    `StandardCheckpointer` deep-copies every numpy array before its async write, and its
    zstd-encoded chunks wait in OCDBT's buffers until a data file (2 GiB) fills: together
    ~2x the parameters on top of them (a 605 MiB fp32 model peaked at 1982 MiB). Here numpy
    arrays are written in place (the save is synchronous, nothing mutates them meanwhile) and
    uncompressed, which tensorstore writes straight from the source arrays (peak: the
    parameters). Costs disk: weights barely compress (fp32 +8%, bf16 +28% vs zstd). Still an
    ordinary OCDBT PyTree checkpoint: `StandardCheckpointer` restores it.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)


def write_config(out_dir: str, config: LlavaConfig) -> None:
    tmp = os.path.join(out_dir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    os.replace(tmp, os.path.join(out_dir, CONFIG_FILE))


def read_config(path: str) -> LlavaConfig:
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint dir {path} does not exist")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(
            f"{cfg_path} is missing: {path} is not a jaxground checkpoint dir (convert HF "
            "weights with convert/hf_to_orbax.py)")
    with open(cfg_path) as f:
        return LlavaConfig.from_dict(json.load(f))


def _leaves_with_paths(tree) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_against_metadata(params_dir: str, target) -> None:
    """Compares stored shapes with the target tree; raises naming every mismatch."""
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(params_dir)
    meta_tree = getattr(meta, "item_metadata", meta)
    stored = {k: tuple(v.shape) for k, v in _leaves_with_paths(meta_tree).items()}
    wanted = {k: tuple(v.shape) for k, v in _leaves_with_paths(target).items()}
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    shapes = sorted(f"{k}: stored {list(stored[k])}, model expects {list(wanted[k])}"
                    for k in set(stored) & set(wanted) if stored[k] != wanted[k])
    problems = [f"{t}: {', '.join(v[:20])}{' ...' if len(v) > 20 else ''}"
                for t, v in (("missing in checkpoint", missing), ("not in model", extra),
                             ("shape mismatch", shapes)) if v]
    if problems:
        raise CheckpointError(f"checkpoint {params_dir} does not fit the model config:\n  " +
                              "\n  ".join(problems))


def restore_params(path: str, config: LlavaConfig, shardings=None) -> dict[str, Any]:
    """Nested parameter dict of jax arrays in `config.param_dtype` (cast on restore).

    `shardings`: a pytree of `jax.sharding.Sharding` matching the parameters, or None for
    the first local device.
    """
    abstract = param_dict(abstract_model(config))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir} is missing: no parameters in {path}")
    check_against_metadata(params_dir, target)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(params_dir, target)


def load(path: str, dtype: str | Any = None, shardings=None, step: int | None = None
         ) -> LlavaModel:
    """The NNX LLaVA model stored in a converted checkpoint dir, or in a training workdir
    (its latest checkpoint, or `step`).

    `dtype` ("float32", "bfloat16" or a jnp dtype) overrides both the parameter and the
    compute dtype; parameters are cast while restoring.
    """
    config = read_config(path)
    if dtype is not None:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
        dtype_of(name)
        config = config.replace(param_dtype=name, dtype=name)
    from jaxground.training import checkpoint  # a training workdir

    if checkpoint.is_workdir(path):
        model = checkpoint.load_trained(path, config, step)
        # Training checkpoints restore each array in its stored dtype (frozen weights may be
        # bf16 beside fp32 trainable ones): cast when a dtype is asked for.
        return cast_floats(model, config.param_dtype) if dtype is not None else model
    params = restore_params(path, config, shardings)
    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def cast_floats(model: LlavaModel, dtype_name: str) -> LlavaModel:
    """The model with every floating-point parameter cast to `dtype_name`."""
    graphdef, state = nnx.split(model)
    target = dtype_of(dtype_name)
    params = jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating)
                          else x, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load_processor(path: str):
    """The HF LLaVA processor (tokenizer + CLIP image processor) saved next to the weights."""
    from transformers import AutoProcessor, AutoTokenizer, LlavaProcessor

    from jaxground.data.processor import TOKENIZER_FILES, clip_image_processor

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint dir {path} does not exist")
    has_tokenizer = any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES)
    if not has_tokenizer:
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json / tokenizer.model) in "
                                f"{path}; convert from an HF dir that has them")
    if os.path.exists(os.path.join(path, "processor_config.json")):
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    config = read_config(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = clip_image_processor(config.vision.image_size, path)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=config.vision.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=1)
