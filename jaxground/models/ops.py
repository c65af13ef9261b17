"""Matmuls and compilation that keep 16-bit weights 16-bit on XLA:CPU.

XLA:CPU computes in fp32 whatever its dot library (YNNPACK) does not take natively, and its
float normalization pass does so by converting *operands*: a bf16 dot with a bf16 result, or
the bf16 `dynamic-slice` that reads one layer of a stacked weight inside a layer scan, gets
`convert(W -> f32)` in front of it. When W is loop-invariant (every weight, in a layer scan
or in the decode loop), loop-invariant code motion then hoists that convert out of the loop,
so the compiled program holds an fp32 copy of every weight: a 13 GiB bf16 7B model asked for
27.8 GB of temporaries. Measured on the mid config's bf16 forward (B=2, T=320): 193 MiB of
temporaries for 133 MiB of weights before, 13 MiB with the rules below, and 261 ms instead
of 467 (fp32: 419 ms) on an AMD EPYC with AVX512-BF16 (tests/test_bf16.py holds the bound
for the 7B):

- 16-bit dots ask for an fp32 result (`preferred_element_type`) and cast it back: YNNPACK
  takes bf16 x bf16 -> f32 as it is (twice the fp32 rate with AVX512-BF16 or AMX);
  bf16 -> bf16 it does not.
- A 16-bit dot of one row (M = 1, batch-1 decoding) is padded to two: XLA:CPU sends M = 1
  to its own matrix-vector emitter, which upcasts 16-bit weights (the mid config's bf16
  lm_head at batch 1: 24 ms, padded 2.1 ms). In fp32 that emitter streams the weights at
  the memory bandwidth (2.2 ms; padded 4.0 ms), so fp32 keeps it.
- Programs that run the model are compiled without loop-invariant code motion on CPU
  (`model_jit`, `compiler_options`): the per-layer convert then stays inside the loop, fused
  with the slice, so one layer's weights are in flight at a time. Tried instead: reading the
  stack through a uint16 view (integers are never normalized) - XLA:CPU materializes the
  bitcast, i.e. a copy of every stack; XLA_FLAGS for oneDNN / XNNPACK / the thunk runtime -
  no change to either problem.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

F32 = jnp.float32


def is_16bit_float(dtype) -> bool:
    dtype = np.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None):
    """`jax.lax.dot_general` with the rules above; a drop-in `dot_general` for nnx.Linear."""
    (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
    kw = dict(precision=precision, out_sharding=out_sharding)
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    sixteen = is_16bit_float(lhs.dtype) and is_16bit_float(rhs.dtype)
    if sixteen:
        kw["preferred_element_type"] = F32
    elif preferred_element_type is not None:
        kw["preferred_element_type"] = preferred_element_type
    free_lhs = [d for d in range(lhs.ndim) if d not in lhs_contract and d not in lhs_batch]
    if (sixteen and not lhs_batch and free_lhs
            and math.prod(lhs.shape[d] for d in free_lhs) == 1
            and tuple(lhs_contract) == (lhs.ndim - 1,)):
        # One 16-bit row: pad to two rows (YNNPACK's path), keep the first.
        k = lhs.shape[-1]
        rows_2k = jnp.pad(lhs.reshape(1, k), ((0, 1), (0, 0)))
        out = jax.lax.dot_general(rows_2k, rhs, (((1,), rhs_contract), ((), ())), **kw)
        return out[:1].reshape(lhs.shape[:-1] + out.shape[1:]).astype(out_dtype)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, **kw).astype(out_dtype)


def einsum(spec: str, a, b, out_dtype=None):
    """`jnp.einsum` of two operands with fp32 accumulation for 16-bit inputs; the result is
    cast to `out_dtype` (default: the inputs' common dtype)."""
    out_dtype = out_dtype or jnp.result_type(a, b)
    pref = F32 if is_16bit_float(a.dtype) and is_16bit_float(b.dtype) else None
    return jnp.einsum(spec, a, b, preferred_element_type=pref).astype(out_dtype)


class QuantizedWeight(nnx.Variable):
    """A frozen quantized kernel's codes or scales (never an `nnx.Param`: no optimizer, no
    trainable filter and no checkpoint of a run ever selects it; it is rebuilt from the base
    weights at load, see `jaxground.models.adapters`)."""


class Linear(nnx.Linear):
    """`nnx.Linear` (same parameters: kernel [in, out], bias) whose matmul follows the rules
    above, and which may carry (`jaxground.models.adapters`):

    - a quantized kernel instead of `kernel`: `kernel_q` codes and `kernel_scale`
      (`quant_mode` "int8" | "nf4"), dequantized to the compute dtype for the matmul;
    - a LoRA adapter: `lora_a` [in, r], `lora_b` [r, out], y += lora_scale * (x A) B.
    """

    quant_mode: str = "none"
    lora_scale: float = 0.0  # 0: no adapter

    def __init__(self, in_features: int, out_features: int, **kw):
        super().__init__(in_features, out_features, dot_general=dot_general, **kw)

    def weight(self, codes=None, scale=None):
        """The kernel [in, out] as the matmul uses it (dequantized when quantized, from
        `codes` / `scale` when given)."""
        if self.quant_mode == "none":
            return self.kernel[...]
        from jaxground.models.quant import dequantize

        return dequantize(self.kernel_q[...] if codes is None else codes,
                          self.kernel_scale[...] if scale is None else scale,
                          self.quant_mode, self.dtype or self.param_dtype)

    def __call__(self, inputs, out_sharding=None):
        bias = self.bias[...] if self.bias is not None else None
        kw = {} if self.preferred_element_type is None else {
            "preferred_element_type": self.preferred_element_type}
        contract = (((inputs.ndim - 1,), (0,)), ((), ()))

        def matmul(x, kernel):
            return dot_general(x, kernel, contract, precision=self.precision, **kw)

        if self.quant_mode == "none":
            x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias),
                                                 dtype=self.dtype)
            y = matmul(x, kernel)
        else:
            # The backward needs W for dx. Saved, the dequantized W would be a 16-bit copy
            # of every quantized weight held for the backward (7B, remat none: 12 GiB, all
            # that int8 / nf4 saved); recomputed from the codes, it is one layer's at a time.
            x, bias = self.promote_dtype((inputs, bias), dtype=self.dtype)
            y = jax.checkpoint(lambda x, codes, scale: matmul(x, self.weight(codes, scale)),
                               policy=jax.checkpoint_policies.nothing_saveable)(
                x, self.kernel_q[...], self.kernel_scale[...])
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        if self.lora_scale:
            a, b = (p[...].astype(x.dtype) for p in (self.lora_a, self.lora_b))
            h = dot_general(x, a, contract, precision=self.precision)
            y = y + (dot_general(h, b, contract, precision=self.precision)
                     * self.lora_scale).astype(y.dtype)
        return y


