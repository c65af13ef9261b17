"""Building blocks shared by the vision tower and the decoder: stacked layers and scans."""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def stack_layers(make: Callable[[nnx.Rngs], M], num: int, rngs: nnx.Rngs) -> M:
    """Creates `num` copies of a layer whose parameters carry a leading [L] axis."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r: nnx.Rngs) -> M:
        return make(r)

    return create(rngs)


def scan_layers(layers: nnx.Module, carry, body: Callable, start: int, stop: int, xs=None):
    """Runs stacked layers `start..stop-1` over `carry` with `lax.scan`.

    `body(layer, carry, x) -> (carry, y)` sees one layer (a merged module holding a slice of
    the stacked parameters) and the matching slice of `xs` (stacked per layer, or None).
    Slicing here, not in the parameter tree, keeps the checkpoint layout [L, ...] whatever the
    segmentation (plain vs grounded layers) of the forward pass.
    """
    if stop <= start:
        return carry, None
    graphdef, state = nnx.split(layers)
    state = jax.tree.map(lambda a: a[start:stop], state)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    return jax.lax.scan(step, carry, (state, xs))
