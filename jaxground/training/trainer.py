"""The training loop and `train(run, workdir)`, the library's one entry point.

The loop (`Trainer.train`) only takes steps and runs hooks; everything else a run does
after a step is a hook added with `add_hook(fn, every=N)`, in this order (Levanter's
style): metrics log, progress bar, NaN guard, stop (signals / `train.stop_at`),
checkpoints, held-out evaluation, then the caller's own hooks.

    trainer = Trainer(step_fn, total_steps=100)
    trainer.add_hook(lambda info: print(info.step, info.metrics["loss"]), every=10)
    result = trainer.train(state, batches)
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from jaxground.checkpoints.converted import write_config
from jaxground.checkpoints.workdir import Checkpointer, write_train_config
from jaxground.data.processor import load_tokenizer, make_processor
from jaxground.parallel import sharding
from jaxground.training import hooks
from jaxground.training import setup
from jaxground.training.config import TrainRun
from jaxground.training.step import BATCH_KEYS

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after a step."""

    step: int                # steps done, this one included (1 after the first)
    metrics: dict            # the step's host scalars (loss, lm_loss, grounding_loss,
                             # grounding_auroc, grad_norm, lr, finite, bad_steps, ...,
                             # tokens_per_s); a hook may add to it (held-out eval: eval_*)
    state: Any               # the TrainState after the step, on the mesh
    stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        """Stop after this step: the hooks after this one still run (`on_stop` ones too)."""
        self.stop_reason = self.stop_reason or reason


@dataclasses.dataclass(frozen=True)
class Hook:
    fn: Callable[[StepInfo], None]
    every: int = 1           # after steps that are multiples of it, and the run's last step
    on_stop: bool = False    # also after the step a stop was requested at

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"a hook runs every {self.every} steps: use >= 1")

    def due(self, info: StepInfo, total_steps: int) -> bool:
        return (info.step % self.every == 0 or info.step == total_steps
                or (self.on_stop and info.stop_reason is not None))


def host_scalars(metrics: dict) -> dict:
    """Device metrics -> Python bool / int / float (fetching them waits for the step)."""
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        out[k] = bool(v) if v.dtype == bool else (int(v) if v.dtype.kind in "iu" else float(v))
    return out


class Trainer:
    """Takes `step_fn(state, batch) -> (state, metrics)` until `total_steps`, running the
    hooks after every step in the order they were added."""

    def __init__(self, step_fn: Callable, total_steps: int):
        self.step_fn = step_fn
        self.total_steps = total_steps
        self.hooks: list[Hook] = []

    def add_hook(self, fn: Callable[[StepInfo], None] | Hook, every: int = 1,
                 on_stop: bool = False) -> Hook:
        hook = fn if isinstance(fn, Hook) else Hook(fn, every, on_stop)
        self.hooks.append(hook)
        return hook

    def run_hooks(self, info: StepInfo) -> None:
        for hook in self.hooks:
            if hook.due(info, self.total_steps):
                hook.fn(info)

    def train(self, state, batches: Iterable[dict], start: int = 0) -> dict:
        """Steps `start + 1 .. total_steps` (fewer if a hook stops the run), one batch of
        this process's rows each. Returns {"step": the last step, **its metrics}. Hooks
        with a `close()` are closed at the end, also when a step or hook raises."""
        batches = iter(batches)
        info = StepInfo(start, {}, state)
        try:
            while info.step < self.total_steps:
                batch = next(batches)
                # Tokens in the global batch: every process holds as many rows.
                tokens = int(batch["attention_mask"].sum()) * jax.process_count()
                t0 = time.perf_counter()
                state, metrics = self.step_fn(state, batch)
                metrics = host_scalars(metrics)
                metrics["tokens_per_s"] = tokens / (time.perf_counter() - t0)
                info = StepInfo(info.step + 1, metrics, state)
                self.run_hooks(info)
                if info.stop_reason:
                    break
        finally:
            for hook in self.hooks:
                if hasattr(hook.fn, "close"):
                    hook.fn.close()
        return {"step": info.step, **info.metrics}


