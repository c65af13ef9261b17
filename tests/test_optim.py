"""Optimizer pieces, all through `make_optimizer` / `learning_rate_schedule`: the exact
warmup + cosine schedule, global-norm clipping and gradient accumulation (mean of the
micro-gradients). Adam's first step is about lr * sign(g) and Adam is scale-invariant, so
each test feeds gradients whose *relative* scales across steps (or whose signs) tell the
right optimizer from the wrong one, and compares against an independent optax chain."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxground.training.optim import (applied_learning_rate, learning_rate_schedule,
                                      make_optimizer)


def train_cfg(**kw):
    base = dict(lr=1e-2, warmup_steps=2, steps=10, end_lr_fraction=0.1, b1=0.9, b2=0.98,
                weight_decay=0.0, clip_norm=1.0, grad_accum=1)
    return ml_collections.ConfigDict({**base, **kw})


def expected_lr(t, lr=1e-2, warmup=2, steps=10, end_fraction=0.1):
    """Linear warmup 0 -> lr over `warmup` steps, then cosine to lr * end_fraction."""
    end = lr * end_fraction
    if t < warmup:
        return lr * t / warmup
    frac = min(t - warmup, steps - warmup) / (steps - warmup)
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


def run(tx, grads_seq, params):
    """Feed gradients in order; return every update and the final state."""
    state = tx.init(params)
    updates = []
    for g in grads_seq:
        upd, state = tx.update(g, state, params)
        updates.append(np.asarray(upd["w"], np.float64))
    return updates, state


def reference(cfg, clip):
    """An independent optax chain: AdamW on the schedule, with or without clipping."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                        weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if clip else adamw


# ---------------------------------------------------------------- schedule

@pytest.mark.parametrize("t", [0, 1, 2, 3, 4, 6, 8, 9, 10, 12, 20])
def test_schedule_is_linear_warmup_then_cosine_exactly(t):
    s = learning_rate_schedule(train_cfg())
    np.testing.assert_allclose(float(s(t)), expected_lr(t), rtol=1e-6, atol=1e-12)


def test_schedule_shape_distinguishes_cosine_from_linear():
    s = learning_rate_schedule(train_cfg())
    # Half-way through the decay cosine sits exactly at the mid value (as linear would),
    # but a quarter of the way it is above the straight line and at 3/4 below it.
    mid = (1e-2 + 1e-3) / 2
    linear = lambda t: 1e-2 + (1e-3 - 1e-2) * (t - 2) / 8
    np.testing.assert_allclose(float(s(6)), mid, rtol=1e-6)
    assert float(s(4)) > linear(4) + 1e-4 and float(s(8)) < linear(8) - 1e-4
    np.testing.assert_allclose(float(s(4)), 1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi / 4)),
                               rtol=1e-6)


