"""Training workdirs: Orbax CheckpointManager with the train state and the data iterator.

Each step directory holds `state` (step, trainable and frozen parameters, optimizer state,
RNG, bad-step count) and `data` (the grain iterator state, one JSON per process). Saves are
asynchronous and atomic: Orbax writes into a temporary directory and renames it when
complete, so a crash (even SIGKILL) mid-save leaves the previous checkpoint as the latest.
Restores place every array on the current mesh, whatever the device count at save time.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxground.checkpoints.converted import (CheckpointError, restore_arrays, restore_params_for,
                                             save_args_for)
from jaxground.models.config import LlavaConfig
from jaxground.models.llava import abstract_model, param_dict
from jaxground.parallel.sharding import param_shardings
from jaxground.utils.trees import leaves_by_path, merge, path_string

CHECKPOINT_DIR = "checkpoints"
TRAIN_CONFIG_FILE = "train_config.json"


def _pure(state, save_frozen: bool) -> dict:
    out = {"step": state.step, "trainable": nnx.to_pure_dict(state.trainable),
           "opt_state": state.opt_state, "rng": state.rng, "bad_steps": state.bad_steps}
    if save_frozen:
        out["frozen"] = nnx.to_pure_dict(state.frozen)
    return out


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, save_frozen: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        self.save_frozen = save_frozen
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=True),
            item_names=("state", "data"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator) -> bool:
        item = _pure(state, self.save_frozen)
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(item, save_args=save_args_for(item)),
            data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

    def restore(self, step: int, abstract_state, data_iterator):
        """State on the shardings of `abstract_state` (ShapeDtypeStructs), and the data
        iterator moved to where it was."""
        target = _pure(abstract_state, self.save_frozen)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        r = restored["state"]
        trainable, frozen = abstract_state.trainable, abstract_state.frozen
        nnx.replace_by_pure_dict(trainable, r["trainable"])
        if self.save_frozen:
            nnx.replace_by_pure_dict(frozen, r["frozen"])
        return abstract_state.replace(step=r["step"], trainable=trainable, frozen=frozen,
                                      opt_state=r["opt_state"], rng=r["rng"],
                                      bad_steps=r["bad_steps"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, CHECKPOINT_DIR))


def _read_only(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, item_names=("state", "data"),
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "data": grain.checkpoint.CheckpointHandler()},
                                 options=ocp.CheckpointManagerOptions(read_only=True))


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint's step in a training workdir (None: none yet)."""
    with _read_only(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))) as mgr:
        return mgr.latest_step()


def restore_trained_params(workdir: str, config: LlavaConfig, step: int | None = None,
                           mesh=None, cast: bool = False) -> dict:
    """Nested parameters of a training checkpoint (latest step, or `step`), each array
    restored straight onto its sharding on `mesh` (None: the first local device).

    Arrays keep their stored dtype (frozen weights may be bf16 beside fp32 trainable ones)
    unless `cast`, which restores each in the dtype the model of `config` gives it (its
    `param_dtype`; the heads' calibration scalars stay float32). Parameters
    the checkpoint does not hold (frozen ones when `train.save_frozen` was off) come from
    the run's `model.init_from`. Only parameters are read: the optimizer state (2x the
    trainable ones) never is.
    """
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    abstract = param_dict(abstract_model(config))
    shardings = param_shardings(abstract, mesh)
    with _read_only(directory) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None or step not in mgr.all_steps():
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} "
                                    f"in {directory} (steps: {list(mgr.all_steps())})")
        meta = mgr.item_metadata(step)["state"]
    wanted = {k: v for k, v in meta.items() if k in ("trainable", "frozen") and v}
    model_leaves, model_shardings = leaves_by_path(abstract), leaves_by_path(shardings)

    def target(part: str):
        def leaf(path, m):
            key = path_string(path)
            where = f"{part}/{key}"
            if key not in model_leaves:
                raise CheckpointError(f"{directory}/{step}: {where} is not a "
                                      f"parameter of the model config")
            model_leaf, found = model_leaves[key], model_shardings[key]
            if tuple(m.shape) != tuple(model_leaf.shape):
                raise CheckpointError(f"{directory}/{step}: {where} is stored with "
                                      f"shape {list(m.shape)}, the model config expects "
                                      f"{list(model_leaf.shape)}")
            dtype = model_leaf.dtype if cast else m.dtype
            return jax.ShapeDtypeStruct(m.shape, dtype, sharding=found)
        return jax.tree_util.tree_map_with_path(leaf, wanted[part])

    targets = {part: target(part) for part in wanted}
    restored = restore_arrays(os.path.join(directory, str(step), "state"), targets,
                              {part: meta[part] for part in targets}, partial=True)
    base = {}
    stored = set(leaves_by_path(restored["trainable"])) | set(
        leaves_by_path(restored.get("frozen", {})))
    if stored != set(model_leaves):  # frozen weights not saved: the base run holds them
        init_from = init_from_of(workdir)
        if is_workdir(init_from):  # a staged recipe: the previous stage's run
            base = restore_trained_params(init_from, config.base, None, mesh, cast)
        elif init_from:
            base = restore_params_for(init_from, config.base, mesh)
    return merge(merge(base, restored.get("frozen", {})), restored["trainable"])


def trained_paths(workdir: str, step: int | None = None) -> set[tuple[str, ...]]:
    """The parameters a run trained: its checkpoint's `trainable` part (latest, or `step`)."""
    with _read_only(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))) as mgr:
        step = mgr.latest_step() if step is None else step
        meta = mgr.item_metadata(step)["state"]
    return {tuple(p.split("/")) for p in leaves_by_path(meta["trainable"])}


def read_train_config(workdir: str) -> dict | None:
    """The run's config as saved (train_config.json), or None if there is none."""
    path = os.path.join(workdir, TRAIN_CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def init_from_of(workdir: str) -> str:
    """The run's `model.init_from`, resolved: a relative path is relative to the workdir
    (how train.py saves it); older runs saved it relative to where they were started."""
    saved = read_train_config(workdir) or {}
    return resolve_init_from(workdir, saved.get("model", {}).get("init_from", ""))


def tokenizer_source(path: str) -> str:
    """The folder holding `path`'s tokenizer: `path` itself, else the nearest run up its
    `model.init_from` chain (a fine-tune keeps its base's tokenizer; a staged recipe chains
    several runs). `path` when none has one (the caller's error names it)."""
    from jaxground.data.processor import TOKENIZER_FILES

    seen, here = set(), path
    while here and here not in seen:
        if any(os.path.exists(os.path.join(here, n)) for n in TOKENIZER_FILES):
            return here
        seen.add(here)
        here = init_from_of(here) if is_workdir(here) else ""
    return path


def resolve_init_from(workdir: str, init_from: str) -> str:
    if not init_from or os.path.isabs(init_from):
        return init_from
    beside = os.path.normpath(os.path.join(workdir, init_from))
    return beside if os.path.isdir(beside) or not os.path.isdir(init_from) else init_from


def write_train_config(workdir: str, cfg) -> None:
    """The run's config; `model.init_from` relative to the workdir, so a workdir moved
    together with its base checkpoint still finds it."""
    saved = cfg.to_dict()
    init_from = saved.get("model", {}).get("init_from")
    if init_from:
        saved["model"]["init_from"] = os.path.relpath(os.path.abspath(init_from),
                                                      os.path.abspath(workdir))
    with open(os.path.join(workdir, TRAIN_CONFIG_FILE), "w") as f:
        json.dump(saved, f, indent=2, default=str)
