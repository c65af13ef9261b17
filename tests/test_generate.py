"""Cached generation: HF `generate` parity, grounding equal to teacher forcing, guidance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

import hf_tiny
import jaxground
from jaxground.checkpoints.hf_convert import hf_to_jaxground
from jaxground.models.config import GroundingConfig

NEW = 20


def hf_generate(hf, ids, mask, px, eos=None, new=NEW):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(px), max_new_tokens=new, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


@pytest.fixture(scope="module", params=["mha", "bias_theta"])
def converted(request, tmp_path_factory):
    """(HF model reloaded from disk, our model) for a variant; bias_theta is GQA with one
    kv head, attention biases and a non-default rope theta."""
    d = tmp_path_factory.mktemp(f"gen_{request.param}")
    hf_tiny.save_hf(hf_tiny.build_hf(request.param, seed=5), str(d / "hf"))
    hf_to_jaxground(str(d / "hf"), str(d / "jg"))
    hf = LlavaForConditionalGeneration.from_pretrained(str(d / "hf")).eval()
    return hf, jaxground.load(str(d / "jg"))


def test_greedy_matches_hf_generate(converted):
    hf, model = converted
    ids, mask, px = hf_tiny.batch(hf)
    assert len(set(mask.sum(1))) == 3  # three prompt lengths, left padded
    ref = hf_generate(hf, ids, mask, px)
    gen = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=NEW)
    assert all(len(set(row)) > 3 for row in ref)  # a real sequence, not one repeated token
    np.testing.assert_array_equal(np.asarray(gen.tokens), ref)
    assert np.asarray(gen.valid).all() and np.asarray(gen.lengths).tolist() == [NEW] * 3


def test_rows_stop_at_eos_like_hf(converted):
    hf, model = converted
    ids, mask, px = hf_tiny.batch(hf)
    free = hf_generate(hf, ids, mask, px)
    eos = int(free[1, 6])  # row 1 stops at step 6 at the latest
    ref = hf_generate(hf, ids, mask, px, eos=eos)
    gen = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=NEW,
                             eos_token_id=eos, pad_token_id=0)
    tokens, valid = np.asarray(gen.tokens), np.asarray(gen.valid)
    np.testing.assert_array_equal(tokens[:, :ref.shape[1]], ref)
    for row in range(3):
        hits = np.flatnonzero(tokens[row] == eos)
        length = hits[0] + 1 if len(hits) else NEW
        assert int(gen.lengths[row]) == length and valid[row, :length].all()
        assert not valid[row, length:].any() and (tokens[row, length:] == 0).all()
    assert int(gen.lengths[1]) <= 7


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen_heads")
    model = hf_tiny.build_hf("bias_theta", seed=8)
    hf_tiny.save_hf(model, str(d))
    return str(d), model


def with_heads(hf_dir, tmp_path, **grounding):
    out = str(tmp_path / "jg")
    hf_to_jaxground(hf_dir, out, grounding=GroundingConfig(**grounding))
    model = jaxground.load(out)
    heads = model.language_model.grounding_heads
    if grounding.get("type") == "cross_attention":
        # An open gate, so the heads' image summaries change the decoder's hidden states.
        heads.gate[...] = jnp.full(heads.gate[...].shape, 0.7)
    return model


def teacher_forced(model, ids, mask, px, gen):
    full = np.concatenate([ids, np.asarray(gen.tokens)], 1)
    full_mask = np.concatenate([mask, np.asarray(gen.valid)], 1)
    return jaxground.score(model, full, px, full_mask), ids.shape[1]


@pytest.mark.parametrize("grounding", [
    dict(type="similarity"),
    dict(type="learned", dim=16, layers=(1, 2), aggregate="max"),
    dict(type="cross_attention", num_heads=2, image_features="hidden"),
], ids=["similarity", "learned", "cross_attention"])
def test_generation_grounding_equals_teacher_forced(hf_dir, tmp_path, grounding):
    model = with_heads(hf_dir[0], tmp_path, **grounding)
    ids, mask, px = hf_tiny.batch(hf_dir[1])
    gen = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=12)
    scores, t = teacher_forced(model, ids, mask, px, gen)
    valid = np.asarray(gen.valid)
    assert valid.all() and np.asarray(gen.scored).all()
    ref = np.asarray(scores.grounding)[:, t:]
    assert np.asarray(scores.grounding_mask)[:, t:].all()
    assert np.abs(np.asarray(gen.grounding) - ref).max() <= 1e-5
    for layer, per_layer in gen.grounding_scores.items():
        ref_l = np.asarray(scores.grounding_scores[layer])[:, t:]
        assert np.abs(np.asarray(per_layer) - ref_l).max() <= 1e-5
    assert np.abs(np.asarray(gen.logprobs) - np.asarray(scores.logprobs)[:, t:]).max() <= 1e-5
    assert np.abs(np.asarray(gen.entropy) - np.asarray(scores.entropy)[:, t:]).max() <= 1e-4
    assert np.std(ref) > 1e-3  # the scores vary, so equality means something


def test_guidance_zero_is_greedy(hf_dir, tmp_path):
    model = with_heads(hf_dir[0], tmp_path, type="similarity")
    ids, mask, px = hf_tiny.batch(hf_dir[1])
    greedy = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=NEW)
    guided = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=NEW,
                                guidance=0.0, guidance_top_k=4)
    np.testing.assert_array_equal(np.asarray(guided.tokens), np.asarray(greedy.tokens))
    assert np.abs(np.asarray(guided.grounding) - np.asarray(greedy.grounding)).max() <= 1e-5


def candidate_grounding(model, ids, mask, px, candidates):
    """Teacher-forced grounding logit of each candidate as the first new token: [B, C]."""
    out = []
    for c in range(candidates.shape[1]):
        full = np.concatenate([ids, candidates[:, c:c + 1]], 1)
        full_mask = np.concatenate([mask, np.ones_like(mask[:, :1])], 1)
        out.append(np.asarray(jaxground.score(model, full, px, full_mask).grounding)[:, -1])
    return np.stack(out, 1)


def test_guidance_moves_away_from_an_ungrounded_candidate(hf_dir, tmp_path):
    """Heads calibrated so that each row's greedy token gets the lowest grounding logit of its
    top-k: a large alpha must pick another candidate, the one an independent teacher-forced
    computation says maximises log p + alpha * g."""
    model = with_heads(hf_dir[0], tmp_path, type="similarity")
    ids, mask, px = hf_tiny.batch(hf_dir[1])
    k, alpha = 4, 5.0
    logits = np.asarray(model(input_ids=ids, pixel_values=px, attention_mask=mask).logits)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[:, -1]), axis=-1))
    top = np.argsort(-logp, axis=-1, kind="stable")[:, :k]
    g = candidate_grounding(model, ids, mask, px, top)
    # Calibrate: the sign makes the greedy candidate's cosine the lowest in most rows; the
    # scale spreads the logits far apart.
    heads = model.language_model.grounding_heads
    sign = 1.0 if (g[:, 0] <= g.min(1)).sum() >= (g[:, 0] >= g.max(1)).sum() else -1.0
    heads.scale[...] = heads.scale[...] * 50 * sign
    g = candidate_grounding(model, ids, mask, px, top)
    expected = top[np.arange(3), np.argmax(np.take_along_axis(logp, top, 1) + alpha * g, 1)]
    guided = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=1,
                                guidance=alpha, guidance_top_k=k)
    np.testing.assert_array_equal(np.asarray(guided.tokens)[:, 0], expected)
    low = g[:, 0] <= g.min(1)
    assert low.any() and (expected[low] != top[low, 0]).all()


def test_guidance_only_for_chosen_tokens(hf_dir, tmp_path):
    """guidance_tokens that exclude every candidate leave plain greedy."""
    model = with_heads(hf_dir[0], tmp_path, type="similarity")
    ids, mask, px = hf_tiny.batch(hf_dir[1])
    greedy = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=8)
    guided = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=8,
                                guidance=100.0, guidance_top_k=5, guidance_tokens=[])
    np.testing.assert_array_equal(np.asarray(guided.tokens), np.asarray(greedy.tokens))


def test_flagging_marks_low_scores(hf_dir, tmp_path):
    model = with_heads(hf_dir[0], tmp_path, type="similarity")
    ids, mask, px = hf_tiny.batch(hf_dir[1])
    plain = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=10)
    g, tokens = np.asarray(plain.grounding), np.asarray(plain.tokens)
    threshold = float(np.median(g))
    flagged = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=10,
                                 flag_threshold=threshold)
    np.testing.assert_array_equal(np.asarray(flagged.flagged), g < threshold)
    only = [int(tokens[0, 0]), int(tokens[1, 3])]
    some = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=10,
                              flag_threshold=threshold, flag_tokens=only)
    np.testing.assert_array_equal(np.asarray(some.flagged),
                                  (g < threshold) & np.isin(tokens, only))


def test_sampling_is_seeded_and_top_p_zero_is_greedy(hf_dir, tmp_path):
    model = with_heads(hf_dir[0], tmp_path, type="similarity")
    ids, mask, px = hf_tiny.batch(hf_dir[1])
    run = lambda **kw: np.asarray(jaxground.generate(model, ids, px, attention_mask=mask,
                                                     max_new_tokens=NEW, **kw).tokens)
    hot = dict(temperature=1.5)
    a, b, c = run(seed=1, **hot), run(seed=1, **hot), run(seed=2, **hot)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(run(temperature=1.0, top_p=1e-6), run())


def test_bad_inputs_are_explained(hf_dir, tmp_path):
    model = with_heads(hf_dir[0], tmp_path, type="similarity")
    ids, mask, px = hf_tiny.batch(hf_dir[1])
    right_padded = mask[:, ::-1]
    with pytest.raises(ValueError, match="left padded"):
        jaxground.generate(model, ids, px, attention_mask=right_padded)
    with pytest.raises(ValueError, match="image tokens"):
        jaxground.generate(model, ids, px[:2], attention_mask=mask)
    with pytest.raises(ValueError, match="guidance_score"):
        jaxground.generate(model, ids, px, attention_mask=mask, guidance=1.0,
                           guidance_score="prob")
    model.config = model.config.replace(
        text=dataclasses.replace(model.config.text, attention_impl="cudnn"))
    with pytest.raises(ValueError, match="cudnn"):  # causal-only: would attend to padding
        jaxground.generate(model, ids, px, attention_mask=mask)
    with pytest.raises(ValueError, match="cudnn"):
        jaxground.score(model, ids, px, mask)
    with pytest.raises(ValueError, match="cudnn"):  # an eager forward checks it too
        model(input_ids=ids, pixel_values=px, attention_mask=mask)


@pytest.mark.parametrize("grounding", [
    dict(type="similarity", layers=(2,)),
    dict(type="learned", dim=16, layers=(1,)),
    dict(type="cross_attention", num_heads=1, layers=(2,)),
], ids=["similarity", "learned", "cross_attention"])
def test_patch_scores_explain_the_score(hf_dir, tmp_path, grounding):
    """With one grounded layer, each token's logit follows from its patch scores: scale *
    max_p cos + bias, or for a one-head cross-attention head scale * (logsumexp_p a -
    log P) + bias."""
    model = with_heads(hf_dir[0], tmp_path, **grounding)
    ids, mask, px = hf_tiny.batch(hf_dir[1])
    scores = jaxground.score(model, ids, px, mask, patches=True)
    head = model.language_model.grounding_heads
    scale, bias = float(head.scale[...][0]), float(head.bias[...][0])
    patches = np.asarray(scores.patches, np.float64)  # [B, T, K]
    scored = np.asarray(scores.grounding_mask)
    assert patches.shape[-1] == hf_tiny.num_image_tokens(hf_dir[1]) and scored.sum() > 5
    if grounding["type"] == "cross_attention":
        p = patches[scored]
        s = np.log(np.exp(p - p.max(-1, keepdims=True)).sum(-1)) + p.max(-1) - np.log(
            p.shape[-1])
    else:
        s = patches[scored].max(-1)
        assert (np.abs(patches[scored]) <= 1 + 1e-6).all()  # cosines
    np.testing.assert_allclose(scale * s + bias, np.asarray(scores.grounding)[scored],
                               rtol=1e-5, atol=1e-4)
    assert (patches[~scored] == 0).all()


def test_per_row_knobs_and_the_step_callback(hf_dir, tmp_path):
    """What serving relies on: rows at temperature 0 are greedy beside sampled rows; a row
    with its own seed draws the same tokens in any batch position; per-row budgets and
    ignore-EOS; `on_token` sees every step's tokens and can stop a row."""
    model = with_heads(hf_dir[0], tmp_path, type="similarity")
    ids, mask, px = hf_tiny.batch(hf_dir[1])
    run = lambda ids=ids, mask=mask, px=px, **kw: jaxground.generate(
        model, ids, px, attention_mask=mask, max_new_tokens=NEW, **kw)
    greedy = np.asarray(run().tokens)
    mixed = run(temperature=np.array([0.0, 1.5, 0.0]), seed=np.array([7, 8, 9]))
    tokens = np.asarray(mixed.tokens)
    np.testing.assert_array_equal(tokens[[0, 2]], greedy[[0, 2]])
    assert (tokens[1] != greedy[1]).any()
    # Row 1 with seed 8, moved to row 0 beside other rows and seeds: the same draws.
    order = [1, 0, 2]
    moved = run(ids[order], mask[order], px[order], temperature=np.array([1.5, 0.0, 1.0]),
                seed=np.array([8, 3, 4]))
    np.testing.assert_array_equal(np.asarray(moved.tokens)[0], tokens[1])
    np.testing.assert_allclose(np.asarray(moved.logprobs)[0], np.asarray(mixed.logprobs)[1],
                               atol=1e-5)
    # Budgets: rows stop after their own number of tokens, greedy prefix unchanged.
    short = run(row_max_new_tokens=np.array([3, NEW, 5]))
    assert np.asarray(short.lengths).tolist() == [3, NEW, 5]
    np.testing.assert_array_equal(np.asarray(short.tokens)[0, :3], greedy[0, :3])
    eos = int(greedy[0, 2])
    stopped = run(eos_token_id=eos, row_ignore_eos=np.array([False, True, True]))
    assert int(stopped.lengths[0]) == 3 and int(stopped.lengths[2]) == NEW
    # The callback: every live step arrives in order with its token, log p and grounding;
    # asking to stop row 1 at step 4 ends it there.
    steps = []

    def listener(step):
        steps.append(step)
        return np.array([False, step.index >= 4, False])

    streamed = run(on_token=listener, stream_top_k=3)
    assert [s.index for s in steps] == list(range(NEW))
    got = np.stack([s.tokens for s in steps], 1)
    live = np.stack([s.live for s in steps], 1)
    np.testing.assert_array_equal(live, np.asarray(streamed.valid))
    assert np.asarray(streamed.lengths).tolist() == [NEW, 5, NEW]
    np.testing.assert_array_equal(np.where(live, got, 0), np.where(live, greedy, 0))
    np.testing.assert_allclose(np.stack([s.grounding for s in steps], 1)[live],
                               np.asarray(streamed.grounding)[live], atol=1e-6)
    np.testing.assert_allclose(np.stack([s.logprobs for s in steps], 1)[live],
                               np.asarray(streamed.logprobs)[live], atol=1e-6)
    top = np.stack([s.top_ids for s in steps], 1)  # [B, N, 3]: greedy = the first
    np.testing.assert_array_equal(top[..., 0][live], greedy[live])
    # Handed over 3 steps at a time (the last 2 after the loop): the same steps, in order;
    # a stop asked for at step 4 takes effect at the end of its hand-over (step 5).
    chunked = []
    run(on_token=lambda s: chunked.append(s) or np.array([False, s.index >= 4, False]),
        stream_top_k=3, stream_every=3)
    assert [s.index for s in chunked] == list(range(NEW))
    np.testing.assert_array_equal(np.stack([s.tokens for s in chunked], 1)[[0, 2]],
                                  got[[0, 2]])
    assert np.stack([s.live for s in chunked], 1)[1].sum() == 6
    with pytest.raises(ValueError, match="row_max_new_tokens"):
        run(row_max_new_tokens=np.array([1, NEW + 1, 1]))
    with pytest.raises(ValueError, match="one per row"):
        run(seed=np.array([1, 2]))
