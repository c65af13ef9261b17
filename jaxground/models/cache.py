"""The KV cache of cached decoding: keys and values of every decoder layer, heads leading
the sequence ([L, B, K, S, H]) so a decode step's dots batch over (b, k) without a
transposed copy of the cache per step. A 16-bit cache is stored as its uint16 bits: the
decode loop updates it in place, where XLA:CPU's float normalization would convert a bf16
cache to fp32 and back around every write (a second cache-sized buffer). No I/O."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxground.models.ops import is_16bit_float


@struct.dataclass
class LayerCache:
    """One layer's view of the KV cache."""

    k_bksh: jax.Array
    v_bksh: jax.Array
    valid_bs: jax.Array  # [B, S] bool: written positions that may be attended


@struct.dataclass
class KVCache:
    """Keys and values of every layer for S positions (prompt + new tokens)."""

    k: jax.Array          # [L, B, K, S, H] (uint16 bits of a 16-bit cache)
    v: jax.Array          # [L, B, K, S, H]
    valid_bs: jax.Array   # [B, S] bool: written, non-padding positions
    dtype: jnp.dtype = struct.field(pytree_node=False, default=jnp.float32)  # of k and v

    @classmethod
    def from_prefill(cls, kv, attention_mask_bt, length: int) -> "KVCache":
        """From the prompt's (k, v) [L, B, T, K, H], room for `length` positions."""
        k, v = (_to_bits(jnp.swapaxes(a, 2, 3)) for a in kv)
        pad = [(0, 0), (0, 0), (0, 0), (0, length - k.shape[3]), (0, 0)]
        valid = jnp.pad(attention_mask_bt.astype(bool), [(0, 0), (0, length - k.shape[3])])
        return cls(jnp.pad(k, pad), jnp.pad(v, pad), valid, kv[0].dtype)

    def layer(self, l) -> LayerCache:
        """Layer `l`'s keys and values (`l` may be traced: the index inside a layer scan)."""
        at = lambda a: _from_bits(jax.lax.dynamic_index_in_dim(a, l, keepdims=False), self.dtype)
        return LayerCache(at(self.k), at(self.v), self.valid_bs)

    def write(self, t, k_lbkh, v_lbkh) -> "KVCache":
        """Stores one token per row at position t (left padding aligns rows' new tokens)."""
        at = (0, 0, 0, t, 0)
        write = lambda cache, new_lbkh: jax.lax.dynamic_update_slice(
            cache, _to_bits(new_lbkh.astype(self.dtype))[:, :, :, None], at)
        return KVCache(write(self.k, k_lbkh), write(self.v, v_lbkh),
                       jax.lax.dynamic_update_slice(self.valid_bs,
                                                    jnp.ones((self.valid_bs.shape[0], 1), bool),
                                                    (0, t)), self.dtype)


def _to_bits(a):
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if is_16bit_float(a.dtype) else a


def _from_bits(a, dtype):
    return jax.lax.bitcast_convert_type(a, dtype) if a.dtype == jnp.uint16 else a
