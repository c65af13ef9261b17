"""Unit properties of the NNX modules that parity tests do not isolate."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxground.models import init_model
from jaxground.models.config import tiny
from jaxground.models.llama import positions_from_mask
from jaxground.models.llava import merge_image_features


def tiny_inputs(cfg, batch=2):
    p = cfg.image_seq_length
    ids = np.array([[3, 4] + [cfg.image_token_id] * p + [5, 6, 7]] * batch)
    px = np.random.RandomState(0).randn(batch, 3, 28, 28).astype(np.float32)
    return ids, px


def test_clip_layers_after_the_selected_one_are_not_run():
    cfg = tiny()  # vision_feature_layer=-2: the last CLIP layer must not run
    model = init_model(cfg)
    ids, px = tiny_inputs(cfg)
    before = np.asarray(model(input_ids=ids, pixel_values=px).logits)
    fc1 = model.vision_tower.layers.mlp.fc1.kernel
    fc1[...] = fc1[...].at[-1].set(jnp.nan)  # poison the last layer only
    after = np.asarray(model(input_ids=ids, pixel_values=px).logits)
    np.testing.assert_array_equal(before, after)
    fc1[...] = fc1[...].at[-2].set(jnp.nan)  # the selected layer does run
    assert np.isnan(np.asarray(model(input_ids=ids, pixel_values=px).logits)).all()


def test_positions_ignore_left_padding():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_merge_fills_image_positions_in_order_across_the_batch():
    embeds = jnp.zeros((2, 4, 1))
    mask = jnp.array([[False, True, True, False], [True, False, False, True]])
    features = jnp.arange(1, 5, dtype=jnp.float32).reshape(2, 2, 1)  # image 0: 1,2; image 1: 3,4
    out = merge_image_features(embeds, mask, features)[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 0], [3, 0, 0, 4]])


def test_left_padding_does_not_change_a_row():
    cfg = tiny()
    model = init_model(cfg)
    ids, px = tiny_inputs(cfg, batch=1)
    alone = np.asarray(model(input_ids=ids, pixel_values=px).logits)[0]
    padded = np.concatenate([np.zeros((1, 3), ids.dtype), ids], 1)
    mask = (np.arange(padded.shape[1]) >= 3).astype(np.int32)[None]
    out = np.asarray(model(input_ids=padded, pixel_values=px, attention_mask=mask).logits)[0, 3:]
    np.testing.assert_allclose(out, alone, atol=1e-5)


def test_forward_is_traceable_and_differentiable():
    from flax import nnx

    cfg = tiny()
    model = init_model(cfg)
    ids, px = tiny_inputs(cfg)

    def loss(m):
        return m(input_ids=jnp.asarray(ids), pixel_values=jnp.asarray(px)).logits.mean()

    grads = nnx.grad(loss)(model)
    norms = jax.tree.leaves(jax.tree.map(lambda g: float(jnp.abs(g).sum()), grads))
    assert all(np.isfinite(norms)) and sum(norms) > 0


def test_remat_changes_memory_not_gradients():
    from flax import nnx

    cfg = tiny()
    ids, px = tiny_inputs(cfg)
    grads = {}
    for remat in ("none", "full", "dots"):
        model = init_model(cfg.replace(remat=remat))
        graphdef, state = nnx.split(model)

        def loss(s):
            m = nnx.merge(graphdef, s)
            return m.forward(jnp.asarray(ids), jnp.asarray(px)).logits.mean()

        grads[remat] = jax.tree.leaves(jax.jit(jax.grad(loss))(state))
    for remat in ("full", "dots"):
        for a, b in zip(grads["none"], grads[remat]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
