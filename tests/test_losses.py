"""Training losses against float64 NumPy references on hand-made batches: BCE grounding
loss (which positions count), margin loss, LM cross-entropy (answer tokens of LM rows),
total = lm + lambda * grounding, and the batch AUROC (ties count half)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxground.eval.grounding_auroc import auroc as eval_auroc
from jaxground.models.llava import LlavaOutput
from jaxground.utils.auroc import auroc
from jaxground.training.losses import (IGNORE, LossConfig, bce_grounding_loss,
                                       grounding_loss, lm_loss, margin_grounding_loss,
                                       total_loss)


def np_bce(x, y):
    """Binary cross-entropy with logits, float64, elementwise."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


def np_lm_loss(logits, labels, lm_rows):
    """Mean CE of logits[b, t] predicting labels[b, t + 1] over labelled tokens of LM rows."""
    logits = np.asarray(logits, np.float64)
    terms = []
    for b, t in itertools.product(range(logits.shape[0]), range(logits.shape[1] - 1)):
        target = int(labels[b, t + 1])
        if lm_rows[b] and target != IGNORE:
            z = logits[b, t]
            logz = z.max() + np.log(np.exp(z - z.max()).sum())
            terms.append(logz - z[target])
    return float(np.mean(terms)), len(terms)


# A hand-made [B=2, T=5] grounding example. Counted: label 1/0 AND mask. The positions
# that must not count are given large BCE so that counting them moves the mean a lot.
SCORES = np.array([[2.0, -1.0, 0.5, -3.0, 4.0],
                   [-2.0, -2.5, 0.0, -0.5, 1.0]], np.float32)
LABELS = np.array([[1, 0, -1, 1, -1],
                   [0, 1, 1, -1, 0]], np.int32)
MASK = np.array([[True, True, True, False, True],
                 [True, False, True, True, False]])
COUNTED = [(0, 0), (0, 1), (1, 0), (1, 2)]


def bce_expected():
    return float(np.mean([np_bce(SCORES[p], LABELS[p] == 1) for p in COUNTED]))


def test_counted_positions_are_exactly_labelled_and_masked():
    counted = {tuple(p) for p in np.argwhere((LABELS >= 0) & MASK)}
    assert counted == set(COUNTED)


def test_bce_grounding_loss_value():
    got = bce_grounding_loss(jnp.asarray(SCORES), jnp.asarray(LABELS), jnp.asarray(MASK))
    np.testing.assert_allclose(float(got), bce_expected(), rtol=1e-6)
    # Hand check of the pieces: bce(2, 1) + bce(-1, 0) + bce(-2, 0) + bce(0, 1)
    # = 2 * log(1 + e^-2) + log(1 + e^-1) + log 2.
    by_hand = (2 * np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0)) + np.log(2.0)) / 4
    np.testing.assert_allclose(float(got), by_hand, rtol=1e-6)


def test_bce_ignores_masked_and_unlabelled_positions_whatever_their_scores():
    base = float(bce_grounding_loss(jnp.asarray(SCORES), jnp.asarray(LABELS),
                                    jnp.asarray(MASK)))
    ignored = ~((LABELS >= 0) & MASK)
    wild = np.where(ignored, 50.0 * np.sign(0.5 - (LABELS == 1)), SCORES).astype(np.float32)
    got = float(bce_grounding_loss(jnp.asarray(wild), jnp.asarray(LABELS), jnp.asarray(MASK)))
    assert got == pytest.approx(base, rel=1e-6)
    # The masked-out labelled positions would change the value if they were counted.
    all_labelled = (LABELS >= 0)
    wrong = np.mean([np_bce(SCORES[tuple(p)], LABELS[tuple(p)] == 1)
                     for p in np.argwhere(all_labelled)])
    assert abs(wrong - base) > 0.1


def test_bce_with_nothing_labelled_is_zero_not_nan():
    got = bce_grounding_loss(jnp.asarray(SCORES), jnp.full(LABELS.shape, -1), jnp.asarray(MASK))
    assert float(got) == 0.0


def test_bce_upcasts_bf16_scores():
    got = bce_grounding_loss(jnp.asarray(SCORES, jnp.bfloat16), jnp.asarray(LABELS),
                             jnp.asarray(MASK))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), bce_expected(), rtol=1e-6)  # SCORES exact in bf16


