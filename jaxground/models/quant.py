"""Weight-only quantization of a linear layer's kernel [..., in, out]: int8 and NF4.

Scales are per column (output channel) and per group of `group` consecutive input rows, so
a kernel [in, out] has scales [in / group, out]; any leading axes (a stacked [L] layer axis)
pass through. NF4 is bitsandbytes' 4-bit NormalFloat (QLoRA): the 16 code values below,
each block scaled by its absmax, two codes per byte. bitsandbytes blocks 64 consecutive
values of the flattened torch weight [out, in], i.e. 64 input rows of one column: the same
blocks as here with group 64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# bitsandbytes `get_4bit_type("nf4")`: quantiles of N(0, 1) scaled to [-1, 1], with an
# exact zero.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
_NF4_MIDPOINTS = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2


def _grouped(w_io, group: int):
    """[..., in, out] -> [..., in / group, group, out] (in fp32)."""
    *lead, n_in, n_out = w_io.shape
    if n_in % group:
        raise ValueError(f"a kernel with {n_in} input rows cannot be split into groups of "
                         f"{group} (quant.group_size)")
    return w_io.astype(jnp.float32).reshape(*lead, n_in // group, group, n_out)


def quantize(w_io, mode: str, group: int):
    """(codes, scales [..., in / group, out] fp32) of a kernel; codes are int8 [..., in, out]
    or, for nf4, two 4-bit codes per uint8 [..., in / 2, out] (rows 2i and 2i + 1)."""
    w = _grouped(w_io, group)
    absmax = jnp.max(jnp.abs(w), axis=-2, keepdims=True)
    absmax = jnp.where(absmax == 0, 1.0, absmax)  # an all-zero group stays zero
    if mode == "int8":
        scale = absmax / 127.0
        codes = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8).reshape(w_io.shape)
    elif mode == "nf4":
        scale = absmax
        x = w / scale
        # Nearest code: how many midpoints lie below x (one fused elementwise pass).
        nearest = sum((x > m).astype(jnp.uint8) for m in _NF4_MIDPOINTS.tolist())
        nearest = nearest.reshape(w_io.shape)
        if w_io.shape[-2] % 2:
            raise ValueError(f"nf4 needs an even number of input rows, got {w_io.shape[-2]}")
        codes = nearest[..., 0::2, :] | (nearest[..., 1::2, :] << 4)
    else:
        raise ValueError(f"quant mode {mode!r} is not 'int8' or 'nf4'")
    return codes, scale[..., 0, :]


def dequantize(codes, scale_go, mode: str, dtype):
    """The kernel [..., in, out] in `dtype` from `quantize`'s output."""
    if mode == "nf4":
        lo, hi = codes & 15, codes >> 4
        index = jnp.stack([lo, hi], axis=-2).reshape(*codes.shape[:-2], -1, codes.shape[-1])
        values = jnp.asarray(NF4_VALUES)[index.astype(jnp.int32)]
    else:
        values = codes.astype(jnp.float32)
    *lead, n_in, n_out = values.shape
    groups = scale_go.shape[-2]
    w = values.reshape(*lead, groups, n_in // groups, n_out) * scale_go[..., :, None, :]
    return w.reshape(values.shape).astype(dtype)


def quantize_layers(w_io, mode: str, group: int):
    """`quantize` one leading-axis slice at a time (a stacked [L, in, out] kernel): the fp32
    temporaries are one layer's, not the stack's (7B: 180 MiB, not 5.6 GiB)."""
    if w_io.ndim <= 2:
        return jax.jit(quantize, static_argnums=(1, 2))(w_io, mode, group)
    return jax.jit(lambda w: jax.lax.map(lambda x: quantize(x, mode, group), w))(w_io)
