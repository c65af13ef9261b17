"""The trainer (jaxground.training.trainer) and its hooks: which steps each hook sees and
with what, their order, stopping, closing, and the built-in hooks one by one. Most tests
drive the loop with a fake step (no model); one trains the shapes model in-process through
`train(run, workdir)` with a hook of the caller's."""

import json
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from jaxground.parallel import sharding
from jaxground.training import hooks
from jaxground.config import shapes_config
from jaxground.training.config import TrainRun
from jaxground.training.step import BATCH_KEYS
from jaxground.training.trainer import Hook, StepInfo, Trainer, _train_batches, train
from jaxground.utils.auroc import auroc
from test_train import worlds  # noqa: F401 (the fixture: small train and held-out worlds)


def fake_step(state, batch):
    """state = steps taken; the metrics say which batch and which state the step saw."""
    return state + 1, {"loss": np.float32(batch["value"]), "seen_state": np.int32(state),
                       "finite": np.bool_(True)}


def batches(n=100):
    return ({"value": float(i), "attention_mask": np.ones((2, 3), np.int32)} for i in range(n))


class Recorder:
    def __init__(self, name, log):
        self.name, self.log, self.closed = name, log, False

    def __call__(self, info):
        self.log.append((self.name, info.step, dict(info.metrics)))

    def close(self):
        self.closed = True


def test_a_hook_sees_every_step_it_is_due_with_that_steps_metrics():
    log = []
    trainer = Trainer(fake_step, total_steps=7)
    trainer.add_hook(Recorder("each", log))
    trainer.add_hook(Recorder("third", log), every=3)
    result = trainer.train(0, batches())
    each = [(s, m) for n, s, m in log if n == "each"]
    assert [s for s, _ in each] == [1, 2, 3, 4, 5, 6, 7]
    # Step s ran on batch s-1 from state s-1; metrics come back as Python scalars.
    for s, m in each:
        assert m["loss"] == float(s - 1) and m["seen_state"] == s - 1 and m["finite"] is True
        assert type(m["loss"]) is float and type(m["seen_state"]) is int
        assert m["tokens_per_s"] > 0
    # every=3: multiples of 3, and the last step whatever it is.
    assert [s for n, s, _ in log if n == "third"] == [3, 6, 7]
    assert result == {"step": 7, **each[-1][1]}


def test_a_resumed_run_counts_steps_from_where_it_was():
    log = []
    trainer = Trainer(fake_step, total_steps=6)
    trainer.add_hook(Recorder("r", log), every=2)
    assert trainer.train(10, batches(), start=3)["step"] == 6
    assert [s for _, s, _ in log] == [4, 6]
    assert [m["seen_state"] for _, _, m in log] == [10, 12]  # step 4 ran from state 10


def test_hooks_run_in_the_order_added_and_see_what_earlier_ones_added():
    log = []
    trainer = Trainer(fake_step, total_steps=2)
    trainer.add_hook(Recorder("a", log))
    trainer.add_hook(lambda info: info.metrics.update(extra=info.step * 10))
    trainer.add_hook(Recorder("b", log))
    trainer.add_hook(Recorder("c", log), every=2)
    result = trainer.train(0, batches())
    assert [(n, s) for n, s, _ in log] == [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("c", 2)]
    assert "extra" not in log[0][2] and log[1][2]["extra"] == 10
    assert result["extra"] == 20


def test_a_stop_request_runs_the_on_stop_hooks_then_ends_the_run():
    log, closers = [], []
    trainer = Trainer(fake_step, total_steps=100)
    trainer.add_hook(Recorder("before", log), every=50)
    trainer.add_hook(lambda info: info.step == 4 and info.request_stop("enough"))
    for name, on_stop in (("save", True), ("eval", False)):
        closers.append(trainer.add_hook(Recorder(name, log), every=50, on_stop=on_stop).fn)
    result = trainer.train(0, batches())
    assert result["step"] == 4
    assert [(n, s) for n, s, _ in log] == [("save", 4)]
    assert all(c.closed for c in closers)


def test_hooks_are_closed_when_a_hook_raises():
    rec = Recorder("r", [])
    trainer = Trainer(fake_step, total_steps=10)
    trainer.add_hook(rec)
    trainer.add_hook(hooks.stop_on_bad_steps(2))
    trainer.step_fn = lambda s, b: (s + 1, {"bad_steps": np.int32(s),
                                            "loss": np.float32(0)})
    with pytest.raises(FloatingPointError, match=r"^2 consecutive steps .*max_bad_steps=2\); "
                                                 r"stopped at step 3\."):
        trainer.train(0, batches())
    assert [s for _, s, _ in rec.log] == [1, 2, 3] and rec.closed


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="every 0 steps"):
        Trainer(fake_step, 5).add_hook(print, every=0)


def test_a_signal_stops_at_the_step_it_arrived_in_and_close_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    stop = hooks.StopRequested(stop_at=0)
    try:
        info = StepInfo(1, {}, None)
        stop(info)
        assert info.stop_reason is None
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process lives on
        info = StepInfo(2, {}, None)
        stop(info)
        assert info.stop_reason == f"signal {int(signal.SIGTERM)}"
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) is before
    stop_at = hooks.StopRequested(stop_at=3)
    stop_at.close()
    reasons = []
    for step in (2, 3):
        info = StepInfo(step, {}, None)
        stop_at(info)
        reasons.append(info.stop_reason)
    assert reasons == [None, "train.stop_at"]


