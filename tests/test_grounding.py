"""Grounding heads and losses: an independent reference, masks, gradients, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import hf_tiny
import jaxground
from jaxground.hf_convert import hf_to_jaxground
from jaxground.models import init_model
from jaxground.models.config import ConfigError, GroundingConfig, llava_1_5_7b, tiny
from jaxground.training.losses import (LossConfig, auroc, lm_loss, margin_grounding_loss,
                                       total_loss)
from jaxground.training.optim import trainable_filter


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    model = hf_tiny.build_hf("mha", seed=21)
    hf_tiny.save_hf(model, str(d))
    return str(d), model


def convert(hf_dir, tmp_path, name, **grounding):
    out = str(tmp_path / name)
    hf_to_jaxground(hf_dir, out, grounding=GroundingConfig(**grounding))
    return jaxground.load(out)


def hf_reference_scores(hf, ids, mask, px, layers):
    """max_p cos(h_t, v_p) from HF's own layer outputs and projector output, in float64."""
    caught = {}
    hooks = [hf.model.language_model.layers[l].register_forward_hook(
        lambda m, i, o, l=l: caught.__setitem__(l, o[0] if isinstance(o, tuple) else o))
        for l in layers]
    hooks.append(hf.model.multi_modal_projector.register_forward_hook(
        lambda m, i, o: caught.__setitem__("image", o)))
    hf_tiny.hf_logits(hf, ids, mask, px)
    for h in hooks:
        h.remove()
    image = caught["image"].double().numpy()  # [N, P, D], one image per row
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    out = {}
    for l in layers:
        h = caught[l].double().numpy()
        h /= np.linalg.norm(h, axis=-1, keepdims=True)
        out[l] = np.einsum("btd,bpd->btp", h, image).max(-1)
    return out


def expected_text_mask(ids, mask):
    image = ids == hf_tiny.IMAGE_TOKEN
    return (np.cumsum(image, 1) > 0) & ~image & mask.astype(bool)


def test_similarity_scores_match_an_outside_reference(hf_dir, tmp_path):
    path, hf = hf_dir
    layers = (1, 2)  # the last two of three
    model = convert(path, tmp_path, "jg", layers=layers, init_scale=1.0, init_bias=0.0)
    ids, mask, px = hf_tiny.batch(hf)
    out = model(input_ids=ids, pixel_values=px, attention_mask=mask)
    text = expected_text_mask(ids, mask)
    np.testing.assert_array_equal(np.asarray(out.grounding_mask), text)
    ref = hf_reference_scores(hf, ids, mask, px, layers)
    assert sorted(out.grounding_scores) == list(layers)
    for l in layers:
        ours = np.asarray(out.grounding_scores[l])
        assert np.abs(ours - ref[l])[text].max() <= 1e-5
        assert (ours[~text] == 0).all()
    mean = np.mean([np.asarray(out.grounding_scores[l]) for l in layers], 0)
    np.testing.assert_allclose(np.asarray(out.grounding), mean, atol=1e-6)


def test_cross_attention_at_gate_zero_leaves_logits_unchanged(hf_dir, tmp_path):
    path, hf = hf_dir
    plain = convert(path, tmp_path, "plain", layers=())
    xattn = convert(path, tmp_path, "xattn", type="cross_attention", num_heads=4)
    ids, mask, px = hf_tiny.batch(hf)
    a = plain(input_ids=ids, pixel_values=px, attention_mask=mask)
    b = xattn(input_ids=ids, pixel_values=px, attention_mask=mask)
    assert a.grounding is None and b.grounding is not None
    assert np.abs(np.asarray(a.logits) - np.asarray(b.logits)).max() <= 1e-6
    # ... and an open gate does change them: the summary really reaches the residual stream.
    heads = xattn.language_model.grounding_heads
    heads.gate[...] = jnp.full_like(heads.gate[...], 0.5)
    c = xattn(input_ids=ids, pixel_values=px, attention_mask=mask)
    assert np.abs(np.asarray(c.logits) - np.asarray(a.logits)).max() > 1e-3


