"""Grounding heads: how well is each text token supported by the image?

A head maps (text hidden states [B, T, D], image features [B, P, Dv], masks) to a logit per
token [B, T]. Heads run inside the grounded decoder layers (see `llama.py`), in every
forward pass: training, teacher-forced scoring and generation. This module also owns the
glue: which positions a head compares (`grounding_inputs`, `GroundingInputs`,
`DecodeGrounding`) and how a head's result joins a layer's output (`apply_head`,
`apply_head_decode`), so the decoder only calls them.

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
from flax import nnx, struct

from jaxground.models.config import GroundingConfig, TextConfig
from jaxground.models.layers import stack_layers
from jaxground.models.ops import Linear, einsum

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
            self.text_proj = Linear(text_dim, cfg.dim, **kw)
            self.image_proj = Linear(image_dim, cfg.dim, **kw)
        elif cfg.type == "cross_attention":
            if text_dim % cfg.num_heads:
                raise ValueError(f"grounding.num_heads={cfg.num_heads} must divide the hidden "
                                 f"size {text_dim}")
            self.q_proj = Linear(text_dim, text_dim, **kw)
            self.k_proj = Linear(image_dim, text_dim, **kw)
            self.v_proj = Linear(image_dim, text_dim, **kw)
            self.o_proj = Linear(text_dim, text_dim, **kw)
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
        logits_bntp = einsum("btnh,bpnh->bntp", q, k, jnp.float32)
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
        summary_btd = rearrange(einsum("bntp,bpnh->btnh", probs, v), "b t n h -> b t (n h)")
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


def make_grounding_heads(text: TextConfig, grounding: GroundingConfig, num: int, dtype,
                         param_dtype, rngs: nnx.Rngs) -> GroundingHead:
    """`num` heads stacked on a leading [G] axis (one per grounded layer)."""
    d = text.hidden_size
    return stack_layers(lambda r: GroundingHead(grounding, d, d, dtype, param_dtype, rngs=r),
                        num, rngs)


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


def grounding_inputs(embeds_btd, image_mask_bt, attention_mask_bt, image_seq_length: int,
                     image_features: str) -> GroundingInputs:
    """Each row's image patches (its first `image_seq_length` image tokens; one image per
    row, as in LLaVA-1.5), the text positions to score, and, with `image_features` =
    "projected", the projected features the heads compare against."""
    k = image_seq_length
    positions_bk, valid_bk = image_slots(image_mask_bt, k)
    t = image_mask_bt.shape[1]
    text_bn, _ = image_slots(~image_mask_bt, t - k if t > k else t)
    text_mask_bt = grounding_mask(image_mask_bt, attention_mask_bt)
    projected = gather_rows(embeds_btd, positions_bk) if image_features == "projected" else None
    return GroundingInputs(image_positions_bk=positions_bk, image_valid_bk=valid_bk,
                           text_positions_bn=text_bn,
                           text_valid_bn=jnp.take_along_axis(text_mask_bt, text_bn, axis=1),
                           text_mask_bt=text_mask_bt, projected_bkd=projected)


def apply_head(head: GroundingHead, ground: GroundingInputs, x_btd, patches: bool = False):
    """A grounding head on a grounded layer's output.

    Returns (hidden [B, T, D], logits [B, T], image features [B, K, D] the head compared
    against, and with `patches` the per-patch scores [B, T, K] (0 at unscored positions)). The head only sees the N candidate text positions of each row (N = T - image
    tokens: in LLaVA most of the sequence is image, which is never scored), and its results
    are scattered back. A cross-attention head's gated image summary joins the residual
    stream at scored positions only.
    """
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
    if not patches:
        return x_btd, logits_bt, image_bkd
    patch_bnk = head.patch_scores(text_bnd, image_bkd, ground.image_valid_bk)
    patch_btk = jnp.zeros(x_btd.shape[:2] + patch_bnk.shape[-1:], jnp.float32).at[rows, cols].set(
        jnp.where(valid[..., None], patch_bnk, 0.0))
    return x_btd, logits_bt, image_bkd, patch_btk


@struct.dataclass
class DecodeGrounding:
    """What the heads need at decode time, fixed after prefill."""

    image_gbkd: jax.Array     # [G or 1, B, K, D] image features per head (1: shared)
    image_valid_bk: jax.Array  # [B, K] bool
    scored_b: jax.Array        # [B] bool: rows with an image (their new tokens get a score)

    @classmethod
    def from_prefill(cls, ground: GroundingInputs, layer_image_gbkd) -> "DecodeGrounding":
        """The prompt's grounding inputs; `layer_image_gbkd` [G, B, K, D] is what each head
        compared against in the prefill (used when the heads read image-token hidden
        states rather than the shared projected features)."""
        image = (ground.projected_bkd[None] if ground.projected_bkd is not None
                 else layer_image_gbkd)
        return cls(image_gbkd=image, image_valid_bk=ground.image_valid_bk,
                   scored_b=ground.image_valid_bk.any(-1))


def apply_head_decode(head: GroundingHead, ground: DecodeGrounding, x_bcd, g):
    """Head `g` (may be traced) on C candidate tokens per row [B, C, D] at decode time.
    Returns (hidden [B, C, D], logits [B, C], 0 in rows without an image)."""
    image_bkd = (ground.image_gbkd[0] if ground.image_gbkd.shape[0] == 1
                 else jax.lax.dynamic_index_in_dim(ground.image_gbkd, g, keepdims=False))
    logits_bc, update_bcd = head(x_bcd, image_bkd, ground.image_valid_bk)
    scored_b1 = ground.scored_b[:, None]
    if update_bcd is not None:
        x_bcd = x_bcd + jnp.where(scored_b1[..., None], update_bcd, 0)
    return x_bcd, jnp.where(scored_b1, logits_bc, 0.0)
