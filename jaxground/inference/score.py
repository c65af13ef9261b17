"""Teacher-forced scoring of given sequences: grounding per token plus the LM's own
uncertainty (token log p and predictive entropy), the baselines grounding is compared to."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxground.models.llava import LlavaModel, check_image_tokens, check_padding_supported
from jaxground.models.ops import model_jit


@struct.dataclass
class Scores:
    logprobs: jax.Array          # [B, T] log p(x_t | x_<t) (0 at t = 0 and at padding)
    entropy: jax.Array           # [B, T] entropy of p(. | x_<t)
    grounding: jax.Array | None  # [B, T] aggregated head logits (None without heads/images)
    grounding_mask: jax.Array | None  # [B, T] bool: positions carrying a score
    grounding_scores: dict = struct.field(default_factory=dict)  # {layer: [B, T]}
    patches: jax.Array | None = None  # [B, T, K] per-patch scores (mean over grounded layers)


def score(model: LlavaModel, input_ids, pixel_values=None, attention_mask=None,
          patches: bool = False) -> Scores:
    """Scores every token of left-padded sequences [B, T] (prompt + caption) in one pass.
    `patches` adds the per-patch scores behind each token's score [B, T, K] (heatmaps)."""
    input_ids = np.asarray(input_ids)
    check_image_tokens(input_ids, pixel_values, model.config)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    check_padding_supported(model.config, mask)
    return _score(model, jnp.asarray(input_ids),
                  None if pixel_values is None else jnp.asarray(pixel_values),
                  jnp.asarray(mask), patches)


@model_jit(static_argnames=("patches",))
def _score(model: LlavaModel, input_ids, pixel_values, attention_mask, patches) -> Scores:
    out = model.forward(input_ids, pixel_values, attention_mask, patches=patches)
    logp_btv = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), axis=-1)
    # Image-token ids may lie outside the vocabulary; their log p is meaningless anyway.
    targets = jnp.where(out.image_mask[:, 1:], 0, input_ids[:, 1:])
    token_logp = jnp.take_along_axis(logp_btv, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_btv) * logp_btv, axis=-1)
    keep = attention_mask[:, 1:].astype(bool) & ~out.image_mask[:, 1:]
    first = jnp.zeros_like(token_logp[:, :1])
    return Scores(logprobs=jnp.concatenate([first, jnp.where(keep, token_logp, 0.0)], 1),
                  entropy=jnp.concatenate([first, jnp.where(keep, entropy, 0.0)], 1),
                  grounding=out.grounding, grounding_mask=out.grounding_mask,
                  grounding_scores=out.grounding_scores, patches=out.grounding_patches)


def patch_maps(patches_nk, config):
    """Per-patch scores [..., K] of the image's ViT patches only: without the class token,
    which the "full" feature strategy keeps among the image tokens."""
    return patches_nk[..., 1:] if config.vision_feature_select_strategy == "full" else patches_nk