def labelled_batch(cfg, seed=0):
    """Row 0: positive caption; row 1: its negative twin; row 2: left-padded positive."""
    rng = np.random.RandomState(seed)
    p, t = cfg.image_seq_length, cfg.image_seq_length + 12
    ids = rng.randint(3, 100, (3, t))
    ids[:, 2:2 + p] = cfg.image_token_id
    mask = np.ones((3, t), np.int32)
    mask[2, :1] = 0
    labels = np.where(np.arange(t) >= 2 + p + 3, ids, -100)
    g = -np.ones((3, t), np.int32)
    g[0, 2 + p + 4] = 1
    g[0, 2 + p + 6] = 1
    g[1, 2 + p + 4] = 1
    g[1, 2 + p + 6] = 0
    g[2, 2 + p + 5] = 1
    g[2, 2 + p + 8] = 0
    px = rng.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size).astype(np.float32)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels,
                 grounding_labels=g, is_positive=np.array([True, False, True]),
                 lm_rows=np.array([True, False, True]),
                 pair_index=np.array([1, 0, -1]))
    return {k: jnp.asarray(v) for k, v in batch.items()}


def forward(model, batch):
    return model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                 attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("head_type,loss_type", [
    ("similarity", "bce"), ("learned", "bce"), ("cross_attention", "bce"),
    ("learned", "margin")])
def test_every_head_parameter_gets_a_gradient(head_type, loss_type):
    cfg = tiny().replace(grounding=GroundingConfig(type=head_type, layers=(1, 3), dim=16,
                                                   num_heads=4))
    model = init_model(cfg)
    if head_type == "cross_attention":
        # At gate 0 only the gate, q and k get gradients (v/o feed the gated update, which
        # tanh(0) zeroes); the gate's gradient opens it after the first step.
        heads = model.language_model.grounding_heads
        heads.gate[...] = jnp.full_like(heads.gate[...], 0.3)
    batch = labelled_batch(cfg)
    loss_cfg = LossConfig(grounding_weight=1.0, grounding_loss=loss_type)
    grads = nnx.grad(lambda m: total_loss(forward(m, batch), batch, loss_cfg)[0])(model)
    head_grads = nnx.to_pure_dict(grads)["language_model"]["grounding_heads"]
    for path, g in jax.tree_util.tree_leaves_with_path(head_grads):
        if loss_type == "margin" and jax.tree_util.keystr(path) == "['bias']":
            # A difference of two mean scores does not depend on a shared bias.
            assert not np.asarray(g).any()
            continue
        g = np.asarray(g).reshape(2, -1)  # [layers, ...]: every head, every parameter
        assert (np.abs(g).sum(-1) > 0).all(), f"{head_type}: zero gradient at {path}"


def test_frozen_parameters_do_not_move():
    cfg = tiny().replace(grounding=GroundingConfig(type="learned", layers=(2, 3), dim=16))
    model = init_model(cfg)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    trainable = trainable_filter(["projector", "grounding_heads"])
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=trainable)
    batch = labelled_batch(cfg)
    loss = lambda m: total_loss(forward(m, batch), batch, LossConfig())[0]
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, trainable))(model)
    opt.update(model, grads)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    flat_before = dict(jax.tree_util.tree_leaves_with_path(before))
    for path, new in jax.tree_util.tree_leaves_with_path(after):
        name = jax.tree_util.keystr(path)
        moved = not np.array_equal(new, flat_before[path])
        should = "projector" in name or "grounding_heads" in name
        assert moved == should, f"{name}: moved={moved}, trainable={should}"


