"""The trainer's hooks: metrics log, progress bar, NaN guard, stop (signals and
`train.stop_at`), checkpoints and held-out evaluation.

A hook is a callable taking the step's `StepInfo` (jaxground.training.trainer); one with a
`close()` method is closed when the run ends, however it ends.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable, Iterator

import jax
import numpy as np

from jaxground.parallel import sharding
from jaxground.training.step import BATCH_KEYS
from jaxground.utils.auroc import auroc

log = logging.getLogger(__name__)


class MetricsLog:
    """metrics.jsonl (truncated to the resumed step, so a resumed run has no duplicates) and
    TensorBoard, written by process 0. As a hook: the step's train metrics."""

    def __init__(self, workdir: str, resume_step: int):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not self.active:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [l for l in f if l.strip() and json.loads(l)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None

    def __call__(self, info) -> None:
        self.write(info.step, info.metrics)

    def write(self, step: int, values: dict, split: str = "train") -> None:
        if not self.active:
            return
        row = {"step": step, "split": split, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and np.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class ProgressBar:
    """tqdm on process 0: loss, training AUROC and tokens/s of the last step."""

    def __init__(self, total_steps: int, start: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start, dynamic_ncols=True, desc="train",
                        disable=not enabled or jax.process_index() > 0)

    def __call__(self, info) -> None:
        m = info.metrics
        self.bar.update(1)
        auroc = m.get("grounding_auroc", float("nan"))  # contrastive pretraining has none
        self.bar.set_postfix(loss=f"{m['loss']:.3f}", auroc=f"{auroc:.2f}",
                             tok_s=f"{m['tokens_per_s']:.0f}")

    def close(self) -> None:
        self.bar.close()


def stop_on_bad_steps(max_bad_steps: int) -> Callable:
    """Raises after `max_bad_steps` consecutive non-finite steps (the step skips their
    updates). Added before the checkpoint hook: a bad state is never saved."""

    def guard(info) -> None:
        bad = info.metrics["bad_steps"]
        if bad >= max_bad_steps:
            raise FloatingPointError(
                f"{bad} consecutive steps with a non-finite loss or gradient "
                f"(train.max_bad_steps={max_bad_steps}); stopped at step {info.step}. The "
                "last good checkpoint is untouched.")

    return guard


class StopRequested:
    """SIGTERM / SIGINT (the current step finishes) or `train.stop_at`: asks the trainer to
    stop after this step's hooks; the checkpoint hook saves it. Closing puts the previous
    signal handlers back (a library caller keeps its Ctrl-C)."""

    def __init__(self, stop_at: int = 0):
        self.stop_at = stop_at
        self.signal = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM,
                                                                     signal.SIGINT)}

    def _handle(self, signum, _frame) -> None:
        self.signal = signum

    def __call__(self, info) -> None:
        if self.signal:
            info.request_stop(f"signal {self.signal}")
        elif info.step == self.stop_at:
            info.request_stop("train.stop_at")

    def close(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class SaveCheckpoints:
    """Saves the train state and the data iterator's position (exact resume). Add it with
    `on_stop=True`: a stopped run saves the step it reached."""

    def __init__(self, checkpointer, data_iterator):
        self.checkpointer = checkpointer
        self.data_iterator = data_iterator

    def __call__(self, info) -> None:
        self.checkpointer.save(info.step, info.state, self.data_iterator)
        if info.stop_reason:
            log.warning("%s: saved step %d, exiting", info.stop_reason, info.step)

    def close(self) -> None:  # waits for the last asynchronous save
        self.checkpointer.close()


def heldout_metrics(evaluate_fn, state, batches: Iterator, mesh, max_batches: int) -> dict:
    """LM loss (mean over batches) and grounding AUROC (over every labelled, scored token)
    on up to `max_batches` held-out batches; every process gets the whole of each global
    batch's outputs (`sharding.to_host`), so the numbers do not depend on the process count."""
    lm, scores, labels = [], [], []
    for _, local in zip(range(max_batches), batches):
        batch = sharding.global_batch({k: local[k] for k in BATCH_KEYS}, mesh)
        metrics, grounding_bt, mask_bt = evaluate_fn(state, batch)
        lm.append(float(sharding.to_host(metrics["lm_loss"])))
        labels_bt = sharding.to_host(batch["grounding_labels"])
        keep = sharding.to_host(mask_bt) & (labels_bt >= 0)
        scores.append(sharding.to_host(grounding_bt)[keep])
        labels.append(labels_bt[keep])
    if not lm:
        return {}
    s, y = np.concatenate(scores), np.concatenate(labels)
    return {"lm_loss": float(np.mean(lm)), "grounding_auroc": float(auroc(s, y)),
            "labelled_tokens": len(s)}


class HeldOutEval:
    """Held-out metrics into the metrics log (split "eval") and, as `eval_<name>`, into the
    step's metrics (the run's result carries the last ones)."""

    def __init__(self, evaluate_fn, heldout: Callable[[], Iterator], mesh, max_batches: int,
                 metrics_log: MetricsLog):
        self.evaluate_fn, self.heldout, self.mesh = evaluate_fn, heldout, mesh
        self.max_batches, self.metrics_log = max_batches, metrics_log

    def __call__(self, info) -> None:
        ev = heldout_metrics(self.evaluate_fn, info.state, self.heldout(), self.mesh,
                             self.max_batches)
        if ev:
            self.metrics_log.write(info.step, ev, split="eval")
            info.metrics.update({f"eval_{k}": v for k, v in ev.items()})
