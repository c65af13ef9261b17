"""Visual contrastive decoding (VCD, Leng et al. 2024): the noise, the contrast rule, and
`generate(contrast="vcd")` against a float64 NumPy evaluation of teacher-forced logits."""

import math

import numpy as np
import pytest

import jaxground
from jaxground.inference import batching
from jaxground.inference import contrast as C
from jaxground.inference.generate import Generation
from jaxground.models.config import tiny
from jaxground.models.llava import init_model

N = 6       # new tokens per row (one compiled plan shared by most tests)
BETA = 0.5  # on this random model both the cut-off and the contrast change tokens (checked)


@pytest.fixture(scope="module")
def model():
    return init_model(tiny(), seed=3)  # heads (similarity) on every decoder layer


def left_padded(cfg, seed=0):
    """2 rows of different lengths, text before and after the image tokens."""
    rng = np.random.RandomState(seed)
    img, k = cfg.image_token_id, cfg.image_seq_length
    rows = [list(rng.randint(3, 100, 3)) + [img] * k + list(rng.randint(3, 100, 5)),
            list(rng.randint(3, 100, 1)) + [img] * k + list(rng.randint(3, 100, 2))]
    t = max(map(len, rows))
    ids, mask = np.zeros((2, t), np.int32), np.zeros((2, t), np.int32)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    size = cfg.vision.image_size
    return ids, mask, rng.randn(2, 3, size, size).astype(np.float32)


@pytest.fixture(scope="module")
def batch(model):
    return left_padded(model.config)


def vcd(model, ids, mask, px, **kw):
    kw = dict(max_new_tokens=N, contrast="vcd", contrast_beta=BETA) | kw
    return jaxground.generate(model, ids, px, attention_mask=mask, **kw)


def teacher_forced(model, ids, mask, px, tokens):
    """Full forward on prompt + tokens: (next-token logits of each step [B, N, V] float64,
    grounding of each token [B, N])."""
    full = np.concatenate([ids, tokens], 1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], 1)
    out = model(input_ids=full, pixel_values=px, attention_mask=full_mask)
    t, n = ids.shape[1], tokens.shape[1]
    return (np.asarray(out.logits, np.float64)[:, t - 1:t - 1 + n],
            np.asarray(out.grounding)[:, t:t + n])


# ---- the noise ---------------------------------------------------------------------------
def test_schedule_matches_hand_computation_and_the_reference():
    prod = 1.0
    for i in range(501):  # alphas_prod[500], one factor at a time
        x = -6.0 + 12.0 * i / 999
        prod *= 1.0 - ((1.0 / (1.0 + math.exp(-x))) * (0.5e-2 - 1e-5) + 1e-5)
    signal, noise = C.noise_coefficients(500)
    assert signal == pytest.approx(math.sqrt(prod), rel=1e-12)
    assert noise == pytest.approx(math.sqrt(1.0 - prod), rel=1e-12)
    assert (signal, noise) == pytest.approx((0.863017, 0.505175), abs=1e-6)
    assert C.noise_coefficients(0)[0] == pytest.approx(math.sqrt(1 - (
        1 / (1 + math.exp(6)) * (0.5e-2 - 1e-5) + 1e-5)), rel=1e-12)
    # The reference's float32 torch computation (vcd_utils/vcd_add_noise.py).
    import torch
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    prod_t = torch.cumprod(1 - betas, dim=0)
    for step in (0, 250, 500, 999):
        ours = C.noise_coefficients(step)
        assert ours[0] == pytest.approx(float(torch.sqrt(prod_t[step])), abs=2e-6)
        assert ours[1] == pytest.approx(float(torch.sqrt(1 - prod_t[step])), abs=2e-6)


def test_noise_is_one_image_shared_by_every_row(batch):
    px = np.concatenate([batch[2], batch[2][::-1] * 0.5])  # 4 images
    noise = np.asarray(C.image_noise(7, px.shape[1:]))
    assert noise.shape == px.shape[1:] and abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1
    signal, scale = C.noise_coefficients(500)
    noised = np.asarray(C.distort(px, 7, 500))
    np.testing.assert_allclose(noised, signal * px + scale * noise[None], rtol=1e-6, atol=1e-6)
    # Independent of batch size and position: each row alone, and the batch reversed.
    for i in range(len(px)):
        np.testing.assert_array_equal(np.asarray(C.distort(px[i:i + 1], 7, 500))[0], noised[i])
    np.testing.assert_array_equal(np.asarray(C.distort(px[::-1], 7, 500))[::-1], noised)
    assert not np.allclose(np.asarray(C.distort(px, 8, 500)), noised)  # the seed matters


