"""The KV cache of cached decoding: keys and values of every decoder layer, heads leading
the sequence ([L, B, K, S, H]) so a decode step's dots batch over (b, k) without a
transposed copy of the cache per step. No I/O.

With an unrolled decoder (`LlamaModel.unroll`) the cache holds one buffer per layer
instead: a layer then reads its keys and values in place, where slicing a stacked buffer
copies them on every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class LayerCache:
    """One layer's view of the KV cache."""

    k_bksh: jax.Array
    v_bksh: jax.Array
    valid_bs: jax.Array  # [B, S] bool: written positions that may be attended


@struct.dataclass
class KVCache:
    """Keys and values of every layer for S positions (prompt + new tokens)."""

    k: jax.Array | tuple  # [L, B, K, S, H], or L arrays [B, K, S, H] (per-layer buffers)
    v: jax.Array | tuple  # same as k
    valid_bs: jax.Array   # [B, S] bool: written, non-padding positions

    @classmethod
    def from_prefill(cls, kv, attention_mask_bt, length: int,
                     per_layer: bool = False) -> "KVCache":
        """From the prompt's (k, v) [L, B, T, K, H], room for `length` positions; one buffer
        per layer with `per_layer`."""
        t = kv[0].shape[2]
        valid = jnp.pad(attention_mask_bt.astype(bool), [(0, 0), (0, length - t)])
        pad = [(0, 0), (0, 0), (0, length - t), (0, 0)]
        heads_first = lambda a_btkh: jnp.pad(jnp.swapaxes(a_btkh, 1, 2), pad)
        if per_layer:
            k, v = (tuple(heads_first(a[l]) for l in range(a.shape[0])) for a in kv)
        else:
            k, v = (jax.vmap(heads_first)(a) for a in kv)
        return cls(k, v, valid)

    def layer(self, l) -> LayerCache:
        """Layer `l`'s keys and values (`l` may be traced - the index inside a layer scan -
        unless the cache is per layer)."""
        if isinstance(self.k, tuple):
            return LayerCache(self.k[l], self.v[l], self.valid_bs)
        at = lambda a: jax.lax.dynamic_index_in_dim(a, l, keepdims=False)
        return LayerCache(at(self.k), at(self.v), self.valid_bs)

    def write(self, t, k_lbkh, v_lbkh) -> "KVCache":
        """Stores one token per row at position t (left padding aligns rows' new tokens)."""

        def put(cache, new_lbkh):
            if isinstance(cache, tuple):
                return tuple(jax.lax.dynamic_update_slice(c, new_lbkh[l][:, :, None], (0, 0, t, 0))
                             for l, c in enumerate(cache))
            return jax.lax.dynamic_update_slice(cache, new_lbkh[:, :, :, None], (0, 0, 0, t, 0))

        return KVCache(put(self.k, k_lbkh), put(self.v, v_lbkh),
                       jax.lax.dynamic_update_slice(self.valid_bs,
                                                    jnp.ones((self.valid_bs.shape[0], 1), bool),
                                                    (0, t)))
