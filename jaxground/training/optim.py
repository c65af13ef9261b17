"""Optimizer (AdamW, warmup + cosine, clipping, accumulation) and the trainable set."""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax
from flax import nnx

from jaxground.utils.trees import path_string


def trainable_filter(patterns: Sequence[str] | str):
    """Params whose path matches any regex in `patterns` (searched, not anchored).

    ("projector", "grounding_heads") trains the projector and the heads and freezes CLIP
    and the LLM; (".*",) trains everything. A comma-separated string works too.
    """
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    compiled = [re.compile(p) for p in patterns]

    def matches(path, _value) -> bool:
        s = path_string(path)
        return any(c.search(s) for c in compiled)

    return nnx.All(nnx.Param, matches)


def learning_rate_schedule(train_cfg) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * end_lr_fraction` at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.lr,
        warmup_steps=train_cfg.warmup_steps,
        decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1),
        end_value=train_cfg.lr * train_cfg.end_lr_fraction)


def scale_by_group(groups: Sequence[tuple[str, float]], base_lr: float
                   ) -> optax.GradientTransformation:
    """Multiplies the update of each parameter whose path matches a group's regex (the
    first that matches) by `group_lr / base_lr`. After AdamW, whose update is lr * (Adam
    direction + decay * param), this is exactly AdamW at the group's own peak rate on the
    same schedule (LLaVA's LoRA recipe: 2e-4 for the adapters, 2e-5 for the projector)."""
    compiled = [(re.compile(p), lr / base_lr) for p, lr in groups]

    def factor(path) -> float:
        s = path_string(path)
        return next((f for c, f in compiled if c.search(s)), 1.0)

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda p, u: u if factor(p) == 1.0 else u * factor(p), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and per-group learning rates (`lr_groups`);
    `grad_accum` > 1 accumulates micro-batches (`optax.MultiSteps`: the schedule then
    counts optimizer updates, not micro-steps)."""
    schedule = learning_rate_schedule(train_cfg)
    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.clip_norm),
        optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2,
                    weight_decay=train_cfg.weight_decay),
        *([scale_by_group(train_cfg.lr_group_list, train_cfg.lr)]
          if getattr(train_cfg, "lr_groups", "") else []))
    if train_cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=train_cfg.grad_accum)
    return tx, schedule


def applied_learning_rate(opt_state, schedule: optax.Schedule):
    """The learning rate the optimizer's next update applies: the schedule at optax's own
    update count. Not at the train step: skipped (non-finite) steps and accumulation
    micro-steps advance the step but not that count."""
    counts = [s.count for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
        if isinstance(s, optax.ScaleByScheduleState)]
    if len(counts) != 1:
        raise ValueError(f"expected one scheduled learning rate in the optimizer state, "
                         f"found {len(counts)}")
    return schedule(counts[0])
