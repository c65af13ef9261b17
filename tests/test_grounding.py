"""Grounding heads and losses: an independent reference, masks, gradients, config errors."""

import copy
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import hf_tiny
import jaxground
from jaxground.checkpoints.hf_convert import hf_to_jaxground
from jaxground.models import init_model
from jaxground.models.config import ConfigError, GroundingConfig, llava_1_5_7b, tiny
from jaxground.training.losses import (LossConfig, lm_loss, margin_grounding_loss,
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


# ---- every head type against a float64 reference built on HF's own forward ------------------
# The heads are re-derived from the spec (README "Grounding heads", grounding.py docstring)
# in NumPy float64 on the outputs of a float64 copy of the HF model; only the head
# parameters are read from our model (after randomising them: no identity, zero or default).

def unit64(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def logsumexp64(a, axis=-1):
    m = a.max(axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis, keepdims=True))).squeeze(axis)


def reference_head(cfg, p, g, h_btd, v_bpd):
    """Head g of the stacked float64 parameters `p` on text h [B, T, D] and image v
    [B, P, D]: (logit scale * s + bias [B, T], residual update [B, T, D] or None)."""
    update = None
    if cfg.type == "similarity":
        s = np.einsum("btd,bpd->btp", unit64(h_btd), unit64(v_bpd)).max(-1)
    elif cfg.type == "learned":
        wt, wv = p["text_proj"]["kernel"][g], p["image_proj"]["kernel"][g]  # [D, dim]
        s = np.einsum("btd,bpd->btp", unit64(h_btd @ wt), unit64(v_bpd @ wv)).max(-1)
    else:
        (b, t, d), n, np_ = h_btd.shape, cfg.num_heads, v_bpd.shape[1]
        dh = d // n
        q = (h_btd @ p["q_proj"]["kernel"][g]).reshape(b, t, n, dh)
        k = (v_bpd @ p["k_proj"]["kernel"][g]).reshape(b, np_, n, dh)
        v = (v_bpd @ p["v_proj"]["kernel"][g]).reshape(b, np_, n, dh)
        a = np.einsum("btnh,bpnh->bntp", q, k) / np.sqrt(dh)
        s = logsumexp64(a).mean(1) - np.log(np_)  # one image (all P patches valid) per row
        probs = np.exp(a - logsumexp64(a)[..., None])
        summary = np.einsum("bntp,bpnh->btnh", probs, v).reshape(b, t, d)
        update = np.tanh(p["gate"][g]) * (summary @ p["o_proj"]["kernel"][g])
    return p["scale"][g] * s + p["bias"][g], update


def hf64_with_heads(hf, ids, mask, px, cfg, layers, params):
    """A float64 copy of the HF model run with the heads of `params` on the outputs of
    `layers` (hooks): per-layer scores {l: [B, T]} (0 where unscored) and the logits [B, T, V]
    (a cross-attention head's gated summary is added to HF's residual stream at scored
    positions, so later layers see it)."""
    hf64 = copy.deepcopy(hf).double().eval()
    image_bt = ids == hf_tiny.IMAGE_TOKEN
    scored_bt = expected_text_mask(ids, mask)
    caught, scores = {}, {}

    def on_projector(m, i, o):
        caught["projected"] = o.detach().numpy().copy()  # [N, P, D], image b in row b

    def on_layer(l, g):
        def hook(m, i, o):
            h_t = o[0] if isinstance(o, tuple) else o
            h = h_t.detach().numpy().astype(np.float64)
            if cfg.image_features == "projected":
                image = caught["projected"]
            else:  # the image-token hidden states of this layer's output
                image = np.stack([h[b][image_bt[b]] for b in range(h.shape[0])])
            logit, update = reference_head(cfg, params, g, h, image)
            scores[l] = np.where(scored_bt, logit, 0.0)
            if update is None:
                return None
            new = torch.from_numpy(h + np.where(scored_bt[..., None], update, 0.0))
            return (new,) + tuple(o[1:]) if isinstance(o, tuple) else new
        return hook

    hooks = [hf64.model.multi_modal_projector.register_forward_hook(on_projector)]
    hooks += [hf64.model.language_model.layers[l].register_forward_hook(on_layer(l, g))
              for g, l in enumerate(layers)]
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    try:
        with torch.no_grad():
            logits = hf64(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(px, dtype=torch.float64),
                          position_ids=torch.tensor(pos)).logits.numpy()
    finally:
        for h in hooks:
            h.remove()
    return scores, logits


def randomise_heads(model, seed):
    """Seeded, non-trivial head parameters (scale, bias, gate per layer; Gaussian kernels)."""
    heads = model.language_model.grounding_heads
    rng = np.random.RandomState(seed)
    g = heads.scale[...].shape[0]
    heads.scale[...] = jnp.asarray(rng.uniform(2.0, 6.0, g), jnp.float32)
    heads.bias[...] = jnp.asarray(rng.uniform(-1.0, 1.0, g), jnp.float32)
    for name in ("text_proj", "image_proj", "q_proj", "k_proj", "v_proj", "o_proj"):
        if hasattr(heads, name):
            kernel = getattr(heads, name).kernel
            shape = kernel[...].shape  # [G, in, out]
            kernel[...] = jnp.asarray(1.5 * rng.randn(*shape) / np.sqrt(shape[1]), jnp.float32)
    if hasattr(heads, "gate"):
        heads.gate[...] = jnp.asarray(rng.choice([-1, 1], g) * rng.uniform(0.4, 0.9, g),
                                      jnp.float32)
    return jax.tree.map(lambda a: np.asarray(a, np.float64),
                        nnx.to_pure_dict(nnx.state(heads, nnx.Param)))