class Embed(nnx.Embed):
    """`nnx.Embed` whose `attend` (tied lm_head) follows the rules above, with fp32 logits."""

    def attend(self, query_btd):
        table_vd = self.embedding[...].astype(self.dtype or query_btd.dtype)
        query_btd = query_btd.astype(table_vd.dtype)
        return dot_general(query_btd, table_vd, (((query_btd.ndim - 1,), (1,)), ((), ())),
                           preferred_element_type=F32)


# ---- activation sharding ---------------------------------------------------------------------
# The mesh axes a batch's rows are split over: parallel.sharding's "batch" rule, which takes
# it from here (models sit left of parallel in the import chain).
BATCH_MESH_AXES = ("data", "fsdp")


def shard_rows(x):
    """`x` [B, ...] kept split by rows over the current mesh's batch axes (`jax.set_mesh`);
    unchanged without a mesh, or when those axes do not divide B.

    Parameters carry shardings, activations do not: under fsdp, XLA's propagation would
    otherwise split a layer's matmul along the weight's sharded axis, gathering every row's
    activations on every device and summing partial products (7B, fsdp 8: each device held
    the whole global batch's [B, T, 11008] MLP activations and [B, T, V] logits) instead
    of gathering each layer's weights, as fsdp means to."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in BATCH_MESH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    P = jax.sharding.PartitionSpec
    # Only the rows are pinned: the other dims stay XLA's to choose (tensor parallelism).
    spec = P(axes if len(axes) > 1 else axes[0], *([P.UNCONSTRAINED] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)


# ---- compilation ----------------------------------------------------------------------------
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compiler_options(model_state, backend: str | None = None) -> dict | None:
    """XLA options for a program over `model_state` (the model's arrays, or their shapes) on
    `backend` (default: JAX's default backend): on CPU with 16-bit weights, no loop-invariant
    code motion (see the module docstring); otherwise XLA's defaults (with fp32 weights the
    pass costs nothing and saves 5-8% of a train step)."""
    if (backend or jax.default_backend()) != "cpu":
        return None
    sixteen = any(is_16bit_float(x.dtype) for x in jax.tree.leaves(model_state)
                  if hasattr(x, "dtype"))
    return dict(CPU_COMPILER_OPTIONS) if sixteen else None


def model_jit(fn=None, *, static_argnames: tuple[str, ...] = ()):
    """`nnx.jit(fn, graph_updates=False)` for `fn(model, *args)` that mutates nothing, built
    on `jax.jit` so that it compiles with the `compiler_options` of the model and backend at
    hand (chosen per call, when both are known: deciding at import would start the backend,
    too early for `jax.distributed.initialize`)."""
    if fn is None:
        return functools.partial(model_jit, static_argnames=static_argnames)

    signature = inspect.signature(fn)

    def pure(graphdef, state, **arguments):
        return fn(nnx.merge(graphdef, state), **arguments)

    compiled_for: dict[tuple, Callable] = {}

    def prepared(model, args, kwargs):
        """(the jitted function, its arguments) for this call."""
        # Every argument by name, so that `static_argnames` finds them wherever they were.
        arguments = signature.bind(model, *args, **kwargs).arguments
        graphdef, state = nnx.split(arguments.pop(next(iter(signature.parameters))))
        # Inside another transformation (grad, an outer jit) only the top level compiles:
        # options may not be given there.
        nested = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((state, arguments)))
        options = None if nested else compiler_options(state)
        key = (nested, tuple(sorted((options or {}).items())))
        if key not in compiled_for:
            compiled_for[key] = jax.jit(pure, static_argnums=(0,),
                                        static_argnames=static_argnames,
                                        compiler_options=options)
        return compiled_for[key], (graphdef, state), arguments

    @functools.wraps(fn)
    def call(model, *args, **kwargs):
        jitted, model_args, arguments = prepared(model, args, kwargs)
        return jitted(*model_args, **arguments)

    def lower(model, *args, **kwargs):
        """`jax.jit(...).lower` of this call (the model and arguments may be abstract): for
        ahead-of-time compilation and memory analysis."""
        jitted, model_args, arguments = prepared(model, args, kwargs)
        return jitted.lower(*model_args, **arguments)

    call.lower = lower

    return call


def attention(q_btnh, k_bskh, v_bskh, mask_b1ts=None):
    """Softmax attention, scale 1/sqrt(H): queries [B, T, N, H] over keys and values
    [B, S, K, H], each of the K kv heads shared by N / K query heads (grouped-query);
    `mask_b1ts` True where a query may attend. Scores and softmax in fp32; both matmuls go
    through `einsum`, so 16-bit inputs stay 16-bit (XLA's `dot_product_attention` gives the
    probabilities-times-values dot a bf16 result, which XLA:CPU then runs in fp32: converted
    copies of the probabilities and values)."""
    b, t, n, h = q_btnh.shape
    k_heads = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k_heads, n // k_heads, h)
    scores = einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, F32) * (h ** -0.5)
    if mask_b1ts is not None:
        scores = jnp.where(mask_b1ts[:, :, None], scores, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out_btkgh = einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out_btkgh.reshape(b, t, n, h)
