"""Grounding-guided decoding checked step by step against a teacher-forced replay.

Each guided step must pick, among the top-k tokens of the model's own next-token
distribution given the prompt and the tokens chosen so far, argmax log p + alpha * b (b the
candidate's grounding logit, or its log sigmoid, restricted to `guidance_tokens`), and must
carry on from the chosen candidate's K/V and logits. The replay recomputes all of that with
plain teacher-forced forwards (no KV cache, no candidate batching) and NumPy.
"""

import numpy as np
import pytest
from scipy import stats

import hf_tiny
import jaxground
from jaxground.checkpoints.hf_convert import hf_to_jaxground
from jaxground.models.config import GroundingConfig

N = 10  # generated tokens
K = 4   # guidance_top_k


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaVA with similarity heads, made less flat than a random init:
    - the LM head is scaled up so log p differs by ~0.1-3 nats among the top candidates
      (random tiny models are near uniform, so any alpha would override the LM entirely);
    - the heads' bias is -4, so grounding logits straddle 0 (about -3.5 .. 1.5) and
      log_sigmoid differs from the raw logit (it saturates for grounded tokens)."""
    d = tmp_path_factory.mktemp("guided")
    hf = hf_tiny.build_hf("bias_theta", seed=8)
    hf_tiny.save_hf(hf, str(d / "hf"))
    hf_to_jaxground(str(d / "hf"), str(d / "jg"),
                    grounding=GroundingConfig(type="similarity", init_bias=-4.0))
    model = jaxground.load(str(d / "jg"))
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 30.0
    ids, mask, px = hf_tiny.batch(hf)
    return model, ids, mask, px


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def bonus_of(g, score):
    g = np.asarray(g, np.float64)
    return g if score == "logit" else -np.logaddexp(0.0, -g)  # log sigmoid


def replay(model, ids, mask, px, tokens, k=K):
    """Teacher-forced replay of generated `tokens` [B, N] (all valid).

    Returns logp [B, N, V] (next-token log p given prompt + tokens[:i]), top [B, N, k] (its
    top-k candidates, most likely first), cand_g [B, N, k] (each candidate's grounding logit
    when teacher forced as prompt + tokens[:i] + [candidate], read at the last position) and
    chosen_g [B, N] (grounding of the generated tokens in one teacher-forced pass)."""
    b, t = ids.shape
    n = tokens.shape[1]
    full = np.concatenate([ids, tokens], 1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], 1)
    out = model(input_ids=full, pixel_values=px, attention_mask=full_mask)
    logp = log_softmax(np.asarray(out.logits)[:, t - 1:t + n - 1])
    top = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    chosen_g = np.asarray(out.grounding)[:, t:]
    # One left-padded row per (row, step, candidate), all of length t + n: one forward.
    length = t + n
    rows = np.zeros((b, n, k, length), ids.dtype)
    rows_mask = np.zeros((b, n, k, length), mask.dtype)
    for r in range(b):
        for i in range(n):
            for c in range(k):
                seq = np.concatenate([ids[r], tokens[r, :i], top[r, i, c:c + 1]])
                m = np.concatenate([mask[r], np.ones(i + 1, mask.dtype)])
                rows[r, i, c, length - len(seq):] = seq
                rows_mask[r, i, c, length - len(seq):] = m
    out = model(input_ids=rows.reshape(-1, length), pixel_values=np.repeat(px, n * k, axis=0),
                attention_mask=rows_mask.reshape(-1, length))
    assert np.asarray(out.grounding_mask)[:, -1].all()
    cand_g = np.asarray(out.grounding)[:, -1].reshape(b, n, k)
    return logp, top, cand_g, chosen_g


def guided_totals(logp, top, cand_g, alpha, score, allowed=None):
    """log p + alpha * b of every candidate [B, N, k]."""
    b = bonus_of(cand_g, score)
    if allowed is not None:
        b = np.where(allowed[top], b, 0.0)
    return np.take_along_axis(logp, top, -1) + alpha * b


def check_replay(gen, logp, top, cand_g, chosen_g):
    """The generated tokens are top-k candidates; their log p and grounding (as reported by
    generate) are the replay's. Returns the index of each token among the candidates."""
    tokens = np.asarray(gen.tokens)
    assert np.asarray(gen.valid).all()
    hit = top == tokens[..., None]
    missing = np.argwhere(~hit.any(-1)).tolist()
    assert not missing, f"generated tokens outside the replay's top-k at (row, step) {missing}"
    j = hit.argmax(-1)
    np.testing.assert_allclose(np.asarray(gen.logprobs),
                               np.take_along_axis(logp, tokens[..., None], -1)[..., 0],
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gen.grounding),
                               np.take_along_axis(cand_g, j[..., None], -1)[..., 0],
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gen.grounding), chosen_g, rtol=0, atol=1e-4)
    return j


ALLOWED = np.arange(hf_tiny.VOCAB) % 2 == 0  # bonus only for even token ids


