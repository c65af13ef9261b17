"""LLaMA decoder (Vicuna in LLaVA-1.5), in Flax NNX. No I/O.

Layers are stacked ([L, ...] parameters) and run with `lax.scan` in segments; the segment
boundaries are a property of the forward pass, not of the parameter tree, so a checkpoint's
layout does not depend on which layers carry a grounding head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx, struct

from jaxground.models.config import GroundingConfig, TextConfig, dtype_of
from jaxground.models.grounding import GroundingHead, gather_rows
from jaxground.models.layers import scan_layers, stack_layers


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
        self.q_proj = nnx.Linear(d, cfg.num_heads * h, use_bias=cfg.attention_bias, **kw)
        self.k_proj = nnx.Linear(d, cfg.num_kv_heads * h, use_bias=cfg.attention_bias, **kw)
        self.v_proj = nnx.Linear(d, cfg.num_kv_heads * h, use_bias=cfg.attention_bias, **kw)
        self.o_proj = nnx.Linear(cfg.num_heads * h, d, use_bias=cfg.attention_bias, **kw)

    def __call__(self, x_btd, cos_bth, sin_bth, mask_b1ts):
        q = rearrange(self.q_proj(x_btd), "b t (n h) -> b t n h", n=self.num_heads)
        k = rearrange(self.k_proj(x_btd), "b t (k h) -> b t k h", k=self.num_kv_heads)
        v = rearrange(self.v_proj(x_btd), "b t (k h) -> b t k h", k=self.num_kv_heads)
        q, k = apply_rope(q, cos_bth, sin_bth), apply_rope(k, cos_bth, sin_bth)
        # Grouped-query attention: dot_product_attention shares each kv head across
        # num_heads // num_kv_heads query heads.
        if self.impl == "cudnn":
            out_btnh = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                    implementation="cudnn")
        else:
            out_btnh = jax.nn.dot_product_attention(q, k, v, mask=mask_b1ts)
        return self.o_proj(rearrange(out_btnh, "b t n h -> b t (n h)"))


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, param_dtype, *, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

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

    def __call__(self, x_btd, cos_bth, sin_bth, mask_b1ts):
        x_btd = x_btd + self.self_attn(self.input_layernorm(x_btd), cos_bth, sin_bth, mask_b1ts)
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd))

    def grounded(self, head: GroundingHead, ground: "GroundingInputs", x_btd, cos_bth, sin_bth,
                 mask_b1ts):
        """The layer, then its grounding head on the layer's output.

        Returns (hidden [B, T, D], logits [B, T]). The head only sees the N candidate text
        positions of each row (N = T - image tokens: in LLaVA most of the sequence is image,
        which is never scored), and its results are scattered back. A cross-attention head's
        gated image summary joins the residual stream at scored positions only.
        """
        x_btd = self(x_btd, cos_bth, sin_bth, mask_b1ts)
        image_bkd = (ground.projected_bkd if ground.projected_bkd is not None
                     else gather_rows(x_btd, ground.image_positions_bk))
        text_bnd = gather_rows(x_btd, ground.text_positions_bn)
        logits_bn, update_bnd = head(text_bnd, image_bkd, ground.image_valid_bk)
        rows = jnp.arange(x_btd.shape[0])[:, None]
        cols = ground.text_positions_bn
        valid = ground.text_valid_bn
        if update_bnd is not None:
            x_btd = x_btd.at[rows, cols].add(jnp.where(valid[..., None], update_bnd, 0))
        logits_bt = jnp.zeros(x_btd.shape[:2], jnp.float32).at[rows, cols].set(
            jnp.where(valid, logits_bn, 0.0))
        return x_btd, logits_bt


@struct.dataclass
class GroundingInputs:
    """What the grounded layers need besides the hidden states."""

    image_positions_bk: jax.Array       # [B, K] positions of each row's image tokens
    image_valid_bk: jax.Array           # [B, K] bool
    text_positions_bn: jax.Array        # [B, N] candidate text positions (distinct per row)
    text_valid_bn: jax.Array            # [B, N] bool: those that get a score
    text_mask_bt: jax.Array             # [B, T] bool: positions that get a score
    projected_bkd: jax.Array | None     # [B, K, D] projected image features, or None to
                                        # use the image-token hidden states of each layer


def make_grounding_heads(text: TextConfig, grounding: GroundingConfig, num: int, dtype,
                         param_dtype, rngs: nnx.Rngs) -> GroundingHead:
    """`num` heads stacked on a leading [G] axis (one per grounded layer)."""
    d = text.hidden_size
    return stack_layers(lambda r: GroundingHead(grounding, d, d, dtype, param_dtype, rngs=r),
                        num, rngs)


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
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
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

    def __call__(self, inputs_embeds_btd, attention_mask_bt, positions_bt,
                 ground: GroundingInputs | None = None):
        """Returns (final normed hidden states [B, T, D], head logits [G, B, T] or None)."""
        cfg = self.config
        x_btd = inputs_embeds_btd.astype(self.compute_dtype)
        cos, sin = rope_cos_sin(positions_bt, cfg.head_dim, cfg.rope_theta, x_btd.dtype)
        mask = attention_mask(attention_mask_bt)
        plain = lambda layer, c, _: (layer(c, cos, sin, mask), None)
        heads = nnx.split(self.grounding_heads) if self.grounded_layers else None
        scores = []
        for start, stop, head in self.segments():
            if head is None or ground is None:
                x_btd, _ = scan_layers(self.layers, x_btd, plain, start, stop,
                                       remat=self.remat)
                continue
            head_def, head_state = heads
            offset = head - start  # layer i carries head i + offset

            def grounded(layer, c, i):
                h_state = jax.tree.map(
                    lambda a: jax.lax.dynamic_index_in_dim(a, i + offset, keepdims=False),
                    head_state)
                return layer.grounded(nnx.merge(head_def, h_state), ground, c, cos, sin, mask)

            x_btd, logits_gbt = scan_layers(self.layers, x_btd, grounded, start, stop,
                                            xs=jnp.arange(start, stop), remat=self.remat)
            scores.append(logits_gbt)
        return self.norm(x_btd), (jnp.concatenate(scores) if scores else None)
