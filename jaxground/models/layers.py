"""Building blocks shared by the vision tower and the decoder: stacked layers and scans, and
the unstacked (one module per layer) layout for decoding."""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def stack_layers(make: Callable[[nnx.Rngs], M], num: int, rngs: nnx.Rngs) -> M:
    """Creates `num` copies of a layer whose parameters carry a leading [L] axis."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r: nnx.Rngs) -> M:
        return make(r)

    return create(rngs)


REMAT_POLICIES = {"none": None, "full": None,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def scan_layers(layers: nnx.Module, carry, body: Callable, start: int, stop: int, xs=None,
                remat: str = "none"):
    """Runs stacked layers `start..stop-1` over `carry` with `lax.scan`.

    `body(layer, carry, x) -> (carry, y)` sees one layer (a merged module holding a slice of
    the stacked parameters) and the matching slice of `xs` (stacked per layer, or None).
    Selecting layers here, not in the parameter tree, keeps the checkpoint layout [L, ...]
    whatever the segmentation (plain vs grounded layers) of the forward pass. Each step
    indexes the full stack in place (a slice `a[start:stop]` outside the loop would copy the
    weights on every call).
    """
    if stop <= start:
        return carry, None
    graphdef, state = nnx.split(layers)

    def step(c, inputs):
        i, x = inputs
        layer_state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                                   state)
        return body(nnx.merge(graphdef, layer_state), c, x)

    if remat != "none":  # recompute the layer in the backward pass, keeping what the policy saves
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(step, carry, (jnp.arange(start, stop), xs))


def unstack_layers(split: list) -> nnx.List:
    """`[nnx.split(stacked)]` -> the L per-layer modules, each holding its own arrays.

    The list is emptied and each stacked leaf is released as soon as it is sliced, so the
    peak is one extra leaf, not a second copy of every layer (7B bf16: 12.4 GiB of layers on
    a 24 GiB machine); the caller must hold no other reference to the stacked module.
    Abstract leaves (ShapeDtypeStruct) give abstract slices.
    """
    graphdef, state = split.pop()
    leaves, treedef = jax.tree.flatten(state)
    del state
    per_leaf = []
    for i, leaf in enumerate(leaves):
        leaves[i] = None
        per_leaf.append(jax.eval_shape(jnp.unstack, leaf)
                        if isinstance(leaf, jax.ShapeDtypeStruct) else jnp.unstack(leaf))
        del leaf
    num = len(per_leaf[0])
    return nnx.List([nnx.merge(graphdef, jax.tree.unflatten(treedef, [p[l] for p in per_leaf]))
                     for l in range(num)])
