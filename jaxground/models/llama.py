"""LLaMA decoder (Vicuna in LLaVA-1.5), in Flax NNX. No I/O.

Layers are stacked ([L, ...] parameters) and run with `lax.scan` in segments; the segment
boundaries are a property of the forward pass, not of the parameter tree, so a checkpoint's
layout does not depend on which layers carry a grounding head. For decoding, `unroll()`
switches a model to one module per layer (and per head), run as an unrolled loop: a scanned
layer first copies its slice of every stacked weight, which a decode step (one token per
row) pays in full on every step. The decoder only calls the
grounding heads (their glue lives in `grounding.py`) and reads and returns keys and values
(the cache is `cache.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx, struct

from jaxground.models.config import GroundingConfig, TextConfig, dtype_of
from jaxground.models.cache import KVCache, LayerCache
from jaxground.models.grounding import (DecodeGrounding, GroundingInputs, apply_head,
                                        apply_head_decode, make_grounding_heads)
from jaxground.models.layers import scan_layers, stack_layers, unstack_layers
from jaxground.models.ops import Embed, Linear, attention, einsum, shard_rows


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in fp32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float, dtype, param_dtype, *, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * x32.astype(x.dtype)).astype(self.dtype)


def rope_cos_sin(positions_bt, head_dim: int, theta: float, dtype):
    """HF default RoPE tables: cos, sin [B, T, H] for integer positions [B, T]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs_bth, freqs_bth], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_btnh, cos_bth, sin_bth):
    """HF's rotate_half convention: the head dim is split in halves, not interleaved."""
    x1, x2 = jnp.split(x_btnh, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_btnh * cos_bth[:, :, None] + rotated * sin_bth[:, :, None]


def attention_mask(attention_mask_bt, q_len: int | None = None):
    """Causal + padding mask [B, 1, T, T] (True = may attend).

    A padded query row would otherwise attend to nothing; it is allowed its own key so the
    softmax stays finite (its output is never used).
    """
    b, t = attention_mask_bt.shape
    causal_tt = jnp.tril(jnp.ones((t, t), bool))
    valid_b1s = attention_mask_bt.astype(bool)[:, None, None, :]
    return (causal_tt[None, None] & valid_b1s) | jnp.eye(t, dtype=bool)[None, None]


def positions_from_mask(attention_mask_bt):
    """Position ids that ignore left padding: cumsum(mask) - 1 (pads get 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt, axis=-1) - 1, 0).astype(jnp.int32)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, *, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.impl = cfg.attention_impl
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, cfg.num_heads * h, use_bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(d, cfg.num_kv_heads * h, use_bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(d, cfg.num_kv_heads * h, use_bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(cfg.num_heads * h, d, use_bias=cfg.attention_bias, **kw)

    def _qkv(self, x_btd, cos_bth, sin_bth):
        q = rearrange(self.q_proj(x_btd), "b t (n h) -> b t n h", n=self.num_heads)
        k = rearrange(self.k_proj(x_btd), "b t (k h) -> b t k h", k=self.num_kv_heads)
        v = rearrange(self.v_proj(x_btd), "b t (k h) -> b t k h", k=self.num_kv_heads)
        return apply_rope(q, cos_bth, sin_bth), apply_rope(k, cos_bth, sin_bth), v

    def __call__(self, x_btd, cos_bth, sin_bth, mask_b1ts):
        """Self-attention over the sequence. Returns (out [B, T, D], (k, v) [B, T, K, H])."""
        q, k, v = self._qkv(x_btd, cos_bth, sin_bth)
        # Grouped-query attention: dot_product_attention shares each kv head across
        # num_heads // num_kv_heads query heads.
        if self.impl == "cudnn":
            out_btnh = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                    implementation="cudnn")
        else:
            out_btnh = attention(q, k, v, mask_b1ts)
        return self.o_proj(rearrange(out_btnh, "b t n h -> b t (n h)")), (k, v)

    def decode(self, x_bcd, cos_bch, sin_bch, cache: LayerCache):
        """C candidate tokens per row, all at the same next position, each attending to the
        cached keys and to itself only (not to each other): plain decoding is C = 1, guided
        decoding scores its top-k candidates in one pass. Returns (out [B, C, D], (k, v)
        [B, C, K, H]) - the caller writes the chosen token's k, v into the cache."""
        q, k, v = self._qkv(x_bcd, cos_bch, sin_bch)
        c = q.shape[1]
        # Heads lead the sequence in the cache ([B, K, S, H]), so both dots batch over
        # (b, k) with no transposed copy of the cache per step.
        q_bkqh = rearrange(q, "b c (k g) h -> b k (c g) h", k=self.num_kv_heads)
        scale = q.shape[-1] ** -0.5
        f32 = jnp.float32
        cached = einsum("bkqh,bksh->bkqs", q_bkqh, cache.k_bksh, f32) * scale
        cached = jnp.where(cache.valid_bs[:, None, None], cached, NEG_INF)
        own_bkq = rearrange(einsum("bckgh,bckh->bkcg",
                                   rearrange(q, "b c (k g) h -> b c k g h", k=self.num_kv_heads),
                                   k, f32),
                            "b k c g -> b k (c g)") * scale
        probs = jax.nn.softmax(jnp.concatenate([cached, own_bkq[..., None]], -1), -1)
        probs = probs.astype(v.dtype)
        out_bkqh = einsum("bkqs,bksh->bkqh", probs[..., :-1], cache.v_bksh)
        out = (rearrange(out_bkqh, "b k (c g) h -> b c k g h", c=c)
               + rearrange(probs[..., -1], "b k (c g) -> b c k g", c=c)[..., None]
               * v[:, :, :, None])
        return self.o_proj(rearrange(out, "b c k g h -> b c (k g h)")), (k, v)


NEG_INF = -1e30


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, *, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, param_dtype,
                                       rngs=rngs)
        self.self_attn = LlamaAttention(cfg, dtype, param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype,
                                                param_dtype, rngs=rngs)
        self.mlp = LlamaMLP(cfg, dtype, param_dtype, rngs=rngs)

    def block(self, x_btd, attend):
        """Pre-norm residual block around `attend(normed x) -> (out, (k, v))`: the same
        layer serves full sequences and cached decoding."""
        attn_btd, kv = attend(self.input_layernorm(x_btd))
        x_btd = x_btd + attn_btd
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd)), kv

    def __call__(self, x_btd, cos_bth, sin_bth, mask_b1ts):
        """Returns (hidden [B, T, D], (k, v) [B, T, K, H])."""
        return self.block(x_btd, lambda h: self.self_attn(h, cos_bth, sin_bth, mask_b1ts))