def test_schedule_follows_the_config():
    cfg = train_cfg(lr=3e-4, warmup_steps=5, steps=25, end_lr_fraction=0.0)
    s = learning_rate_schedule(cfg)
    for t in (0, 2, 5, 10, 15, 20, 25, 30):
        np.testing.assert_allclose(float(s(t)), expected_lr(t, 3e-4, 5, 25, 0.0),
                                   rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- clipping

# Step 1 gets a huge gradient (norm 50, clipped to 1), step 2 a small one (norm 0.5, never
# clipped). Adam's second update depends on the ratio of the two step's magnitudes, so it
# sees whether the first gradient was clipped; the first update (sign-like) would not.
BIG = jnp.array([30.0, -40.0, 0.0])          # norm 50
SMALL = jnp.array([-0.3, -0.1, 0.4]) / math.sqrt(0.26) * 0.5   # norm 0.5


def clip_run(clip_norm, first):
    cfg = train_cfg(clip_norm=clip_norm, warmup_steps=0)
    tx, _ = make_optimizer(cfg)
    return run(tx, [{"w": first}, {"w": SMALL}], {"w": jnp.zeros(3)})[0]


def test_a_gradient_above_clip_norm_acts_as_if_scaled_down_to_it():
    big = clip_run(1.0, BIG)
    pre_scaled = clip_run(1.0, BIG / 50.0)   # norm exactly clip_norm: untouched
    for a, b in zip(big, pre_scaled):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    # Without effective clipping (clip_norm far above 50) the same two inputs differ in the
    # second update, so the equality above is really the clipping at work.
    loose_big, loose_scaled = clip_run(1e6, BIG), clip_run(1e6, BIG / 50.0)
    assert np.abs(loose_big[1] - loose_scaled[1]).max() > 1e-3 * np.abs(loose_big[1]).max()
    np.testing.assert_allclose(loose_scaled[1], pre_scaled[1], rtol=1e-5, atol=1e-9)


def test_updates_equal_a_clipped_adamw_chain_and_not_an_unclipped_one():
    # b1, b2 off optax's defaults: the config's betas must reach AdamW.
    cfg = train_cfg(warmup_steps=1, weight_decay=0.05, b1=0.7, b2=0.95)
    params = {"w": jnp.array([0.5, -1.0, 2.0])}
    grads = [{"w": BIG}, {"w": SMALL}, {"w": -2 * BIG}, {"w": SMALL * 0.1}]
    tx, _ = make_optimizer(cfg)
    ours, _ = run(tx, grads, params)
    clipped, _ = run(reference(cfg, clip=True), grads, params)
    unclipped, _ = run(reference(cfg, clip=False), grads, params)
    for a, b in zip(ours, clipped):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    # (here the unclipped chain even flips the sign of the second component)
    assert max(np.abs(a - b).max() for a, b in zip(ours[1:], unclipped[1:])) > 1e-3


# ---------------------------------------------------------------- accumulation

# Mean, last and sum differ per component in sign or relative scale:
#   step A: g1, g2 -> mean [1, .5, -.5] (norm 1.22), sum [2, 1, -1] (norm 2.45),
#           last [-1, 2, -1.5] (signs differ from the mean);
#   step B: g3, g4 -> mean norm 0.25, sum norm 0.5.
# Adam is scale-invariant, so "sum" vs "mean" only shows through clipping: clip_norm 2 lies
# between |mean_A| and |sum_A| and above both of step B, so summing changes the ratio of
# the two steps' gradients, and with it the second update.
G1, G2 = jnp.array([3.0, -1.0, 0.5]), jnp.array([-1.0, 2.0, -1.5])
G3, G4 = jnp.array([0.4, -0.3, 0.1]), jnp.array([-0.2, 0.1, 0.2])


def test_accumulated_updates_equal_single_steps_on_the_mean_gradient():
    cfg = train_cfg(grad_accum=2, warmup_steps=0, clip_norm=2.0)
    params = {"w": jnp.array([1.0, -1.0, 0.5])}
    tx, _ = make_optimizer(cfg)
    micro, state = run(tx, [{"w": g} for g in (G1, G2, G3, G4)], params)
    assert not micro[0].any() and not micro[2].any()  # in-between micro-steps: no update
    single, _ = make_optimizer(train_cfg(warmup_steps=0, clip_norm=2.0))
    want, single_state = run(single, [{"w": (G1 + G2) / 2}, {"w": (G3 + G4) / 2}], params)
    np.testing.assert_allclose(micro[1], want[0], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(micro[3], want[1], rtol=1e-5, atol=1e-9)
    # The first update alone already rules out "last micro-gradient only" (signs differ).
    last, _ = run(single, [{"w": G2}], params)
    assert np.sign(micro[1][0]) != np.sign(last[0][0])
    # And the second one rules out summing (checked against a summing reference here, so
    # the test can see the difference it relies on).
    summed, _ = run(single, [{"w": G1 + G2}, {"w": G3 + G4}], params)
    assert np.abs(summed[1] - want[1]).max() > 1e-3 * np.abs(want[1]).max()


def test_accumulated_adam_moments_are_those_of_the_mean_gradient():
    cfg = train_cfg(grad_accum=2, warmup_steps=0, clip_norm=100.0)
    params = {"w": jnp.zeros(3)}
    tx, _ = make_optimizer(cfg)
    _, state = run(tx, [{"w": G1}, {"w": G2}], params)
    single, _ = make_optimizer(train_cfg(warmup_steps=0, clip_norm=100.0))
    _, want = run(single, [{"w": (G1 + G2) / 2}], params)
    for key in ("mu", "nu"):
        got = optax.tree_utils.tree_get(state, key)
        np.testing.assert_allclose(got["w"], optax.tree_utils.tree_get(want, key)["w"],
                                   rtol=1e-6, atol=1e-12)
    mean = np.asarray((G1 + G2) / 2)
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["w"], 0.1 * mean,
                               rtol=1e-6)
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "nu")["w"], 0.02 * mean ** 2,
                               rtol=1e-6)