# Margin: rows 1 (positive) <-> 0 (negative), rows 3 (positive) <-> 2 (negative), row 4 an
# unpaired positive (pair_index -1, which a clip would turn into row 0, a negative: it
# must still not count). Row 1's present-object tokens: 1.0 and 2.0 counted (mean 1.5); a
# masked-out one at -10 and a label-0 token are not. Row 0's hallucinated tokens: 0.8.
MARGIN_SCORES = np.array([[0.8, 9.0, 5.0, 0.0],
                          [1.0, 2.0, -10.0, 7.0],
                          [-1.0, -1.0, 3.0, 0.0],
                          [4.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0]], np.float32)
MARGIN_LABELS = np.array([[0, 1, -1, -1],
                          [1, 1, 1, 0],
                          [0, 0, 1, -1],
                          [1, -1, -1, -1],
                          [1, 0, -1, -1]])
MARGIN_MASK = np.array([[True] * 4, [True, True, False, True]] + [[True] * 4] * 3)
IS_POSITIVE = np.array([False, True, False, True, True])
PAIR_INDEX = np.array([1, 0, 3, 2, -1])


@pytest.mark.parametrize("margin", [1.0, 2.0, 0.5])
def test_margin_loss_on_hand_made_pairs(margin):
    # pair (1, 0): relu(m - (1.5 - 0.8)); pair (3, 2): relu(m - (4 - (-1))) = 0 here.
    want = (max(0.0, margin - 0.7) + max(0.0, margin - 5.0)) / 2
    got = margin_grounding_loss(jnp.asarray(MARGIN_SCORES), jnp.asarray(MARGIN_LABELS),
                                jnp.asarray(MARGIN_MASK), jnp.asarray(IS_POSITIVE),
                                jnp.asarray(PAIR_INDEX), margin=margin)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_lm_loss_matches_numpy_cross_entropy_on_lm_rows_only():
    rng = np.random.RandomState(0)
    B, T, V = 3, 6, 11
    logits = rng.randn(B, T, V).astype(np.float32) * 3
    labels = rng.randint(0, V, (B, T))
    labels[:, :2] = IGNORE          # prompt
    labels[0, 4] = IGNORE           # a hole inside the answer
    lm_rows = np.array([True, False, True])
    got, count = lm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(lm_rows))
    want, n = np_lm_loss(logits, labels, lm_rows)
    assert int(count) == n == 3 + 4
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Row 1 (not an LM row) really would change the value if counted.
    assert abs(np_lm_loss(logits, labels, np.ones(B, bool))[0] - want) > 1e-3
    # bf16 logits are upcast: same loss up to bf16 rounding of the logits themselves.
    bf = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    got_bf, _ = lm_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels),
                        jnp.asarray(lm_rows))
    np.testing.assert_allclose(float(got_bf), np_lm_loss(bf, labels, lm_rows)[0], rtol=1e-5)


def make_output_and_batch():
    rng = np.random.RandomState(1)
    B, T, V = 2, 5, 7
    logits = rng.randn(B, T, V).astype(np.float32)
    labels = np.full((B, T), IGNORE)
    labels[0, 2:] = [3, 1, 6]
    labels[1, 3:] = [2, 2]
    batch = {"labels": jnp.asarray(labels), "lm_rows": jnp.array([True, False]),
             "grounding_labels": jnp.asarray(LABELS),
             "is_positive": jnp.array([True, False]), "pair_index": jnp.array([1, 0])}
    output = LlavaOutput(logits=jnp.asarray(logits), image_mask=jnp.zeros((B, T), bool),
                         grounding=jnp.asarray(SCORES), grounding_mask=jnp.asarray(MASK))
    lm_want, _ = np_lm_loss(logits, labels, np.array([True, False]))
    return output, batch, lm_want