class LlamaModel(nnx.Module):
    """Token embedding, stacked decoder layers, final norm (no lm_head: LLaVA owns it)."""

    def __init__(self, cfg: TextConfig, dtype: str = "float32", param_dtype: str = "float32",
                 *, rngs: nnx.Rngs, grounding: GroundingConfig | None = None,
                 grounded_layers: tuple[int, ...] = (), remat: str = "none"):
        self.config = cfg
        self.remat = remat
        self.grounding_config = grounding
        self.grounded_layers = tuple(sorted(grounded_layers))
        dt, pdt = dtype_of(dtype), dtype_of(param_dtype)
        self.compute_dtype = dt
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                                      rngs=rngs)
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, dt, pdt, rngs=r), cfg.num_layers,
                                   rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, pdt, rngs=rngs)
        if self.grounded_layers:
            self.grounding_heads = make_grounding_heads(cfg, grounding, len(grounded_layers),
                                                        dt, pdt, rngs)

    def segments(self) -> list[tuple[int, int, int | None]]:
        """Runs of layers executed by one scan each: (start, stop, first head index or None
        for plain layers)."""
        grounded, out, start = set(self.grounded_layers), [], 0
        for l in range(1, self.config.num_layers + 1):
            if l == self.config.num_layers or ((l in grounded) != (start in grounded)):
                head = self.grounded_layers.index(start) if start in grounded else None
                out.append((start, l, head))
                start = l
        return out

    @property
    def unrolled(self) -> bool:
        return isinstance(self.layers, nnx.List)

    def unroll(self) -> None:
        """Switches, in place, to the inference layout: one module per layer and per head,
        each with its own parameter buffers (the peak is one extra stacked leaf, see
        `unstack_layers`). Same results; decode steps read weights without copying them
        (mid config: see bench/README). Meant for inference: checkpoints and training use
        the stacked layout."""
        for name in ("layers", "grounding_heads"):
            if hasattr(self, name) and not isinstance(getattr(self, name), nnx.List):
                split = [nnx.split(getattr(self, name))]
                delattr(self, name)  # the split holds the only reference now
                setattr(self, name, unstack_layers(split))

    def _run(self, x, body, use_heads: bool):
        """Runs every layer, one `lax.scan` per segment (or one traced copy per layer when
        unrolled).

        `body(layer, head, g, carry, l) -> (carry, (layer_out, head_out))` sees layer `l` and,
        in grounded layers, its head (index `g` among the heads) or None. Returns the final
        carry, the layer outputs stacked over all layers [L, ...], and the head outputs
        stacked over grounded layers [G, ...] (None without heads).
        """
        if self.unrolled:
            return self._run_unrolled(x, body, use_heads)
        heads = nnx.split(self.grounding_heads) if self.grounded_layers and use_heads else None
        layer_outs, head_outs = [], []
        for start, stop, head in self.segments():
            if head is None or heads is None:
                step = lambda layer, c, l: body(layer, None, None, c, l)
            else:
                head_def, head_state = heads

                def step(layer, c, l, offset=head - start):  # layer l carries head l + offset
                    g = l + offset
                    h = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, g, keepdims=False),
                                     head_state)
                    return body(layer, nnx.merge(head_def, h), g, c, l)

            x, (layer_out, head_out) = scan_layers(self.layers, x, step, start, stop,
                                                   xs=jnp.arange(start, stop), remat=self.remat)
            layer_outs.append(layer_out)
            if head is not None and heads is not None:
                head_outs.append(head_out)
        return x, _concat(layer_outs), _concat(head_outs)

    def _run_unrolled(self, x, body, use_heads: bool):
        """`_run` over per-layer modules: `l` and `g` are Python ints."""
        use_heads = use_heads and bool(self.grounded_layers)
        layer_outs, head_outs = [], []
        for l, layer in enumerate(self.layers):
            g = self.grounded_layers.index(l) if use_heads and l in self.grounded_layers else None
            x, (layer_out, head_out) = body(layer, None if g is None else self.grounding_heads[g],
                                            g, x, l)
            layer_outs.append(layer_out)
            if g is not None:
                head_outs.append(head_out)
        return x, _stack(layer_outs), _stack(head_outs)

    def __call__(self, inputs_embeds_btd, attention_mask_bt, positions_bt,
                 ground: GroundingInputs | None = None, return_kv: bool = False,
                 return_patches: bool = False) -> "DecoderOutput":
        """The decoder over full sequences (training, scoring, prefill). `return_kv` keeps
        every layer's keys and values (prefill), `return_patches` the heads' per-patch scores
        (heatmaps)."""
        cfg = self.config
        x_btd = shard_rows(inputs_embeds_btd.astype(self.compute_dtype))
        cos, sin = rope_cos_sin(positions_bt, cfg.head_dim, cfg.rope_theta, x_btd.dtype)
        mask = attention_mask(attention_mask_bt)
        keep = (lambda kv: kv) if return_kv else (lambda kv: None)

        def body(layer, head, g, x, l):
            x, kv = layer(x, cos, sin, mask)
            x = shard_rows(x)
            if head is None:
                return x, (keep(kv), None)
            x, logits_bt, image_bkd, *patch = apply_head(head, ground, x, return_patches)
            return x, (keep(kv), (logits_bt, image_bkd if return_kv else None,
                                  patch[0] if patch else None))

        x_btd, kv, head_out = self._run(x_btd, body, use_heads=ground is not None)
        scores, image, patches = head_out if head_out is not None else (None, None, None)
        return DecoderOutput(hidden=self.norm(x_btd), scores_gbt=scores, kv=kv,
                             image_gbkd=image, patches_gbtk=patches)

    def decode(self, x_bcd, positions_b, cache: KVCache, ground: DecodeGrounding | None):
        """C candidate next tokens per row [B, C, D] (embedded) at positions [B] against the
        cache. Returns (hidden [B, C, D], head logits [G, B, C] or None, (k, v) [L, B, C, K, H])."""
        cfg = self.config
        x_bcd = x_bcd.astype(self.compute_dtype)
        positions_bc = jnp.broadcast_to(positions_b[:, None], x_bcd.shape[:2])
        cos, sin = rope_cos_sin(positions_bc, cfg.head_dim, cfg.rope_theta, x_bcd.dtype)

        def body(layer, head, g, x, l):
            view = cache.layer(l)
            x, kv = layer.block(x, lambda h: layer.self_attn.decode(h, cos, sin, view))
            if head is None:
                return x, (kv, None)
            x, logits_bc = apply_head_decode(head, ground, x, g)
            return x, (kv, logits_bc)

        x_bcd, kv, scores_gbc = self._run(x_bcd, body, use_heads=ground is not None)
        return self.norm(x_bcd), scores_gbc, kv


def _stack(parts: list):
    """Stacks per-layer outputs on a new leading (layer) axis."""
    return jax.tree.map(lambda *a: jnp.stack(a), *parts) if parts else None


def _concat(parts: list):
    """Concatenates per-segment scan outputs along their leading (layer) axis."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


@struct.dataclass
class DecoderOutput:
    hidden: jax.Array                   # [B, T, D] after the final norm
    scores_gbt: jax.Array | None        # [G, B, T] head logits, or None without heads
    kv: tuple | None = None             # (k, v) [L, B, T, K, H] when asked for
    image_gbkd: jax.Array | None = None  # [G, B, K, D] what each head compared against
    patches_gbtk: jax.Array | None = None  # [G, B, T, K] per-patch scores behind each score
