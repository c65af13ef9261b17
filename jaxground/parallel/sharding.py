"""One table of logical axes -> mesh axes; parameters and batches placed by it.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and
optimizer state sharded), `tensor` (tensor parallelism inside layers). Logical axes name
what a dimension *is*; `LOGICAL_RULES` says where it goes. A dimension that the mesh does
not divide stays replicated (tiny test models on 8 devices still run).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxground.models.ops import BATCH_MESH_AXES
from jaxground.utils.trees import path_string

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": BATCH_MESH_AXES,    # what the model's activations keep (models.ops.shard_rows)
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "vocab": "tensor",
    "layers": None,
}

# Parameter path (searched) -> logical axes of its trailing dims; a stacked leading [L] axis
# is "layers". First match wins; unmatched parameters (norms, biases, scalars) replicate.
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"(q_proj|k_proj|v_proj)/kernel$", ("embed", "heads")),
    (r"(o_proj|out_proj)/kernel$", ("heads", "embed")),
    (r"(gate_proj|up_proj|fc1)/kernel$", ("embed", "mlp")),
    (r"(down_proj|fc2)/kernel$", ("mlp", "embed")),
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"projector/linear_1/kernel$", (None, "embed")),
    (r"projector/linear_2/kernel$", ("embed", None)),
    (r"(text_proj|image_proj)/kernel$", ("embed", None)),
]
_STACKED = re.compile(r"(^|/)(layers|grounding_heads)/")


def init_distributed(cfg: Mapping | None = None) -> None:
    """`jax.distributed.initialize()` when the config (`distributed.*`) or the environment
    (JAXGROUND_COORDINATOR, JAXGROUND_NUM_PROCESSES, JAXGROUND_PROCESS_ID; or a cluster JAX
    detects itself: TPU pods, SLURM, ...) asks for it."""
    cfg = dict(cfg or {})
    if cfg.get("coordinator_address"):
        address, count, index = (cfg["coordinator_address"], cfg["num_processes"],
                                 cfg["process_id"])
    elif os.environ.get("JAXGROUND_COORDINATOR"):
        address = os.environ["JAXGROUND_COORDINATOR"]
        count = int(os.environ["JAXGROUND_NUM_PROCESSES"])
        index = int(os.environ["JAXGROUND_PROCESS_ID"])
    else:
        if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_JOB_ID"):
            jax.distributed.initialize()
        return
    jax.distributed.initialize(coordinator_address=address, num_processes=int(count),
                               process_id=int(index))


def make_mesh(axis_sizes: Mapping[str, int]) -> jax.sharding.Mesh:
    """Mesh from {"data": d, "fsdp": f, "tensor": t}; one size may be -1 (the rest)."""
    unknown = sorted(set(axis_sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not among {list(MESH_AXES)}")
    sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
    n = jax.device_count()
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(axis_sizes)}: at most one axis may be -1")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if n % known:
            raise ValueError(f"mesh {dict(axis_sizes)} does not divide {n} devices")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} "
                         f"devices but {n} are available")
    # Auto axes: shardings are set on parameters and batches; XLA propagates the rest.
    return jax.make_mesh(tuple(sizes), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _mesh_axes(logical: str | None, mesh) -> tuple[str, ...]:
    if logical is None:
        return ()
    target = LOGICAL_RULES[logical]
    target = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(a for a in target if mesh.shape[a] > 1)


# A linear layer's other leaves, placed by its kernel's (in, out) axes: quantized codes as
# the kernel, scales [in / group, out] and LoRA's B [r, out] along `out`, LoRA's A [in, r]
# along `in`.
_KERNEL_DERIVED = {"kernel_q": lambda i, o: (i, o), "kernel_scale": lambda i, o: (None, o),
                   "lora_a": lambda i, o: (i, None), "lora_b": lambda i, o: (None, o)}


def _trailing_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    prefix, _, leaf = path.rpartition("/")
    if leaf in _KERNEL_DERIVED and ndim == 2:
        in_axis, out_axis = _trailing_axes(f"{prefix}/kernel", 2)
        return _KERNEL_DERIVED[leaf](in_axis, out_axis)
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def spec_for(path: str, shape: tuple[int, ...], mesh) -> P:
    """PartitionSpec of one parameter from PARAM_AXES and LOGICAL_RULES."""
    stacked = bool(_STACKED.search(path))
    trailing = _trailing_axes(path, len(shape) - stacked)
    logical = (("layers",) if stacked else ()) + tuple(trailing)
    spec = []
    for dim, name in zip(shape, logical):
        axes = _mesh_axes(name, mesh)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        spec.append(None if not axes or dim % size else (axes[0] if len(axes) == 1 else axes))
    return P(*spec)


def tree_shardings(tree, mesh):
    """NamedSharding for every array leaf of a parameter-shaped pytree (params, moments)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(path_string(p), tuple(x.shape), mesh))
        if hasattr(x, "shape") and len(x.shape) else NamedSharding(mesh, P()), tree)


def param_shardings(params, mesh=None):
    """Shardings of a parameter tree (arrays or ShapeDtypeStructs) on `mesh` by the
    logical-axis table; without a mesh, everything on the first local device."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: device, params)
    return tree_shardings(params, mesh)


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dim over (data, fsdp); the rest replicated."""
    axes = _mesh_axes("batch", mesh)
    return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def global_batch(local: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
            for k, v in local.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a global array as NumPy on every process. With several processes a
    batch-sharded array is not addressable in full anywhere (`device_get` refuses it): the
    processes exchange their shards."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
