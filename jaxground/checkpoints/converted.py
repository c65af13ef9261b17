"""Converted checkpoint dirs: our model config (JSON) + an Orbax checkpoint of the parameters.

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
import numpy as np
import orbax.checkpoint as ocp

from jaxground.models.config import LlavaConfig
from jaxground.models.llava import abstract_model, param_dict
from jaxground.parallel.sharding import param_shardings
from jaxground.utils.trees import leaves_by_path, nest

CONFIG_FILE = "jaxground_config.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it should restore into."""


def save_params(out_dir: str, config: LlavaConfig, params: dict) -> None:
    """Writes config + parameters. `params`: nested dict, or flat {path tuple: array}."""
    if params and isinstance(next(iter(params)), tuple):
        params = nest(params)
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


def check_against_metadata(params_dir: str, target) -> None:
    """Compares stored shapes with the target tree; raises naming every mismatch."""
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(params_dir)
    meta_tree = getattr(meta, "item_metadata", meta)
    stored = {k: tuple(v.shape) for k, v in leaves_by_path(meta_tree).items()}
    wanted = {k: tuple(v.shape) for k, v in leaves_by_path(target).items()}
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


def restore_params(path: str, config: LlavaConfig, mesh=None) -> dict[str, Any]:
    """Nested parameter dict of jax arrays in `config.param_dtype` (cast on restore), each
    read straight onto its sharding on `mesh` (None: the first local device)."""
    abstract = param_dict(abstract_model(config))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, param_shardings(abstract, mesh))
    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir} is missing: no parameters in {path}")
    check_against_metadata(params_dir, target)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(params_dir, target)


def restore_params_for(path: str, config: LlavaConfig, mesh=None) -> dict[str, Any]:
    """The parameters of the converted dir `path` for a model of `config` (its dtypes; its
    grounding heads only where they are the stored ones: heads of another grounding config
    are left out, for the caller to start fresh)."""
    saved = read_config(path)
    params = restore_params(path, saved.replace(dtype=config.dtype,
                                                param_dtype=config.param_dtype), mesh)
    if saved.grounding != config.grounding:
        params["language_model"].pop("grounding_heads", None)
    return params