def test_vcd_logits_on_a_hand_made_vector():
    clean = np.array([[2.0, 1.5, -1.0, 0.5]], np.float32)
    distorted = np.array([[2.0, 0.9, -8.0, 1.0]], np.float32)
    # contrast 2l - l' = [2, 2.1, 6, 0]: token 2 wins, but l = -1 < log(0.1) + 2 cuts it.
    out = np.asarray(C.vcd_logits(clean, distorted, 1.0, 0.1))
    np.testing.assert_allclose(out, [[2.0, 2.1, -np.inf, 0.0]], rtol=1e-6)
    assert out.argmax() == 1
    assert np.asarray(C.vcd_logits(clean, distorted, 1.0, 0.0)).argmax() == 2  # no cut-off
    np.testing.assert_array_equal(np.asarray(C.vcd_logits(clean, distorted, 0.0, 0.1)),
                                  [[2.0, 1.5, -np.inf, 0.5]])  # alpha 0: the logits


# ---- generate ----------------------------------------------------------------------------
def test_alpha_zero_is_greedy(model, batch):
    ids, mask, px = batch
    greedy = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=N)
    zero = vcd(model, ids, mask, px, contrast_alpha=0.0)
    np.testing.assert_array_equal(np.asarray(zero.tokens), np.asarray(greedy.tokens))
    for name in ("logprobs", "entropy", "grounding"):
        np.testing.assert_allclose(np.asarray(getattr(zero, name)),
                                   np.asarray(getattr(greedy, name)), atol=1e-5)


def test_vcd_matches_numpy_formula_on_teacher_forced_logits(model, batch):
    ids, mask, px = batch
    alpha, beta = 1.0, BETA
    gen = vcd(model, ids, mask, px, contrast_alpha=alpha, contrast_beta=beta, seed=0)
    tokens = np.asarray(gen.tokens)
    l, grounding = teacher_forced(model, ids, mask, px, tokens)
    l_noised, _ = teacher_forced(model, ids, mask, np.asarray(C.distort(px, 0, 500)), tokens)
    contrast = (1 + alpha) * l - alpha * l_noised
    cut = l < np.log(beta) + l.max(-1, keepdims=True)
    scores = np.where(cut, -np.inf, contrast)
    np.testing.assert_array_equal(tokens, scores.argmax(-1))
    top2 = np.sort(scores, -1)[..., -2:]
    assert (np.nan_to_num(top2[..., 1] - top2[..., 0], posinf=1.0) > 1e-3).all()  # no ties
    # The comparison means something: the cut-off and the contrast each change tokens.
    assert (contrast.argmax(-1) != tokens).sum() >= 1
    assert (l.argmax(-1) != tokens).sum() >= 1
    # Log p, entropy and grounding are the clean model's, of the chosen token.
    logp = l - np.log(np.exp(l - l.max(-1, keepdims=True)).sum(-1, keepdims=True)) - l.max(
        -1, keepdims=True)
    np.testing.assert_allclose(np.asarray(gen.logprobs),
                               np.take_along_axis(logp, tokens[..., None], -1)[..., 0],
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(gen.entropy),
                               -(np.exp(logp) * logp).sum(-1), atol=1e-4)
    np.testing.assert_allclose(np.asarray(gen.grounding), grounding, atol=1e-4)
    assert np.asarray(gen.scored).all() and np.std(grounding) > 1e-3
    # A different seed draws other noise, hence (here) other tokens.
    assert (np.asarray(vcd(model, ids, mask, px, seed=1).tokens) != tokens).any()


def test_vcd_rows_are_batch_invariant(model, batch):
    ids, mask, px = batch
    both = np.asarray(vcd(model, ids, mask, px).tokens)
    swapped = np.asarray(vcd(model, ids[::-1], mask[::-1], px[::-1]).tokens)
    np.testing.assert_array_equal(swapped[::-1], both)
    start = int(np.argmax(mask[1]))  # row 1 alone, without padding
    alone = vcd(model, ids[1:, start:], mask[1:, start:], px[1:])
    np.testing.assert_array_equal(np.asarray(alone.tokens)[0], both[1])