@pytest.mark.parametrize("weight", [0.5, 2.0, 1.0])
def test_total_is_lm_plus_weight_times_bce_grounding(weight):
    output, batch, lm_want = make_output_and_batch()
    loss, metrics = total_loss(output, batch, LossConfig(grounding_weight=weight))
    g_want = bce_expected()
    assert abs(lm_want - g_want) > 0.1  # so weighting the wrong term would show
    np.testing.assert_allclose(float(loss), lm_want + weight * g_want, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=0)
    np.testing.assert_allclose(float(metrics["lm_loss"]), lm_want, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grounding_loss"]), g_want, rtol=1e-6)
    assert int(metrics["lm_tokens"]) == 3


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_total_with_margin_grounding(weight):
    output, batch, lm_want = make_output_and_batch()
    # Row 0 (positive) present tokens counted: (0,0) 2.0 -> mean 2.0; row 1 hallucinated
    # counted: (1,0) -2.0 -> mean -2.0 (masked / unlabelled ones are not); margin 5 makes
    # the hinge bite: relu(5 - 4) = 1.
    cfg = LossConfig(grounding_weight=weight, grounding_loss="margin", margin=5.0)
    g_want = 5.0 - (2.0 - (-2.0))
    np.testing.assert_allclose(float(grounding_loss(output, batch, cfg)), g_want, rtol=1e-6)
    loss, metrics = total_loss(output, batch, cfg)
    np.testing.assert_allclose(float(loss), lm_want + weight * g_want, rtol=1e-6)


def test_zero_weight_drops_the_grounding_term_but_still_reports_it():
    output, batch, lm_want = make_output_and_batch()
    loss, metrics = total_loss(output, batch, LossConfig(grounding_weight=0.0))
    lm, _ = lm_loss(output.logits, batch["labels"], batch["lm_rows"])
    assert float(loss) == float(lm)
    np.testing.assert_allclose(float(loss), lm_want, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grounding_loss"]), bce_expected(), rtol=1e-6)
    # Exactly the LM loss even when the grounding term is not finite.
    inf_out = output.replace(grounding=jnp.where(output.grounding_mask, jnp.inf, 0.0))
    assert float(total_loss(inf_out, batch, LossConfig(grounding_weight=0.0))[0]) == float(lm)


def test_model_without_heads_gives_the_lm_loss():
    output, batch, lm_want = make_output_and_batch()
    loss, metrics = total_loss(output.replace(grounding=None, grounding_mask=None), batch,
                               LossConfig(grounding_weight=2.0))
    np.testing.assert_allclose(float(loss), lm_want, rtol=1e-6)
    assert np.isnan(float(metrics["grounding_auroc"]))
    # The metrics a run logs are there, named as with heads.
    assert float(metrics["loss"]) == float(loss) and float(metrics["grounding_loss"]) == 0.0


def test_unknown_grounding_loss_is_an_error():
    output, batch, _ = make_output_and_batch()
    with pytest.raises(ValueError, match="'hinge'"):
        total_loss(output, batch, LossConfig(grounding_loss="hinge"))


# ---------------------------------------------------------------- AUROC

def pair_auroc(s, y, valid):
    """P(pos > neg) + 0.5 * P(pos == neg) by counting pairs, float64."""
    s, y, valid = np.asarray(s, np.float64), np.asarray(y), np.asarray(valid, bool)
    pos, neg = s[valid & (y == 1)], s[valid & (y == 0)]
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def j_auroc(s, y, valid=None):
    """The AUROC as training computes it (jax.numpy, float32) and as evaluation does (NumPy,
    float64), checked to agree."""
    valid = np.ones(len(s), bool) if valid is None else valid
    on_device = float(auroc(jnp.asarray(s, jnp.float32), jnp.asarray(y), jnp.asarray(valid),
                            xp=jnp))
    assert float(auroc(np.asarray(s), np.asarray(y), np.asarray(valid))) == \
        pytest.approx(on_device, abs=1e-6, nan_ok=True)
    return on_device


def test_auroc_ties_count_half():
    assert j_auroc([0.9, 0.8, 0.8, 0.3], [1, 0, 1, 0]) == pytest.approx(0.875)
    # The order of tied entries does not matter.
    assert j_auroc([0.9, 0.8, 0.8, 0.3], [1, 1, 0, 0]) == pytest.approx(0.875)
    # Constant scores carry no information: 0.5 whatever the label order.
    for y in ([1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]):
        assert j_auroc([0.5] * 4, y) == pytest.approx(0.5)


def test_auroc_with_many_ties_and_invalid_entries_matches_pair_counting():
    rng = np.random.RandomState(0)
    s = rng.randint(0, 5, 300).astype(np.float32)   # heavy ties
    y = rng.randint(0, 2, 300)
    valid = rng.rand(300) > 0.3
    want = pair_auroc(s, y, valid)
    assert j_auroc(s, y, valid) == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(eval_auroc(s[valid], y[valid]), abs=1e-12)
    # Invalid entries' scores and labels do not matter.
    s2 = np.where(valid, s, 2.0).astype(np.float32)
    y2 = np.where(valid, y, 1)
    assert j_auroc(s2, y2, valid) == pytest.approx(want, abs=1e-6)
    # Jit-able with static shapes; NaN when a class is absent.
    jitted = jax.jit(functools.partial(auroc, xp=jnp))(jnp.asarray(s), jnp.asarray(y),
                                                        jnp.asarray(valid))
    assert float(jitted) == pytest.approx(want, abs=1e-6)
    assert np.isnan(j_auroc(s, np.ones(300, int), valid))


def test_batch_auroc_metric_of_total_loss():
    output, batch, _ = make_output_and_batch()
    _, metrics = total_loss(output, batch, LossConfig())
    keep = (LABELS >= 0) & MASK
    want = pair_auroc(SCORES[keep], LABELS[keep], np.ones(keep.sum(), bool))
    assert float(metrics["grounding_auroc"]) == pytest.approx(want)


def test_one_counted_token_is_its_own_mean():
    """The means divide by the count: one labelled token (or one answer token) is not
    halved or otherwise rescaled."""
    labels = np.full(LABELS.shape, -1)
    labels[0, 0] = 1
    got = bce_grounding_loss(jnp.asarray(SCORES), jnp.asarray(labels), jnp.asarray(MASK))
    np.testing.assert_allclose(float(got), np_bce(SCORES[0, 0], 1.0), rtol=1e-6)
    logits = np.random.RandomState(1).randn(1, 4, 7).astype(np.float32)
    lm_labels = np.array([[IGNORE, IGNORE, IGNORE, 5]])
    got, count = lm_loss(jnp.asarray(logits), jnp.asarray(lm_labels), jnp.asarray([True]))
    want, n = np_lm_loss(logits, lm_labels, [True])
    assert int(count) == n == 1
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_margin_pairs_index_rows_past_the_sequence_length():
    """More rows than tokens: partners are rows (up to B - 1), not positions."""
    scores = np.array([[0.0, 0.0], [0.0, 0.0], [0.5, 0.0], [2.0, 0.0]], np.float32)
    labels = np.array([[-1, -1], [-1, -1], [0, -1], [1, -1]])
    got = margin_grounding_loss(jnp.asarray(scores), jnp.asarray(labels),
                                jnp.ones((4, 2), bool), jnp.array([False, True, False, True]),
                                jnp.array([1, 0, 3, 2]), margin=2.0)
    # Only pair (3, 2) has tokens on both sides: relu(2 - (2.0 - 0.5)) = 0.5.
    np.testing.assert_allclose(float(got), 0.5, rtol=1e-6)


@pytest.mark.parametrize("empty_row", [0, 1])
def test_margin_pair_with_a_side_that_has_no_tokens_does_not_count(empty_row):
    """A pair counts only if the positive has present-object tokens and the negative has
    hallucinated ones; an empty side would otherwise enter as a mean of 0."""
    scores = np.array([[0.8, 0.0], [1.0, 0.0], [-1.0, 0.0], [4.0, 0.0]], np.float32)
    labels = np.array([[0, -1], [1, -1], [0, -1], [1, -1]])
    labels[empty_row] = -1
    got = margin_grounding_loss(jnp.asarray(scores), jnp.asarray(labels),
                                jnp.ones((4, 2), bool), jnp.array([False, True, False, True]),
                                jnp.array([1, 0, 3, 2]), margin=10.0)
    # Only pair (3, 2) is left: relu(10 - (4 - (-1))) = 5.
    np.testing.assert_allclose(float(got), 5.0, rtol=1e-6)


def test_auroc_of_a_single_pair_and_without_a_class():
    assert j_auroc([0.3, 0.7], [0, 1]) == 1.0
    assert j_auroc([0.7, 0.3], [0, 1]) == 0.0
    assert j_auroc([0.7, 0.3, 0.5], [0, 1, 1]) == 0.0
    assert j_auroc([0.7, 0.3, 0.5], [0, 0, 1]) == 0.5
    for labels in ([0, 0], [1, 1]):  # one class only: undefined, not 0
        assert np.isnan(j_auroc([0.3, 0.7], labels))
