"""The train step: functional at the jit boundary, sharded, donated, compiled ahead of time.

The model is split once (`nnx.split`) into a graphdef, the trainable parameters and the
frozen rest. The step is a pure function of (TrainState, batch) that merges them back
(`nnx.merge`) inside `jax.jit`, so shardings, donation and AOT compilation are plain JAX.
A non-finite loss or gradient norm leaves parameters and optimizer state untouched and
counts a bad step; the loop stops after `max_bad_steps` in a row.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxground.models.ops import compiler_options
from jaxground.training.contrastive import contrastive_loss
from jaxground.training.losses import LossConfig, total_loss
from jaxground.training.optim import applied_learning_rate

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "labels", "grounding_labels",
              "lm_rows", "is_positive", "pair_index")


@struct.dataclass
class TrainState:
    step: jax.Array          # [] int32: batches consumed (skipped non-finite ones included)
    trainable: Any           # nnx.State of the trainable parameters
    frozen: Any              # nnx.State of everything else
    opt_state: Any
    rng: jax.Array           # [2] uint32 key data, for stochastic layers
    bad_steps: jax.Array     # [] int32: consecutive non-finite steps


def init_state(model: nnx.Module, trainable_filter, tx: optax.GradientTransformation,
               seed: int) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                       opt_state=tx.init(trainable),
                       rng=jax.random.key_data(jax.random.key(seed)),
                       bad_steps=jnp.zeros((), jnp.int32))
    return graphdef, state


def forward_batch(model, batch: dict):
    """The model on a pipeline batch: one image per positive/negative pair [G, C, H, W] for
    its two rows [2G, T], so the vision tower encodes each image once."""
    rows_per_image = batch["input_ids"].shape[0] // batch["pixel_values"].shape[0]
    return model.forward(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                         rows_per_image=rows_per_image)


def make_step_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                 loss_cfg: LossConfig, schedule: optax.Schedule):
    """(state, batch) -> (state, metrics); pure, for jax.jit."""

    def loss_fn(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        if loss_cfg.objective == "contrastive":  # the vision tower's pretraining
            return contrastive_loss(model, batch, loss_cfg.temperature, loss_cfg.pooling)
        out = forward_batch(model, batch)
        return total_loss(out, batch, loss_cfg)

    def step(state: TrainState, batch: dict):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.trainable, state.frozen, batch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = state.replace(
            step=state.step + 1,
            trainable=keep(trainable, state.trainable),
            opt_state=keep(opt_state, state.opt_state),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1))
        metrics = {**metrics, "grad_norm": grad_norm, "finite": finite,
                   "bad_steps": new_state.bad_steps,
                   "lr": applied_learning_rate(state.opt_state, schedule)}
        return new_state, metrics

    return step


def eval_fn(graphdef: nnx.GraphDef, loss_cfg: LossConfig):
    def evaluate(state: TrainState, batch: dict):
        model = nnx.merge(graphdef, state.trainable, state.frozen)
        out = forward_batch(model, batch)
        _, metrics = total_loss(out, batch, loss_cfg)
        return metrics, out.grounding, out.grounding_mask
    return evaluate


def compile_step(step, state_shardings, batch_shardings, abstract_state, abstract_batch):
    """AOT-compiled, donating step; logs XLA's memory analysis of the compiled program."""
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, None), donate_argnums=(0,),
                     compiler_options=compiler_options(abstract_state))
    compiled = jitted.lower(abstract_state, abstract_batch).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
        gib = lambda b: f"{b / 2**30:.3f} GiB"
        log.info("train step memory (per device): arguments %s, outputs %s, temporaries %s, "
                 "generated code %s", gib(mem.argument_size_in_bytes),
                 gib(mem.output_size_in_bytes), gib(mem.temp_size_in_bytes),
                 gib(mem.generated_code_size_in_bytes))
    return compiled
