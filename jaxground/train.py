"""Train LLaVA with grounding heads.

  python -m jaxground.train --config configs/shapes.py --workdir runs/shapes \
      [--config.train.steps=200 --config.mesh.fsdp=2 ...]

Reads top to bottom: config -> mesh -> data -> model -> step -> loop. Resumes from the
latest checkpoint in WORKDIR; SIGTERM/SIGINT save a checkpoint at the current step first.
Logs to WORKDIR/metrics.jsonl and TensorBoard event files in WORKDIR/tb.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxground.data import shapes
from jaxground.data.coco import build_records
from jaxground.utils.auroc import auroc
from jaxground.utils.jsonl import read_jsonl
from jaxground.data.pipeline import PipelineConfig, build_dataset
from jaxground.data.processor import load_tokenizer, make_processor
from jaxground.models.config import PRESETS, LlavaConfig
from jaxground.models.llava import init_model
from jaxground.checkpoints import restore_model
from jaxground.checkpoints.converted import read_config, write_config
from jaxground.checkpoints.workdir import Checkpointer, write_train_config
from jaxground.parallel import sharding
from jaxground.training.config import ConfigValueError, grounding_config, validate
from jaxground.training.losses import LossConfig
from jaxground.training.optim import make_optimizer, trainable_filter
from jaxground.training.step import BATCH_KEYS, compile_step, eval_fn, init_state, make_step_fn

log = logging.getLogger("jaxground.train")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when run as a program (see `jaxground.evaluate.define_flags`)."""
    config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).")


# ---- data ------------------------------------------------------------------------------------
def _shapes_world(directory: str, images: int, seed: int) -> str:
    """Generates the shapes world once (process 0), others wait for it."""
    if jax.process_index() == 0:
        log.info("shapes world (%d images, seed %d) in %s", images, seed, directory)
        shapes.ensure_world(directory, images, seed)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"shapes world {directory}")
    return directory


def prepare_data(cfg, workdir: str):
    """(train dir, train records, eval dir or None, eval records, tokenizer source dir)."""
    d = cfg.data
    if d.dir:
        train_dir = d.dir
    elif cfg.model.preset == "shapes" and not cfg.model.init_from:
        train_dir = _shapes_world(os.path.join(workdir, "data", "train"), d.world_images,
                                  d.seed)
    else:
        raise ValueError("config.data.dir is empty: set it to a COCO-format folder "
                         "(only the shapes preset generates its own data)")
    strategies = tuple(s for s in d.strategies.split(",") if s)
    kinds = tuple(k for k in d.kinds.split(",") if k)
    records = (read_jsonl(d.records) if d.records
               else build_records(train_dir, strategies, kinds, seed=d.seed,
                                  attributes=d.label_attributes))
    eval_dir, eval_records = None, []
    if d.eval_dir or (not d.dir and cfg.model.preset == "shapes"):
        eval_dir = d.eval_dir or _shapes_world(os.path.join(workdir, "data", "heldout"),
                                               d.eval_world_images, d.seed + 1000)
        eval_records = (read_jsonl(d.eval_records) if d.eval_records
                        else build_records(eval_dir, strategies, kinds, seed=d.seed + 1,
                                           attributes=d.label_attributes))
    tokenizer_dir = cfg.model.init_from or train_dir
    return train_dir, records, eval_dir, eval_records, tokenizer_dir


