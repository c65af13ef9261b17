"""Converted checkpoint dirs: our model config (JSON) + an Orbax checkpoint of the parameters.

Layout of a converted checkpoint dir:
  jaxground_config.json   the LlavaConfig
  params/                 Orbax (PyTree) checkpoint of the nested parameter dict
  tokenizer*, preprocessor_config.json, ...   copied from the HF dir for `load_processor`
"""

from __future__ import annotations

import functools
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
        ckptr.save(os.path.join(out_dir, PARAMS_DIR), force=True, args=ocp.args.PyTreeSave(
            params, ocdbt_target_data_file_size=_data_file_bytes(params)))
    # The config goes last: a dir with a config always has complete parameters.
    write_config(out_dir, config)


def _data_file_bytes(params) -> int | None:
    """OCDBT's target data file size for saving `params` (None: Orbax's 2 GiB).

    Measured (bench/convert_memory.py): tensorstore copies 16-bit arrays as it writes them
    and holds the copies until their data file is flushed, so a bf16 llava-1.5-7b (arrays
    up to 2.9 GB) peaked at 1.48x its bytes with 2 GiB files and 1.06x with 64 MiB ones. fp32
    arrays are written from the source, and there small files cost memory instead (1.5 GiB
    fp32: 1.20x with 2 GiB files, 1.80x with 64 MiB). So: small files when most bytes are
    16-bit.
    """
    leaves = jax.tree.leaves(params)
    narrow = sum(a.nbytes for a in leaves if np.dtype(a.dtype).itemsize < 4)
    return 64 << 20 if narrow * 2 > sum(a.nbytes for a in leaves) else None


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


def _read_bytes(target, stored) -> int:
    """What Orbax reserves to read `target`'s largest shard: the stored chunks it touches
    (along each axis at most the shard's extent in whole chunks plus one, at most the
    whole axis), in the stored dtype."""
    shape = tuple(stored.shape)
    shard = target.sharding.shard_shape(shape)
    chunk = getattr(getattr(stored, "storage", None), "chunk_shape", None) or shape
    touched = [min(n, (-(-s // c) + 1) * c) if c else n for n, s, c in zip(shape, shard, chunk)]
    return int(np.prod(touched)) * np.dtype(stored.dtype).itemsize


def _metadata_tree(directory: str):
    """The stored tree of array metadata (shape, dtype) of an Orbax PyTree checkpoint."""
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(directory)
    return getattr(meta, "item_metadata", meta)


def check_against_metadata(params_dir: str, target, stored_tree) -> None:
    """Compares the stored shapes (`stored_tree`, `_metadata_tree(params_dir)`) with the
    target tree; raises naming every mismatch."""
    stored = {k: tuple(v.shape) for k, v in leaves_by_path(stored_tree).items()}
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


# The least Orbax may hold in read buffers at once (see `restore_arrays`).
RESTORE_IN_FLIGHT_BYTES = 64 << 20
# Stored chunks of training checkpoints: small enough that a restore onto many devices reads
# only what each needs (a 1 GiB workdir onto fsdp=8: 1.24-1.29x its bytes added, against
# 1.30-1.46x with one chunk per array; the save costs +67 MiB). Converted dirs keep one
# chunk per array: a chunked save of host arrays peaked at 2.1x (1.5 GiB fp32 conversion).
CHUNK_BYTES = 64 << 20


def save_args_for(tree):
    """Orbax SaveArgs giving every array chunks of at most CHUNK_BYTES."""
    return jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)


@functools.cache  # once per process
def _large_frees_go_back_to_the_os() -> None:
    """glibc raises its mmap threshold (up to 32 MiB) after each large free, so the
    restore's shard-sized read buffers end up in the heap, where freed memory stays in the
    process: +0.1x of a sharded restore, kept. A fixed 1 MiB threshold keeps them mmapped
    (one mmap per buffer of >= 1 MiB: noise beside filling it). With 16 MiB, buffers between
    the two stayed in the heap's per-thread arenas and the 1 GiB restore test measured
    1.21-1.32x from run to run (over its 1.3 bound under load); with 1 MiB, 1.22-1.25x,
    alone and beside two other busy processes."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def restore_arrays(directory: str, targets, stored_tree, partial: bool = False):
    """Orbax restore of `targets` (a tree of ShapeDtypeStructs with shardings): each array
    read straight onto its sharding, cast to its dtype while reading. `stored_tree`: the
    checkpoint's array metadata (its caller has read it already to check the targets).

    Orbax reads each shard into a host buffer and copies it onto its device; by default it
    reads every array before it places any (96 GB in flight), so restoring held the model
    twice. Here at most max(the largest shard read, 64 MiB) of host buffers are in flight:
    a restore holds the parameters plus about one shard. Saves write chunks of at most
    `CHUNK_BYTES`, so a shard read touches little beyond the shard.
    """
    _large_frees_go_back_to_the_os()
    stored = leaves_by_path(stored_tree)
    largest = max((_read_bytes(t, stored[k]) for k, t in leaves_by_path(targets).items()),
                  default=0)
    # Orbax takes GB (1e9 bytes, then multiplies back): 1 MiB of slack absorbs the rounding.
    limit_gb = (max(largest, RESTORE_IN_FLIGHT_BYTES) + (1 << 20)) / 1e9
    restore_args = jax.tree.map(
        lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), targets)
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=limit_gb)
    with ocp.Checkpointer(handler) as ckptr:
        return ckptr.restore(directory, args=ocp.args.PyTreeRestore(
            item=targets, partial_restore=partial, restore_args=restore_args))


def restore_params(path: str, config: LlavaConfig, mesh=None) -> dict[str, Any]:
    """Nested parameter dict of jax arrays in `config.param_dtype` (cast on restore), each
    read straight onto its sharding on `mesh` (None: the first local device)."""
    abstract = param_dict(abstract_model(config))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, param_shardings(abstract, mesh))
    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{params_dir} is missing: no parameters in {path}")
    stored = _metadata_tree(params_dir)
    check_against_metadata(params_dir, target, stored)
    return restore_arrays(params_dir, target, stored)


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
