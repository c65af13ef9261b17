"""CLIP-style contrastive pretraining (`loss.objective = "contrastive"`): the vision tower
learns what is in an image before any LLM sees it, as LLaVA's CLIP did.

Images are their projected patch features (vision tower -> projector, [G, P, D]); captions
their tokens' input embeddings (the LLM's embedding table as a bag-of-words text tower,
[R, T, D]). `loss.pooling` picks the similarity: "mean" (CLIP: mean patch vs mean token) or
"token_max" (FILIP: each token's best patch, averaged). The loss is CLIP's symmetric
InfoNCE over similarities / temperature (Radford et al. 2021), with one addition the
data gives for free: each image's hallucinated twin caption (the pipeline's negative row,
one object changed) is among the captions its softmax must reject, a hard negative that
only an encoder which sees every object can tell apart. The LLM's layers are not run.

Batch layout (jaxground.data.pipeline): rows [2G], image g's rows 2g (faithful caption,
`lm_rows` set unless a placeholder) and 2g + 1 (its negative); `labels` != -100 marks the
caption tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxground.data.processor import IGNORE


def _unit(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


def _caption_embeds(model, input_ids, labels):
    """([R, T, D] fp32 input embeddings, [R, T] bool: the caption (answer) tokens)."""
    caption_rt = labels != IGNORE
    embeds_rtd = model.language_model.embed_tokens(jnp.where(caption_rt, input_ids, 0))
    return embeds_rtd.astype(jnp.float32), caption_rt


def image_embeddings(model, pixel_values):
    """[G, D] unit vectors: mean over patches of the projected image features."""
    return _unit(jnp.mean(model.image_features(pixel_values), axis=1))


def caption_embeddings(model, input_ids, labels):
    """[R, D] unit vectors: mean input embedding of each row's caption tokens."""
    embeds_rtd, caption_rt = _caption_embeds(model, input_ids, labels)
    total_rd = jnp.sum(jnp.where(caption_rt[..., None], embeds_rtd, 0.0), 1)
    return _unit(total_rd / jnp.maximum(caption_rt.sum(-1, keepdims=True), 1))


def token_max_similarity(model, batch: dict):
    """[G, R] FILIP's late interaction (Yao et al. 2021): for image g and caption r, the mean
    over r's tokens of the best cosine between the token and any of g's patches. What a
    similarity grounding head computes per token, so the pretrained patches are what the
    heads will compare words with."""
    patches_gpd = _unit(model.image_features(batch["pixel_values"]))
    embeds_rtd, caption_rt = _caption_embeds(model, batch["input_ids"], batch["labels"])
    tokens_rtd = _unit(embeds_rtd)
    best_grt = jnp.max(jnp.einsum("gpd,rtd->grtp", patches_gpd, tokens_rtd), axis=-1)
    count_r = jnp.maximum(caption_rt.sum(-1), 1)
    return jnp.sum(jnp.where(caption_rt[None], best_grt, 0.0), -1) / count_r


def mean_pooled_similarity(model, batch: dict):
    """[G, R] CLIP's: cosine between the mean patch and the mean caption token."""
    images_gd = image_embeddings(model, batch["pixel_values"])
    return images_gd @ caption_embeddings(model, batch["input_ids"], batch["labels"]).T


SIMILARITIES = {"mean": mean_pooled_similarity, "token_max": token_max_similarity}


def contrastive_loss(model, batch: dict, temperature: float, pooling: str = "mean"):
    """(loss, metrics): symmetric InfoNCE between images and their faithful captions.

    Image -> text: image g against every caption of the batch (faithful and hallucinated),
    the target its own faithful row 2g. Text -> image: faithful row 2g against every image.
    Images whose group is a placeholder (no faithful caption) are left out of both.
    """
    logits_gr = SIMILARITIES[pooling](model, batch) / temperature  # [G, R]
    g, r = logits_gr.shape
    own_g = jnp.arange(g) * (r // g)                          # each image's faithful row
    valid_g = batch["lm_rows"][own_g]
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits_gr, own_g)
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits_gr[:, own_g].T, jnp.arange(g))
    count = jnp.maximum(valid_g.sum(), 1)
    mean = lambda x: jnp.sum(jnp.where(valid_g, x, 0.0)) / count
    loss = (mean(i2t) + mean(t2i)) / 2
    # Did the image pick its own caption over every other, its hallucinated twin included?
    retrieved = jnp.argmax(logits_gr, -1) == own_g
    twin = logits_gr[jnp.arange(g), own_g] > logits_gr[jnp.arange(g), own_g + 1]
    metrics = {"loss": loss, "contrastive_loss": loss,
               "retrieval_accuracy": mean(retrieved.astype(jnp.float32)),
               "beats_hallucinated_twin": mean(twin.astype(jnp.float32)),
               "grounding_auroc": jnp.full((), jnp.nan)}
    return loss, metrics
