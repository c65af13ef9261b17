"""The KV cache of cached decoding: keys and values of every decoder layer, heads leading
the sequence ([L, B, K, S, H]) so a decode step's dots batch over (b, k) without a
transposed copy of the cache per step. No I/O."""

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

    k: jax.Array          # [L, B, K, S, H]
    v: jax.Array          # [L, B, K, S, H]
    valid_bs: jax.Array   # [B, S] bool: written, non-padding positions

    @classmethod
    def from_prefill(cls, kv, attention_mask_bt, length: int) -> "KVCache":
        """From the prompt's (k, v) [L, B, T, K, H], room for `length` positions."""
        k, v = (jnp.swapaxes(a, 2, 3) for a in kv)
        pad = [(0, 0), (0, 0), (0, 0), (0, length - k.shape[3]), (0, 0)]
        valid = jnp.pad(attention_mask_bt.astype(bool), [(0, 0), (0, length - k.shape[3])])
        return cls(jnp.pad(k, pad), jnp.pad(v, pad), valid)

    def layer(self, l) -> LayerCache:
        """Layer `l`'s keys and values (`l` may be traced: the index inside a layer scan)."""
        at = lambda a: jax.lax.dynamic_index_in_dim(a, l, keepdims=False)
        return LayerCache(at(self.k), at(self.v), self.valid_bs)

    def write(self, t, k_lbkh, v_lbkh) -> "KVCache":
        """Stores one token per row at position t (left padding aligns rows' new tokens)."""
        at = (0, 0, 0, t, 0)
        return KVCache(jax.lax.dynamic_update_slice(self.k, k_lbkh[:, :, :, None], at),
                       jax.lax.dynamic_update_slice(self.v, v_lbkh[:, :, :, None], at),
                       jax.lax.dynamic_update_slice(self.valid_bs,
                                                    jnp.ones((self.valid_bs.shape[0], 1), bool),
                                                    (0, t)))