def model_config(cfg, tokenizer) -> LlavaConfig:
    m = cfg.model
    if m.init_from:
        base = read_config(m.init_from)
    elif m.preset == "shapes":
        base = PRESETS["shapes"](len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    else:
        base = PRESETS[m.preset]()
    return base.replace(grounding=grounding_config(cfg), dtype=m.dtype,
                        param_dtype=m.param_dtype, remat=m.remat)


# ---- model -----------------------------------------------------------------------------------
def build_model(cfg, config: LlavaConfig, mesh):
    """Random init (seeded), or the weights of `model.init_from` placed directly on their
    shardings; heads of another grounding config than the checkpoint's start fresh."""
    if not cfg.model.init_from:
        return init_model(config, seed=cfg.train.seed)
    saved = read_config(cfg.model.init_from)
    if saved.grounding != config.grounding:
        log.info("init_from has %s heads on layers %s; starting %s heads on layers %s fresh",
                 saved.grounding.type, list(saved.grounded_layers), config.grounding.type,
                 list(config.grounded_layers))
    return restore_model(cfg.model.init_from, config=config, mesh=mesh, seed=cfg.train.seed)


# ---- logging ---------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl (truncated to the resumed step, so a resumed run has no duplicates) and
    TensorBoard, written by process 0."""

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


def _scalars(metrics: dict) -> dict:
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        out[k] = bool(v) if v.dtype == bool else (int(v) if v.dtype.kind in "iu" else float(v))
    return out


class StopRequested:
    """SIGTERM / SIGINT: finish the current step, save, exit cleanly."""

    def __init__(self):
        self.signal = None
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signum


# ---- evaluation on held-out data -------------------------------------------------------------
def evaluate(evaluate_fn, state, eval_iter_fn, mesh, batches: int) -> dict:
    lm, scores, labels = [], [], []
    it = eval_iter_fn()
    for _ in range(batches):
        try:
            local = next(it)
        except StopIteration:
            break
        batch = sharding.global_batch({k: local[k] for k in BATCH_KEYS}, mesh)
        metrics, grounding, mask = evaluate_fn(state, batch)
        lm.append(float(sharding.to_host(metrics["lm_loss"])))
        g_labels = sharding.to_host(batch["grounding_labels"])
        keep = sharding.to_host(mask) & (g_labels >= 0)
        scores.append(sharding.to_host(grounding)[keep])
        labels.append(g_labels[keep])
    if not lm:
        return {}
    s, y = np.concatenate(scores), np.concatenate(labels)
    roc = float(auroc(s, y))
    return {"lm_loss": float(np.mean(lm)), "grounding_auroc": roc, "labelled_tokens": len(s)}


# ---- main ------------------------------------------------------------------------------------
def train(cfg, workdir: str) -> dict:
    validate(cfg)
    sharding.init_distributed(cfg.distributed)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
             jax.process_count())
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.groups_per_batch % batch_devices:
        raise ConfigValueError(
            f"config.data.groups_per_batch={cfg.data.groups_per_batch}: a batch holds one "
            f"image per pair, split over the mesh's data x fsdp = {batch_devices} devices; "
            f"use a multiple of {batch_devices}")

    # data
    train_dir, records, eval_dir, eval_records, tok_dir = prepare_data(cfg, workdir)
    tokenizer = load_tokenizer(tok_dir)
    config = model_config(cfg, tokenizer)
    if jax.process_index() == 0:
        write_config(workdir, config)
        write_train_config(workdir, cfg)
        if not cfg.model.init_from:
            tokenizer.save_pretrained(workdir)  # so the workdir alone can be evaluated
    processor = make_processor(tokenizer, config, cfg.data, cfg.model.init_from or None)
    d = cfg.data
    pipe_cfg = PipelineConfig(groups_per_batch=d.groups_per_batch, max_length=d.max_length,
                              seed=d.seed, workers=d.workers, on_bad_image=d.on_bad_image,
                              on_too_long=d.on_too_long)
    data_iter = iter(build_dataset(records, processor, train_dir, pipe_cfg))

    def eval_iter():
        eval_cfg = PipelineConfig(groups_per_batch=d.groups_per_batch, max_length=d.max_length,
                                  seed=d.seed + 7, num_epochs=1, on_too_long="drop")
        return iter(build_dataset(eval_records, processor, eval_dir, eval_cfg))

    # model, optimizer, state on the mesh
    with jax.set_mesh(mesh):
        model = build_model(cfg, config, mesh)
        tx, schedule = make_optimizer(cfg.train)
        graphdef, state = init_state(model, trainable_filter(cfg.train.trainable), tx,
                                     cfg.train.seed)
        del model
        if cfg.model.frozen_dtype:
            frozen_dtype = jnp.dtype(cfg.model.frozen_dtype)
            state = state.replace(frozen=jax.tree.map(
                lambda a: a.astype(frozen_dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                else a, state.frozen))
        shardings_ = sharding.tree_shardings(state, mesh)
        state = jax.device_put(state, shardings_)
        n_train = sum(x.size for x in jax.tree.leaves(state.trainable))
        n_all = n_train + sum(x.size for x in jax.tree.leaves(state.frozen))
        log.info("parameters: %.2fM trainable of %.2fM", n_train / 1e6, n_all / 1e6)

        ckpt = Checkpointer(workdir, cfg.train.keep_checkpoints, cfg.train.save_frozen)
        start = ckpt.latest_step() or 0
        if start:
            abstract = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                shardings_)
            state = ckpt.restore(start, abstract, data_iter)
            log.info("resumed from step %d", start)

        loss_cfg = LossConfig(cfg.loss.grounding_weight, cfg.loss.grounding_loss,
                              cfg.loss.margin)
        first = next(data_iter)
        abstract_batch = {k: jax.ShapeDtypeStruct(
            (first[k].shape[0] * jax.process_count(),) + first[k].shape[1:], first[k].dtype,
            sharding=sharding.batch_sharding(mesh, first[k].ndim)) for k in BATCH_KEYS}
        abstract_state = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        step_fn = compile_step(make_step_fn(graphdef, tx, loss_cfg, schedule), shardings_,
                               {k: v.sharding for k, v in abstract_batch.items()},
                               abstract_state, abstract_batch)
        evaluate_fn = jax.jit(eval_fn(graphdef, loss_cfg))
        return _loop(cfg, workdir, state, step_fn, evaluate_fn, data_iter, first, eval_iter,
                     ckpt, mesh, start, eval_dir is not None)


def _loop(cfg, workdir, state, step_fn, evaluate_fn, data_iter, first, eval_iter, ckpt, mesh,
          start, can_eval) -> dict:
    from tqdm import tqdm

    t = cfg.train
    metrics_log = MetricsLog(workdir, start)
    stop = StopRequested()
    nan_steps = {int(s) for s in str(t.get("debug_nan_steps", "") or "").split(",") if s}
    bar = tqdm(total=t.steps, initial=start, disable=not t.progress or jax.process_index() > 0,
               dynamic_ncols=True, desc="train")
    local, last = first, {}
    step = start
    try:
        while step < t.steps:
            if local is None:
                local = next(data_iter)
            batch_np = {k: local[k] for k in BATCH_KEYS}
            local = None
            if step + 1 in nan_steps:  # fault injection for the NaN guard's test
                batch_np["pixel_values"] = np.full_like(batch_np["pixel_values"], np.nan)
            tokens = int(batch_np["attention_mask"].sum()) * jax.process_count()
            t0 = time.perf_counter()
            state, metrics = step_fn(state, sharding.global_batch(batch_np, mesh))
            m = _scalars(metrics)
            dt = time.perf_counter() - t0
            step += 1
            m["tokens_per_s"] = tokens / dt
            last = m
            if step % t.log_every == 0 or step == t.steps:
                metrics_log.write(step, m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", auroc=f"{m['grounding_auroc']:.2f}",
                            tok_s=f"{m['tokens_per_s']:.0f}")
            if m["bad_steps"] >= t.max_bad_steps:
                raise FloatingPointError(
                    f"{m['bad_steps']} consecutive steps with a non-finite loss or gradient "
                    f"(train.max_bad_steps={t.max_bad_steps}); stopped at step {step}. The "
                    "last good checkpoint is untouched.")
            stopping = stop.signal or step == t.stop_at
            if step % t.checkpoint_every == 0 or step == t.steps or stopping:
                ckpt.save(step, state, data_iter)
            if can_eval and t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                ev = evaluate(evaluate_fn, state, eval_iter, mesh, t.eval_batches)
                if ev:
                    metrics_log.write(step, ev, split="eval")
                    last = {**last, **{f"eval_{k}": v for k, v in ev.items()}}
            if stopping:
                log.warning("%s: saved step %d, exiting",
                            f"signal {stop.signal}" if stop.signal else "train.stop_at", step)
                break
    finally:
        bar.close()
        ckpt.close()
        metrics_log.close()
    return {"step": step, **last}


def main(argv) -> None:
    del argv
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    for name in ("jaxground", "jaxground.train"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).propagate = False
    if FLAGS.config is None or not FLAGS.workdir:
        raise app.UsageError("--config and --workdir are required")
    result = train(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, bool)}))


if __name__ == "__main__":
    from jaxground import cli

    cli.run(main, define_flags)
