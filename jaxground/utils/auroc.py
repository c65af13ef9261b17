"""The one AUROC: P(positive scored above negative) + 0.5 * P(tie), nan without both classes.

Written once for both array libraries: training computes it inside jit on device arrays
(`xp=jax.numpy`, static shapes, a `valid` mask instead of filtering); evaluation calls it
with NumPy in float64 (`xp=numpy`, the default).
"""

from __future__ import annotations

import numpy as np


def auroc(scores, labels, valid=None, xp=np):
    """AUROC of `scores` for `labels` in {0, 1} over the entries where `valid` holds.

    Each positive wins against every negative scored below it and half-wins against every
    negative with the same score (Mann-Whitney U / (n_pos * n_neg)).
    """
    s = xp.asarray(scores).astype(xp.float64 if xp is np else xp.float32)
    labels = xp.asarray(labels)
    valid = xp.ones(s.shape, bool) if valid is None else xp.asarray(valid)
    pos = valid & (labels == 1)
    neg = valid & (labels == 0)
    n_pos, n_neg = pos.sum(), neg.sum()
    neg_sorted = xp.sort(xp.where(neg, s, xp.inf))  # non-negatives pad the top
    below = xp.searchsorted(neg_sorted, s, side="left")  # negatives scored lower
    not_above = xp.minimum(xp.searchsorted(neg_sorted, s, side="right"), n_neg)
    wins = below + 0.5 * (not_above - below)
    u = xp.sum(xp.where(pos, wins, 0.0))
    return xp.where((n_pos > 0) & (n_neg > 0), u / xp.maximum(n_pos * n_neg, 1), xp.nan)