def test_checkpoints_are_saved_every_n_at_the_end_and_on_stop(caplog):
    class FakeCheckpointer:
        saved, closed = [], False

        def save(self, step, state, data_iterator):
            self.saved.append((step, state, data_iterator))

        def close(self):
            self.closed = True

    ckpt, data_iter = FakeCheckpointer(), object()
    trainer = Trainer(fake_step, total_steps=7)
    trainer.add_hook(hooks.SaveCheckpoints(ckpt, data_iter), every=3, on_stop=True)
    trainer.train(0, batches())
    assert [(s, st) for s, st, _ in ckpt.saved] == [(3, 3), (6, 6), (7, 7)]
    assert all(d is data_iter for *_, d in ckpt.saved) and ckpt.closed
    ckpt.saved.clear()
    trainer = Trainer(fake_step, total_steps=7)
    trainer.add_hook(lambda info: info.step == 5 and info.request_stop("signal 15"))
    trainer.add_hook(hooks.SaveCheckpoints(ckpt, data_iter), every=3, on_stop=True)
    with caplog.at_level("WARNING", logger="jaxground"):
        assert trainer.train(0, batches())["step"] == 5
    assert [s for s, *_ in ckpt.saved] == [3, 5]
    assert "signal 15: saved step 5, exiting" in caplog.text


def test_metrics_log_keeps_rows_up_to_the_resumed_step(tmp_path):
    first = hooks.MetricsLog(str(tmp_path), 0)
    for step in range(1, 6):
        first(StepInfo(step, {"loss": float(step)}, None))
    first.write(4, {"lm_loss": 1.0}, split="eval")
    first.close()
    hooks.MetricsLog(str(tmp_path), 3).close()
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(l) for l in f]
    assert rows == [{"step": s, "split": "train", "loss": float(s)} for s in (1, 2, 3)]


def test_nan_steps_count_from_the_resumed_step():
    def local(i):
        return {**{k: np.zeros((2, 3), np.float32) for k in BATCH_KEYS}, "extra": i}

    out = list(_train_batches(local(0), iter([local(1), local(2)]), frozenset({5}), start=3))
    assert [np.isnan(b["pixel_values"]).all() for b in out] == [False, True, False]
    assert all(set(b) == set(BATCH_KEYS) for b in out)


def test_heldout_metrics_pool_tokens_over_batches_and_stop_at_max_batches():
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rng = np.random.RandomState(0)
    local = []
    for i in range(4):
        b = {k: np.zeros((2, 3), np.int32) for k in BATCH_KEYS}
        b["grounding_labels"] = rng.randint(-1, 2, (2, 3)).astype(np.int32)
        b["input_ids"] = rng.randn(2, 3).astype(np.float32)  # the fake model's scores
        b["lm_rows"] = np.full((2, 3), i, np.int32)            # the fake model's LM loss
        local.append(b)

    def evaluate_fn(state, batch):
        mask = jnp.ones_like(batch["grounding_labels"], bool).at[:, 0].set(False)
        return ({"lm_loss": batch["lm_rows"][0, 0].astype(jnp.float32)}, batch["input_ids"],
                mask)

    taken = []
    stream = (taken.append(b) or b for b in local)
    ev = hooks.heldout_metrics(evaluate_fn, None, stream, mesh, max_batches=3)
    assert len(taken) == 3  # a fourth batch is never read
    scores = np.concatenate([b["input_ids"][:, 1:].ravel() for b in local[:3]])
    labels = np.concatenate([b["grounding_labels"][:, 1:].ravel() for b in local[:3]])
    keep = labels >= 0
    assert ev == {"lm_loss": 1.0, "grounding_auroc": pytest.approx(float(auroc(
        scores[keep], labels[keep]))), "labelled_tokens": int(keep.sum())}
    assert hooks.heldout_metrics(evaluate_fn, None, iter([]), mesh, 3) == {}


def test_train_runs_a_callers_hook_after_the_built_in_ones(tmp_path, worlds):
    """`train(run, workdir, extra_hooks)`: the caller's hook sees the steps it is due at with
    the metrics metrics.jsonl has for them, after the held-out evaluation added its
    eval_* ones; the result is the last step's; Ctrl-C is the caller's again afterwards."""
    cfg = shapes_config()
    cfg.data.dir, cfg.data.eval_dir = worlds
    cfg.data.groups_per_batch, cfg.data.max_length, cfg.data.kinds = 2, 80, "caption"
    cfg.train.steps, cfg.train.warmup_steps, cfg.train.progress = 5, 1, False
    cfg.train.eval_every, cfg.train.eval_batches = 4, 1
    seen = []
    before = signal.getsignal(signal.SIGINT)
    wd = tmp_path / "run"
    result = train(TrainRun.from_config_dict(cfg), str(wd),
                   [Hook(lambda info: seen.append((info.step, dict(info.metrics))), every=2)])
    assert signal.getsignal(signal.SIGINT) is before
    with open(wd / "metrics.jsonl") as f:
        rows = [json.loads(l) for l in f]
    train_rows = {r["step"]: r for r in rows if r["split"] == "train"}
    eval_rows = {r["step"]: r for r in rows if r["split"] == "eval"}
    assert sorted(train_rows) == [1, 2, 3, 4, 5] and sorted(eval_rows) == [4, 5]
    assert [s for s, _ in seen] == [2, 4, 5]
    for step, m in seen:
        want = {k: v for k, v in train_rows[step].items() if k not in ("step", "split")}
        if step in eval_rows:
            want.update({f"eval_{k}": v for k, v in eval_rows[step].items()
                         if k not in ("step", "split")})
        np.testing.assert_equal(m, want, err_msg=str(step))  # NaN AUROCs (tiny batches) too
    np.testing.assert_equal(result, {"step": 5, **seen[-1][1]})
    assert sorted(int(n) for n in os.listdir(wd / "checkpoints") if n.isdigit()) == [5]
