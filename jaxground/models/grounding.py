"""Grounding heads: how well is each text token supported by the image?

A head maps (text hidden states [B, T, D], image features [B, P, Dv], masks) to a logit per
token [B, T]. Heads run inside the grounded decoder layers (see `llama.py`), in every
forward pass: training, teacher-forced scoring and generation.

Score definitions (s is then calibrated to a logit: scale * s + bias, both learnable):
- similarity: s_t = max_p cos(h_t, v_p). Parameter-free apart from the calibration.
- learned:    s_t = max_p cos(W_t h_t, W_v v_p), projections into `grounding.dim`.
- cross_attention: multi-head attention of text queries over image patches,
      a_{t,p,n} = <W_q h_t, W_k v_p>_n / sqrt(d_head)
      s_t = mean_n [ logsumexp_p a_{t,p,n} - log P_valid ]
  i.e. a smooth maximum of the attention logits (how strongly some patch answers the
  token), which the softmax itself discards. The attended image summary
  W_o softmax_p(a) W_v v is added to the residual stream through tanh(gate), gate
  initialised to 0, so a converted model's logits are unchanged at initialisation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from jaxground.models.config import GroundingConfig

NEG = -1e30


def unit(x, axis=-1, eps=1e-8):
    """x / ||x|| in float32 (cosines of bf16 activations lose too much in bf16)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def cosines(text_btd, image_bpd):
    """cos(text_t, image_p): [B, T, P]."""
    return jnp.einsum("btd,bpd->btp", unit(text_btd), unit(image_bpd))


def max_cosine(text_btd, image_bpd, image_valid_bp):
    """max over valid patches of cos(text_t, image_p): [B, T]."""
    cos_btp = jnp.where(image_valid_bp[:, None, :], cosines(text_btd, image_bpd), NEG)
    return jnp.max(cos_btp, axis=-1)


class GroundingHead(nnx.Module):
    """One head; which parts exist depends on `cfg.type`."""

    def __init__(self, cfg: GroundingConfig, text_dim: int, image_dim: int, dtype, param_dtype,
                 *, rngs: nnx.Rngs):
        self.type = cfg.type
        self.num_heads = cfg.num_heads
        self.scale = nnx.Param(jnp.full((), cfg.init_scale, jnp.float32))
        self.bias = nnx.Param(jnp.full((), cfg.init_bias, jnp.float32))
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.type == "learned":
            self.text_proj = nnx.Linear(text_dim, cfg.dim, **kw)
            self.image_proj = nnx.Linear(image_dim, cfg.dim, **kw)
        elif cfg.type == "cross_attention":
            if text_dim % cfg.num_heads:
                raise ValueError(f"grounding.num_heads={cfg.num_heads} must divide the hidden "
                                 f"size {text_dim}")
            self.q_proj = nnx.Linear(text_dim, text_dim, **kw)
            self.k_proj = nnx.Linear(image_dim, text_dim, **kw)
            self.v_proj = nnx.Linear(image_dim, text_dim, **kw)
            self.o_proj = nnx.Linear(text_dim, text_dim, **kw)
            self.gate = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, text_btd, image_bpd, image_valid_bp):
        """Returns (logits [B, T] float32, residual update [B, T, D] or None)."""
        update = None
        if self.type == "similarity":
            s_bt = max_cosine(text_btd, image_bpd, image_valid_bp)
        elif self.type == "learned":
            s_bt = max_cosine(self.text_proj(text_btd), self.image_proj(image_bpd),
                              image_valid_bp)
        else:
            s_bt, update = self._cross_attention(text_btd, image_bpd, image_valid_bp)
        return self.scale[...] * s_bt + self.bias[...], update

    def patch_scores(self, text_btd, image_bpd, image_valid_bp):
        """The per-patch evidence behind each token's score [B, T, P] (for heatmaps): the
        cosines a similarity / learned head maximises, or a cross-attention head's attention
        logits averaged over its heads. NaN at invalid patches."""
        if self.type == "similarity":
            s_btp = cosines(text_btd, image_bpd)
        elif self.type == "learned":
            s_btp = cosines(self.text_proj(text_btd), self.image_proj(image_bpd))
        else:
            s_btp = jnp.mean(self._attention_logits(text_btd, image_bpd), axis=1)
        return jnp.where(image_valid_bp[:, None, :], s_btp, jnp.nan)

    def _attention_logits(self, text_btd, image_bpd):
        """[B, n, T, P] float32."""
        q = rearrange(self.q_proj(text_btd), "b t (n h) -> b t n h", n=self.num_heads)
        k = rearrange(self.k_proj(image_bpd), "b p (n h) -> b p n h", n=self.num_heads)
        logits_bntp = jnp.einsum("btnh,bpnh->bntp", q, k).astype(jnp.float32)
        return logits_bntp / jnp.sqrt(jnp.float32(q.shape[-1]))

    def _cross_attention(self, text_btd, image_bpd, image_valid_bp):
        n = self.num_heads
        v = rearrange(self.v_proj(image_bpd), "b p (n h) -> b p n h", n=n)
        logits_bntp = self._attention_logits(text_btd, image_bpd)
        logits_bntp = jnp.where(image_valid_bp[:, None, None, :], logits_bntp, NEG)
        lse_bnt = jax.nn.logsumexp(logits_bntp, axis=-1)
        count_b = jnp.maximum(image_valid_bp.sum(-1), 1).astype(jnp.float32)
        s_bt = jnp.mean(lse_bnt, axis=1) - jnp.log(count_b)[:, None]
        probs = jax.nn.softmax(logits_bntp, axis=-1).astype(v.dtype)
        summary_btd = rearrange(jnp.einsum("bntp,bpnh->btnh", probs, v), "b t n h -> b t (n h)")
        update = jnp.tanh(self.gate[...]).astype(text_btd.dtype) * self.o_proj(summary_btd)
        return s_bt, update


def image_slots(image_mask_bt, num_slots: int):
    """Positions [B, K] of each row's first K image tokens, in order, and their validity."""
    order_bt = jnp.argsort(~image_mask_bt, axis=1, stable=True)[:, :num_slots]
    return order_bt, jnp.take_along_axis(image_mask_bt, order_bt, axis=1)


def grounding_mask(image_mask_bt, attention_mask_bt):
    """Text tokens after the (first) image of their row: the positions that get a score."""
    after_image = jnp.cumsum(image_mask_bt, axis=1) > 0
    return after_image & ~image_mask_bt & attention_mask_bt.astype(bool)


def gather_rows(x_btd, positions_bk):
    return jnp.take_along_axis(x_btd, positions_bk[..., None], axis=1)


def aggregate(scores_lbt, how: str):
    return jnp.mean(scores_lbt, axis=0) if how == "mean" else jnp.max(scores_lbt, axis=0)