def test_zero_grounding_weight_is_exactly_the_lm_loss():
    cfg = tiny()
    model = init_model(cfg)
    batch = labelled_batch(cfg)
    out = forward(model, batch)
    loss, metrics = total_loss(out, batch, LossConfig(grounding_weight=0.0))
    lm, _ = lm_loss(out.logits, batch["labels"], batch["lm_rows"])
    assert float(loss) == float(lm) and float(metrics["grounding_loss"]) > 0
    g0 = nnx.grad(lambda m: total_loss(forward(m, batch), batch,
                                       LossConfig(grounding_weight=0.0))[0])(model)
    g_lm = nnx.grad(lambda m: lm_loss(forward(m, batch).logits, batch["labels"],
                                      batch["lm_rows"])[0])(model)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g_lm)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unscored_positions_never_reach_the_grounding_loss():
    cfg = tiny()
    model = init_model(cfg)
    batch = labelled_batch(cfg)
    out = forward(model, batch)
    base, _ = total_loss(out, batch, LossConfig())
    outside = ~out.grounding_mask
    assert np.asarray(outside).any()
    noisy = out.replace(grounding=jnp.where(outside, 1e4, out.grounding))
    relabelled = {**batch, "grounding_labels": jnp.where(outside, 1, batch["grounding_labels"])}
    for o, b in ((noisy, batch), (out, relabelled)):
        assert float(total_loss(o, b, LossConfig())[0]) == float(base)


def test_negative_captions_never_reach_the_lm_loss():
    cfg = tiny()
    model = init_model(cfg)
    batch = labelled_batch(cfg)
    base = lm_loss(forward(model, batch).logits, batch["labels"], batch["lm_rows"])[0]
    ids = batch["input_ids"].at[1, -8:].set(7)  # rewrite the negative caption
    changed = {**batch, "input_ids": ids, "labels": batch["labels"].at[1, -8:].set(7)}
    after = lm_loss(forward(model, changed).logits, changed["labels"], changed["lm_rows"])[0]
    np.testing.assert_allclose(float(after), float(base), rtol=0, atol=1e-7)
    # The same change to a positive caption does move it (the test can see a change).
    ids = batch["input_ids"].at[0, -8:].set(7)
    moved = {**batch, "input_ids": ids, "labels": batch["labels"].at[0, -8:].set(7)}
    assert abs(float(lm_loss(forward(model, moved).logits, moved["labels"],
                             moved["lm_rows"])[0]) - float(base)) > 1e-3


def test_auroc_matches_pair_counting():
    rng = np.random.RandomState(0)
    s, y = rng.randn(200), rng.randint(0, 2, 200)
    valid = rng.rand(200) > 0.3
    pos, neg = s[valid & (y == 1)], s[valid & (y == 0)]
    expected = (pos[:, None] > neg[None, :]).mean()
    got = float(auroc(jnp.asarray(s), jnp.asarray(y), jnp.asarray(valid)))
    assert abs(got - expected) < 1e-6
    assert np.isnan(float(auroc(jnp.asarray(s), jnp.ones(200, int), jnp.asarray(valid))))


def test_margin_loss_by_hand():
    # Row 0 (positive) present-object scores 2, 4 -> mean 3; row 1 (negative) hallucinated
    # score 2.5 -> hinge max(0, 1 - (3 - 2.5)) = 0.5. Row 2 is unpaired and ignored.
    scores = jnp.array([[2.0, 4.0, 9.0], [0.0, 2.5, 9.0], [5.0, 5.0, 5.0]])
    labels = jnp.array([[1, 1, -1], [1, 0, -1], [1, 0, 1]])
    mask = jnp.ones((3, 3), bool)
    loss = margin_grounding_loss(scores, labels, mask, jnp.array([True, False, True]),
                                 jnp.array([1, 0, -1]), margin=1.0)
    assert abs(float(loss) - 0.5) < 1e-6


def test_bad_grounding_config_fails_at_config_time():
    with pytest.raises(ConfigError, match=r"grounding\.layers \[40\]: \[40\] out of range "
                                          r"for a decoder with 32 layers"):
        llava_1_5_7b().replace(grounding=GroundingConfig(layers=(40,)))
    with pytest.raises(ConfigError, match=r"grounding\.type 'attention' is not one of"):
        llava_1_5_7b().replace(grounding=GroundingConfig(type="attention"))
    with pytest.raises(ConfigError, match=r"\[3\] listed twice"):
        tiny().replace(grounding=GroundingConfig(layers=(3, 3)))