def test_vcd_rows_stop_at_eos_and_flag(model, batch):
    ids, mask, px = batch
    free = vcd(model, ids, mask, px)
    tokens = np.asarray(free.tokens)
    eos = int(tokens[1, 2])
    stop = int(np.flatnonzero(tokens[1] == eos)[0])
    gen = vcd(model, ids, mask, px, eos_token_id=eos, pad_token_id=0, flag_threshold=0.0)
    out, valid = np.asarray(gen.tokens), np.asarray(gen.valid)
    for row in range(2):
        hits = np.flatnonzero(tokens[row] == eos)
        length = hits[0] + 1 if len(hits) else N
        np.testing.assert_array_equal(out[row, :length], tokens[row, :length])
        assert int(gen.lengths[row]) == length and valid[row, :length].all()
        assert not valid[row, length:].any() and (out[row, length:] == 0).all()
    assert int(gen.lengths[1]) == stop + 1 < N
    g = np.asarray(gen.grounding)
    np.testing.assert_array_equal(np.asarray(gen.flagged), valid & (g < 0.0))
    assert (g[~valid] == 0).all()


def test_vcd_sampling_stays_in_the_plausible_set(model, batch):
    ids, mask, px = batch
    hot = dict(temperature=2.0, seed=1)
    a, b = vcd(model, ids, mask, px, **hot), vcd(model, ids, mask, px, **hot)
    tokens = np.asarray(a.tokens)
    np.testing.assert_array_equal(np.asarray(b.tokens), tokens)
    l, _ = teacher_forced(model, ids, mask, px, tokens)
    chosen = np.take_along_axis(l, tokens[..., None], -1)[..., 0]
    assert (chosen >= np.log(BETA) + l.max(-1) - 1e-4).all()
    greedy = np.asarray(vcd(model, ids, mask, px).tokens)
    assert (tokens != greedy).any()  # it does sample
    np.testing.assert_array_equal(
        np.asarray(vcd(model, ids, mask, px, temperature=1.0, top_p=1e-6).tokens), greedy)


def test_bad_contrast_inputs_are_explained(model, batch):
    ids, mask, px = batch
    with pytest.raises(ValueError, match=r"one of \('vcd',\).*'icd'"):
        vcd(model, ids, mask, px, contrast="icd")
    with pytest.raises(ValueError, match="guidance"):
        vcd(model, ids, mask, px, guidance=1.0)
    text = np.arange(5, 11).reshape(2, 3)  # no image tokens
    with pytest.raises(ValueError, match="needs pixel_values"):
        vcd(model, text, np.ones_like(text), None)
    with pytest.raises(ValueError, match="contrast_noise_step"):
        vcd(model, ids, mask, px, contrast_noise_step=1000)
    with pytest.raises(ValueError, match="contrast_beta"):
        vcd(model, ids, mask, px, contrast_beta=1.5)


def test_generate_all_passes_contrast_settings(monkeypatch, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    seen = {}

    class Tok:
        eos_token_id, pad_token_id = 2, 0

    class Proc:
        tokenizer = Tok()

        def encode(self, question):
            return {"input_ids": [5, 6]}

        def pixel_values(self, images):
            return np.zeros((len(images), 3, 4, 4), np.float32)

    def fake_generate(model, ids, px, **kw):
        seen.update(kw)
        b = len(ids)
        return Generation(tokens=np.full((b, 2), 9), valid=np.ones((b, 2), bool),
                          lengths=np.full(b, 2), logprobs=np.zeros((b, 2)),
                          entropy=np.zeros((b, 2)), grounding=None)

    monkeypatch.setattr(batching, "generate", fake_generate)
    assert batching.DecodeSettings().contrast is None
    settings = batching.DecodeSettings(contrast="vcd", contrast_alpha=0.5, contrast_beta=0.2,
                                       contrast_noise_step=300)
    out = list(batching.generate_all(None, Proc(), [batching.Prompt("q", str(tmp_path / "a.png"),
                                                                    "k")], settings))
    assert out[0]["token_ids"] == [9, 9]
    assert (seen["contrast"], seen["contrast_alpha"], seen["contrast_beta"],
            seen["contrast_noise_step"]) == ("vcd", 0.5, 0.2, 300)
