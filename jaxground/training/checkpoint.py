"""Training checkpoints: Orbax CheckpointManager with the train state and the data iterator.

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

from jaxground.models.config import LlavaConfig
from jaxground.models.llava import LlavaModel, abstract_model

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
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_pure(state, self.save_frozen)),
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


def load_trained(workdir: str, config: LlavaConfig, step: int | None = None,
                 base_params: dict | None = None) -> LlavaModel:
    """The model of a training checkpoint (latest step, or `step`).

    `base_params` (nested dict) supplies parameters the checkpoint does not hold (frozen
    ones when `train.save_frozen` was off).
    """
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    with _read_only(directory) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None or step not in mgr.all_steps():
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} "
                                    f"in {directory} (steps: {list(mgr.all_steps())})")
        meta = mgr.item_metadata(step)["state"]
        wanted = {k: v for k, v in meta.items() if k in ("trainable", "frozen") and v}
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              wanted)
    # Only the parameters: the optimizer state (2x the trainable ones) is never read.
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            os.path.join(directory, str(step), "state"),
            args=ocp.args.PyTreeRestore(
                item=target, partial_restore=True,
                restore_args=jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding),
                                          target)))
    if "frozen" not in restored and base_params is None:
        base_params = _frozen_from_init(workdir, config)
    params = _merge(base_params or {}, restored.get("frozen", {}))
    params = _merge(params, restored["trainable"])
    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _frozen_from_init(workdir: str, config: LlavaConfig) -> dict:
    """Parameters of `model.init_from` (the run did not save its frozen ones)."""
    from jaxground import store

    path = os.path.join(workdir, TRAIN_CONFIG_FILE)
    init_from = json.load(open(path))["model"]["init_from"] if os.path.exists(path) else ""
    if not init_from:
        return {}
    saved = store.read_config(init_from).replace(dtype=config.dtype,
                                                 param_dtype=config.param_dtype)
    params = store.restore_params(init_from, saved)
    if saved.grounding != config.grounding:
        params["language_model"].pop("grounding_heads", None)
    return params


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def write_train_config(workdir: str, cfg) -> None:
    with open(os.path.join(workdir, TRAIN_CONFIG_FILE), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, default=str)
