"""Optimizer pieces: schedule, accumulation, trainable patterns."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxground.training.optim import learning_rate_schedule, make_optimizer


def train_cfg(**kw):
    base = dict(lr=1e-2, warmup_steps=2, steps=10, end_lr_fraction=0.1, b1=0.9, b2=0.98,
                weight_decay=0.0, clip_norm=1.0, grad_accum=1)
    return ml_collections.ConfigDict({**base, **kw})


def test_warmup_then_cosine_to_the_end_fraction():
    s = learning_rate_schedule(train_cfg())
    assert float(s(0)) == 0.0 and abs(float(s(2)) - 1e-2) < 1e-9
    assert abs(float(s(10)) - 1e-3) < 1e-9 and float(s(6)) < 1e-2


def test_gradient_accumulation_updates_every_k_micro_steps():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([0.1, -0.2, 0.3])}
    tx, _ = make_optimizer(train_cfg(grad_accum=2, warmup_steps=0))
    state = tx.init(params)
    upd, state = tx.update(grads, state, params)
    assert not np.asarray(upd["w"]).any()  # first micro-step: accumulate only
    upd, state = tx.update(grads, state, params)
    single, _ = make_optimizer(train_cfg(warmup_steps=0))
    want, _ = single.update(grads, single.init(params), params)
    np.testing.assert_allclose(upd["w"], want["w"], rtol=1e-6)  # mean of equal grads


def test_clipping_bounds_the_update_direction():
    params = {"w": jnp.zeros(2)}
    tx = optax.clip_by_global_norm(1.0)
    upd, _ = tx.update({"w": jnp.array([30.0, 40.0])}, tx.init(params))
    assert abs(float(optax.global_norm(upd)) - 1.0) < 1e-6
    assert jax.tree.leaves(upd)[0].shape == (2,)
