"""Training losses: LM cross-entropy on positive captions + lambda * grounding loss.

Batch conventions (all [B, T] unless noted; produced by the data pipeline):
  labels            LM targets aligned with input_ids (HF style, shifted here); -100 = none
  grounding_labels  1 = mention of an object in the image, 0 = of an absent (hallucinated)
                    object, -1 = no label
  lm_rows     [B]   rows whose answer trains the LM: faithful captions and every question
                    (a "no" answer is faithful too); hallucinated captions never do
  is_positive [B]   margin role: True for the row whose object mentions are real
  pair_index  [B]   row of the paired example (positive <-> negative), -1 if unpaired
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxground.utils.auroc import auroc

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class LossConfig:
    objective: str = "lm"        # "lm": LM + grounding loss; "contrastive": CLIP-style
                                 # pretraining of the vision tower (training/contrastive.py)
    grounding_weight: float = 1.0
    grounding_loss: str = "bce"  # "bce" | "margin"
    margin: float = 1.0
    temperature: float = 0.07    # contrastive: cosines / temperature (CLIP's initial value)
    pooling: str = "mean"        # contrastive: "mean" (CLIP: mean patch vs mean token) or
                                 # "token_max" (FILIP: each token's best patch, averaged)


def lm_loss(logits_btv, labels_bt, lm_rows_b):
    """Mean next-token cross-entropy over answer tokens of the rows in `lm_rows_b`.

    Returns (loss, number of tokens). Logits are upcast to fp32 here, token by token.
    """
    targets = labels_bt[:, 1:]
    valid = (targets != IGNORE) & lm_rows_b[:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits_btv[:, :-1].astype(jnp.float32), jnp.where(valid, targets, 0))
    count = valid.sum()
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(count, 1), count


def bce_grounding_loss(scores_bt, grounding_labels_bt, grounding_mask_bt):
    """Mean binary cross-entropy of the grounding logits over labelled, scored tokens."""
    valid = (grounding_labels_bt >= 0) & grounding_mask_bt
    bce = optax.sigmoid_binary_cross_entropy(scores_bt.astype(jnp.float32),
                                             (grounding_labels_bt == 1).astype(jnp.float32))
    return jnp.sum(jnp.where(valid, bce, 0.0)) / jnp.maximum(valid.sum(), 1)


def margin_grounding_loss(scores_bt, grounding_labels_bt, grounding_mask_bt, is_positive_b,
                          pair_index_b, margin: float):
    """Hinge on paired captions: mean score of the positive's present-object tokens must
    exceed the mean score of its negative's hallucinated-object tokens by `margin`."""
    s = scores_bt.astype(jnp.float32)
    want = jnp.where(is_positive_b[:, None], 1, 0)
    tokens = (grounding_labels_bt == want) & grounding_mask_bt
    count_b = tokens.sum(-1)
    mean_b = jnp.sum(jnp.where(tokens, s, 0.0), -1) / jnp.maximum(count_b, 1)
    partner = jnp.clip(pair_index_b, 0, s.shape[0] - 1)
    valid_b = (is_positive_b & (pair_index_b >= 0) & (count_b > 0) & (count_b[partner] > 0)
               & ~is_positive_b[partner])
    hinge_b = jax.nn.relu(margin - (mean_b - mean_b[partner]))
    return jnp.sum(jnp.where(valid_b, hinge_b, 0.0)) / jnp.maximum(valid_b.sum(), 1)


def grounding_loss(output, batch: dict, cfg: LossConfig):
    labels, mask = batch["grounding_labels"], output.grounding_mask
    if cfg.grounding_loss == "bce":
        return bce_grounding_loss(output.grounding, labels, mask)
    if cfg.grounding_loss == "margin":
        return margin_grounding_loss(output.grounding, labels, mask, batch["is_positive"],
                                     batch["pair_index"], cfg.margin)
    raise ValueError(f"loss.grounding_loss {cfg.grounding_loss!r}: use 'bce' or 'margin'")


def total_loss(output, batch: dict, cfg: LossConfig):
    """(loss, metrics) for a model output and a batch dict (see module docstring).

    The grounding loss and AUROC are reported even at weight 0 (an ungrounded baseline's
    scores are still measured); at weight 0 the loss is exactly the LM loss.
    """
    lm, n_tokens = lm_loss(output.logits, batch["labels"], batch["lm_rows"])
    metrics = {"lm_loss": lm, "lm_tokens": n_tokens}
    if output.grounding is None:  # a model without heads
        return lm, {**metrics, "loss": lm, "grounding_loss": jnp.zeros(()),
                    "grounding_auroc": jnp.full((), jnp.nan)}
    g = grounding_loss(output, batch, cfg)
    labels = batch["grounding_labels"]
    labelled = (labels >= 0) & output.grounding_mask
    metrics["grounding_auroc"] = auroc(output.grounding.reshape(-1), labels.reshape(-1),
                                       labelled.reshape(-1), xp=jnp)
    metrics["grounding_loss"] = g
    loss = lm if cfg.grounding_weight == 0 else lm + cfg.grounding_weight * g
    return loss, {**metrics, "loss": loss}