def _train_batches(first: dict, rest: Iterator, nan_steps: frozenset[int],
                   start: int) -> Iterator[dict]:
    """`first` (already taken, to compile the step for its shapes), then the rest; the
    steps in `nan_steps` (train.debug_nan_steps, the NaN guard's test) get NaN images."""
    for step, local in enumerate(itertools.chain([first], rest), start + 1):
        batch = {k: local[k] for k in BATCH_KEYS}
        if step in nan_steps:
            batch["pixel_values"] = np.full_like(batch["pixel_values"], np.nan)
        yield batch


def save_frozen(run: TrainRun) -> bool:
    """Whether checkpoints hold the frozen parameters: `train.save_frozen`, except in an
    adapter run (LoRA or a quantized base), whose checkpoints hold only what it changes;
    the base is read from `model.init_from` (and quantized again) at every restore."""
    if run.model.lora.enabled or run.model.quant != "none":
        if run.train.save_frozen:
            log.info("adapter run: checkpoints hold the trained parameters and optimizer "
                     "state only; the base stays in %s", run.model.init_from)
        return False
    return run.train.save_frozen


def train(run: TrainRun, workdir: str, extra_hooks: Sequence[Hook] = ()) -> dict:
    """Trains (or resumes: the latest checkpoint in `workdir`) the run described by `run`.

    Writes the workdir: config.json (the model config), train_config.json, the tokenizer
    when none comes from `model.init_from`, checkpoints/, metrics.jsonl and tb/. Returns
    {"step": the last step, **its train metrics, **eval_<metric> when evaluated there}.
    `extra_hooks` run after the built-in ones.
    """
    sharding.init_distributed(run.distributed)
    os.makedirs(workdir, exist_ok=True)
    mesh = setup.make_mesh(run)

    data = setup.prepare_data(run, workdir)
    tokenizer = load_tokenizer(data.tokenizer_dir)
    config = setup.model_config(run, tokenizer)
    if jax.process_index() == 0:
        write_config(workdir, config)
        write_train_config(workdir, run)
        if not run.model.init_from:
            tokenizer.save_pretrained(workdir)  # so the workdir alone can be evaluated
    processor = make_processor(tokenizer, config, run.data, run.model.init_from or None)
    data_iter, heldout = setup.pipelines(run, data, processor)

    t = run.train
    with jax.set_mesh(mesh):
        graphdef, state, shardings, tx, schedule = setup.train_state(
            run, setup.build_model(run, config, mesh), mesh)
        checkpointer = Checkpointer(workdir, t.keep_checkpoints, save_frozen(run))
        start = checkpointer.latest_step() or 0
        if start:
            restored = checkpointer.restore(start, setup.abstract(state, shardings), data_iter)
            # Checkpoints without frozen parameters: keep those just read from init_from.
            state = (restored if checkpointer.save_frozen
                     else restored.replace(frozen=state.frozen))
            log.info("resumed from step %d", start)
        first = next(data_iter)
        compiled = setup.compile_steps(run, graphdef, tx, schedule, state, shardings, first,
                                       mesh)

        trainer = Trainer(compiled.train_step, t.steps)
        metrics_log = hooks.MetricsLog(workdir, start)
        trainer.add_hook(metrics_log, every=t.log_every)
        trainer.add_hook(hooks.ProgressBar(t.steps, start, t.progress))
        trainer.add_hook(hooks.stop_on_bad_steps(t.max_bad_steps))
        trainer.add_hook(hooks.StopRequested(t.stop_at))
        trainer.add_hook(hooks.SaveCheckpoints(checkpointer, data_iter),
                         every=t.checkpoint_every, on_stop=True)
        if data.eval_dir is not None and t.eval_every:
            trainer.add_hook(hooks.HeldOutEval(compiled.evaluate, heldout, mesh,
                                                t.eval_batches, metrics_log),
                             every=t.eval_every)
        for hook in extra_hooks:
            trainer.add_hook(hook)
        return trainer.train(state, _train_batches(first, data_iter, t.nan_steps, start),
                             start)