@pytest.mark.parametrize("score,alpha,restricted", [
    ("logit", 0.1, False),
    ("log_sigmoid", 0.3, False),
    ("logit", 0.3, True),
], ids=["logit", "log_sigmoid", "logit_some_tokens"])
def test_guided_greedy_replays_step_by_step(setup, score, alpha, restricted):
    model, ids, mask, px = setup
    allowed = ALLOWED if restricted else None
    greedy = np.asarray(jaxground.generate(model, ids, px, attention_mask=mask,
                                           max_new_tokens=N).tokens)
    gen = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=N,
                             guidance=alpha, guidance_top_k=K, guidance_score=score,
                             guidance_tokens=None if allowed is None
                             else np.flatnonzero(allowed))
    tokens = np.asarray(gen.tokens)
    logp, top, cand_g, chosen_g = replay(model, ids, mask, px, tokens)
    j = check_replay(gen, logp, top, cand_g, chosen_g)

    totals = guided_totals(logp, top, cand_g, alpha, score, allowed)
    expected = totals.argmax(-1)
    np.testing.assert_array_equal(j, expected)  # step by step: the guided choice
    # No near ties, so float noise cannot decide a choice.
    ordered = np.sort(totals, -1)
    assert (ordered[..., -1] - ordered[..., -2]).min() > 1e-3

    # Guidance really steers: a non-top candidate is kept before the last step (so later
    # steps run on its K/V and logits), and some row follows greedy for its first token and
    # then leaves it.
    assert (j[:, :-1] != 0).any() and (j == 0).any()
    differs = tokens != greedy
    assert any(not row[0] and row[1:].any() for row in differs)
    # The replayed choices depend on what is tested: the other score function, or the bonus
    # for every token, would choose differently at some step of this very sequence.
    other = "log_sigmoid" if score == "logit" else "logit"
    assert (guided_totals(logp, top, cand_g, alpha, other, allowed).argmax(-1)
            != expected).any()
    if restricted:
        assert (guided_totals(logp, top, cand_g, alpha, score).argmax(-1) != expected).any()


@pytest.mark.parametrize("score", ["logit", "log_sigmoid"])
def test_guided_sampling_is_seeded_and_replays(setup, score):
    model, ids, mask, px = setup
    alpha = 0.5

    def run(**kw):
        return jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=N,
                                  guidance=alpha, guidance_top_k=K, guidance_score=score,
                                  **kw)

    a, b, c = run(temperature=1.0, seed=3), run(temperature=1.0, seed=3), run(
        temperature=1.0, seed=4)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    guided_greedy = np.asarray(run().tokens)
    assert (np.asarray(a.tokens) != guided_greedy).any()  # it does sample
    # The nucleus of a tiny top_p is the single best candidate: guided greedy.
    np.testing.assert_array_equal(np.asarray(run(temperature=1.0, top_p=1e-6, seed=3).tokens),
                                  guided_greedy)

    for gen in (a, c):
        tokens = np.asarray(gen.tokens)
        logp, top, cand_g, chosen_g = replay(model, ids, mask, px, tokens)
        j = check_replay(gen, logp, top, cand_g, chosen_g)
        assert (j[:, :-1] != 0).any()  # later steps follow a non-top candidate's K/V


@pytest.mark.parametrize("score,alpha,temperature", [
    ("logit", 1.0, 0.7),
    ("log_sigmoid", 2.0, 1.5),
], ids=["logit", "log_sigmoid"])
def test_guided_sampling_follows_the_documented_softmax(setup, score, alpha, temperature):
    """One step, many copies of each prompt in one batch (every row draws independently):
    candidate frequencies follow softmax((log p + alpha * b) / temperature) over the top-k,
    and not the distributions without the bonus or without the temperature."""
    model, ids, mask, px = setup
    copies = 1500
    rep = lambda x: np.repeat(x, copies, axis=0)
    gen = jaxground.generate(model, rep(ids), rep(px), attention_mask=rep(mask),
                             max_new_tokens=1, guidance=alpha, guidance_top_k=K,
                             guidance_score=score, temperature=temperature, seed=11)
    drawn = np.asarray(gen.tokens)[:, 0].reshape(3, copies)
    logp, top, cand_g, _ = replay(model, ids, mask, px, drawn[:, :1], k=K)
    top, logp_top = top[:, 0], np.take_along_axis(logp, top, -1)[:, 0]
    totals = guided_totals(logp, top[:, None], cand_g, alpha, score)[:, 0]

    def pvalue(row, weights):
        expected = np.exp(log_softmax(weights)) * copies
        counts = (drawn[row][:, None] == top[row][None]).sum(0)
        assert counts.sum() == copies  # every draw is a top-k candidate
        small = expected < 5  # pool rare candidates so the chi-square approximation holds
        if small.any():
            expected = np.append(expected[~small], expected[small].sum())
            counts = np.append(counts[~small], counts[small].sum())
        return stats.chisquare(counts, expected).pvalue

    for row in range(3):
        assert pvalue(row, totals[row] / temperature) > 1e-3
    # The test can tell: ignoring the bonus, or the temperature, is rejected (some prompt).
    assert min(pvalue(r, logp_top[r] / temperature) for r in range(3)) < 1e-6
    assert min(pvalue(r, totals[r]) for r in range(3)) < 1e-6