HEAD_CASES = {
    # dim == hidden size: a learned head that skipped a projection would still run.
    "learned-projected-max": dict(type="learned", dim=32, image_features="projected",
                                  aggregate="max"),
    "learned-hidden-mean": dict(type="learned", dim=12, image_features="hidden",
                                aggregate="mean"),
    "xattn-projected-mean": dict(type="cross_attention", num_heads=4,
                                 image_features="projected", aggregate="mean"),
    "xattn-hidden-max": dict(type="cross_attention", num_heads=2, image_features="hidden",
                             aggregate="max"),
}


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_heads_match_a_float64_reference_on_hf_hidden_states(hf_dir, tmp_path, case):
    path, hf = hf_dir
    layers = (0, 2)  # a plain layer between them: the update of layer 0 must flow through it
    cfg = GroundingConfig(layers=layers, **HEAD_CASES[case])
    model = convert(path, tmp_path, "jg", **HEAD_CASES[case], layers=layers)
    params = randomise_heads(model, seed=zlib.crc32(case.encode()) % 1000)
    ids, mask, px = hf_tiny.batch(hf)
    out = model(input_ids=ids, pixel_values=px, attention_mask=mask)
    ref_scores, ref_logits = hf64_with_heads(hf, ids, mask, px, cfg, layers, params)

    # Only text tokens after the image are scored: not the prompt before it, not the image
    # tokens, not the left padding (all three occur in this batch).
    text = expected_text_mask(ids, mask)
    np.testing.assert_array_equal(np.asarray(out.grounding_mask), text)
    before_image = (np.cumsum(ids == hf_tiny.IMAGE_TOKEN, 1) == 0) & mask.astype(bool)
    assert (mask == 0).any() and before_image.any()
    assert sorted(out.grounding_scores) == list(layers)
    ours = np.stack([np.asarray(out.grounding_scores[l]) for l in layers])
    ref = np.stack([ref_scores[l] for l in layers])
    assert (ours[:, ~text] == 0).all()
    np.testing.assert_allclose(ours[:, text], ref[:, text], rtol=1e-4, atol=1e-5)
    # The batch tells the layers, and the tokens, apart.
    assert np.abs(ref[0] - ref[1])[text].max() > 0.1 and ref[:, text].std() > 0.1

    # Aggregation over the grounded layers: exactly the max / mean of the per-layer scores,
    # and the reference's max / mean.
    agg = np.asarray(out.grounding)
    if cfg.aggregate == "max":
        np.testing.assert_array_equal(agg, ours.max(0))
        np.testing.assert_allclose(agg[text], ref.max(0)[text], rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_allclose(agg, ours.mean(0), rtol=1e-7, atol=0)
        np.testing.assert_allclose(agg[text], ref.mean(0)[text], rtol=1e-4, atol=1e-5)

    # Logits: unchanged by similarity / learned heads; a cross-attention head's gated summary
    # (gate != 0 here) enters the residual stream at scored positions and moves them.
    valid = mask.astype(bool)
    logits = np.asarray(out.logits)
    np.testing.assert_allclose(logits[valid], ref_logits[valid], rtol=1e-4, atol=1e-5)
    plain = hf_tiny.hf_logits(hf, ids, mask, px)
    moved = np.abs(ref_logits - plain).max(-1)
    if cfg.type == "cross_attention":
        assert moved[text].min() > 1e-2
        assert moved[valid & ~text].max() < 1e-4  # prompt and image tokens: untouched
    else:
        assert moved[valid].max() < 1e-4


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


@pytest.mark.parametrize("head_type", ["learned", "cross_attention"])
def test_head_projections_follow_param_dtype_and_scalars_stay_float32(head_type):
    """bf16 master weights make bf16 projections; the calibration scale, bias and gate stay
    float32 (a bf16 logit offset would be too coarse)."""
    from jaxground.models.llava import abstract_model

    cfg = tiny().replace(param_dtype="bfloat16", dtype="bfloat16",
                         grounding=GroundingConfig(type=head_type, layers=(1,), dim=16))
    heads = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))[
        "language_model"]["grounding_heads"]
    dtypes = {jax.tree_util.keystr(p): str(v.dtype)
              for p, v in jax.tree_util.tree_leaves_with_path(heads)}
    scalars = {k for k in dtypes if k in ("['scale']", "['bias']", "['gate']")}
    assert {dtypes[k] for k in scalars} == {"float32"}
    assert len(dtypes) > len(scalars)
    assert {v for k, v in dtypes.items() if k not in scalars} == {"bfloat16"}, dtypes


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