def test_no_accumulation_updates_every_step():
    tx, _ = make_optimizer(train_cfg(warmup_steps=0))
    ups, _ = run(tx, [{"w": G1}, {"w": G2}], {"w": jnp.zeros(3)})
    assert all(u.any() for u in ups)
    assert jax.tree.leaves(ups)[0].shape == (3,)


def test_logged_learning_rate_is_the_one_the_next_update_applies():
    """Read from optax's own count: accumulation micro-steps do not advance it (the train
    step counter does), so logging schedule(train step) would run ahead of the optimizer."""
    params = {"w": jnp.array([1.0, -1.0, 0.5])}
    for accum, micro_steps, updates in ((1, 3, 3), (2, 3, 1), (2, 4, 2)):
        cfg = train_cfg(grad_accum=accum)
        tx, schedule = make_optimizer(cfg)
        _, state = run(tx, [{"w": G1}] * micro_steps, params)
        assert float(applied_learning_rate(state, schedule)) == pytest.approx(
            expected_lr(updates), rel=1e-6), (accum, micro_steps)
    # And it is the rate of the update that follows: AdamW's first step on a fresh
    # optimizer is -lr * sign(g) (bias-corrected moments; no weight decay here).
    cfg = train_cfg(warmup_steps=0)
    tx, schedule = make_optimizer(cfg)
    state = tx.init(params)
    lr = float(applied_learning_rate(state, schedule))
    update, _ = tx.update({"w": G1 * 1e-3}, state, params)
    np.testing.assert_allclose(np.asarray(update["w"]), -lr * np.sign(G1), rtol=1e-4)


def test_path_string_joins_nnx_and_pytree_paths():
    from jax.tree_util import DictKey

    from jaxground.utils.trees import path_string

    assert path_string(("language_model", "layers", 3, "kernel")) == "language_model/layers/3/kernel"
    # jax.tree_util paths hold key objects: their .key is the name.
    assert path_string((DictKey("projector"), DictKey("linear_1"), DictKey("kernel"))) == (
        "projector/linear_1/kernel")


def test_trainable_filter_selects_params_by_searched_regexes():
    from flax import nnx

    from jaxground.training.optim import trainable_filter
    from jaxground.utils.trees import path_string

    class Tower(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(2, 2, rngs=rngs)
            self.norm = nnx.LayerNorm(2, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.vision = Tower(rngs)
            self.projector = nnx.Linear(2, 3, rngs=rngs)
            self.grounding_heads = nnx.Linear(3, 1, rngs=rngs)
            self.count = nnx.Variable(jnp.zeros(()))  # not a Param: never trainable

    model = Model(nnx.Rngs(0))

    def chosen(patterns):
        state = nnx.state(model, trainable_filter(patterns))
        return sorted(path_string(p) for p, _ in nnx.to_flat_state(state))

    assert chosen("projector,grounding_heads") == [
        "grounding_heads/bias", "grounding_heads/kernel", "projector/bias", "projector/kernel"]
    assert chosen(["norm"]) == ["vision/norm/bias", "vision/norm/scale"]  # searched, not anchored
    assert chosen(" vision/proj , ") == ["vision/proj/bias", "vision/proj/kernel"]
    assert len(chosen(".*")) == 8 and chosen("nothing") == []


def test_warmup_over_the_whole_run_is_a_valid_schedule():
    """warmup_steps == steps (validation allows it): the schedule still builds, warms up to
    lr at the last step, and drops straight to the end value after it."""
    s = learning_rate_schedule(train_cfg(warmup_steps=10, steps=10))
    assert float(s(5)) == pytest.approx(5e-3) and float(s(10)) == pytest.approx(1e-2)
    assert float(s(11)) == pytest.approx(1e-3)
