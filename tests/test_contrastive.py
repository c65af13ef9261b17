"""The contrastive pretraining objective against a numpy transcription of CLIP's and FILIP's
losses, on a stub model whose image features and token embeddings are given arrays."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from jaxground.training.contrastive import contrastive_loss

G, P, T, D, V = 3, 5, 6, 8, 20
TEMPERATURE = 0.5


def stub_model(features_gpd, table_vd):
    embed = lambda ids: jnp.asarray(table_vd)[ids]  # noqa: E731
    return types.SimpleNamespace(
        image_features=lambda px: jnp.asarray(features_gpd),
        language_model=types.SimpleNamespace(embed_tokens=embed))


def make_batch(rng, lm_rows):
    ids = rng.integers(1, V, (2 * G, T))
    labels = np.where(rng.random((2 * G, T)) < 0.6, ids, -100)
    labels[:, 0] = ids[:, 0]  # every row has a caption token
    return {"pixel_values": np.zeros((G, 3, 4, 4), np.float32), "input_ids": ids,
            "labels": labels, "lm_rows": np.asarray(lm_rows)}


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_similarity(features, table, batch, pooling):
    """[G, 2G] by loops, as the papers define it."""
    sim = np.zeros((G, 2 * G))
    for g in range(G):
        for r in range(2 * G):
            words = table[batch["input_ids"][r][batch["labels"][r] != -100]]
            if pooling == "mean":
                sim[g, r] = unit(features[g].mean(0)) @ unit(words.mean(0))
            else:
                sim[g, r] = np.mean([max(unit(w) @ unit(p) for p in features[g]) for w in words])
    return sim


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("pooling", ["mean", "token_max"])
def test_loss_is_symmetric_infonce_over_faithful_captions(pooling):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((G, P, D))
    table = rng.standard_normal((V, D))
    lm_rows = [True, False, False, False, True, False]  # image 1's group is a placeholder
    batch = make_batch(rng, lm_rows)
    loss, metrics = contrastive_loss(stub_model(features, table), batch, TEMPERATURE, pooling)

    logits = reference_similarity(features, table, batch, pooling) / TEMPERATURE
    own = np.arange(G) * 2
    i2t = -log_softmax(logits)[np.arange(G), own]        # against every caption, twins too
    t2i = -log_softmax(logits[:, own].T)[np.arange(G), np.arange(G)]
    kept = np.array([True, False, True])
    expected = (i2t[kept].mean() + t2i[kept].mean()) / 2
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    retrieved = (logits.argmax(-1) == own)[kept].mean()
    twin = (logits[np.arange(G), own] > logits[np.arange(G), own + 1])[kept].mean()
    np.testing.assert_allclose(float(metrics["retrieval_accuracy"]), retrieved)
    np.testing.assert_allclose(float(metrics["beats_hallucinated_twin"]), twin)


def test_matching_images_and_captions_give_a_low_loss():
    """Each image's patches are exactly its faithful caption's words: the loss is near zero
    at a low temperature, and near log(2G) when the features are swapped around."""
    rng = np.random.default_rng(1)
    table = unit(rng.standard_normal((V, D)))
    batch = make_batch(rng, [True, False] * G)
    batch["labels"] = np.where(np.arange(T) < P, batch["input_ids"], -100)  # P words each
    features = np.stack([table[batch["input_ids"][2 * g, :P]] for g in range(G)])
    good, m = contrastive_loss(stub_model(features, table), batch, 0.02, "token_max")
    bad, _ = contrastive_loss(stub_model(features[::-1], table), batch, 0.02, "token_max")
    assert float(good) < 0.05 and float(m["retrieval_accuracy"]) == 1.0
    assert float(bad) > 5.0
