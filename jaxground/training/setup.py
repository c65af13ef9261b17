"""What a run needs before its first step: the mesh, the data, the model config, the model,
the train state on the mesh and the compiled step.

Each function takes the typed `TrainRun` (jaxground.training.config); the trainer
(jaxground.training.trainer.train) calls them in order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxground.checkpoints import restore_model
from jaxground.checkpoints.converted import read_config
from jaxground.checkpoints.workdir import tokenizer_source
from jaxground.data import shapes
from jaxground.data.coco import build_records
from jaxground.data.conversations import Conversations, read_conversations
from jaxground.data.pipeline import PipelineConfig, build_dataset
from jaxground.models.config import PRESETS, LlavaConfig
from jaxground.models.adapters import linear_layers
from jaxground.models.llava import init_model
from jaxground.models.ops import compiler_options
from jaxground.parallel import sharding
from jaxground.training.config import ConfigValueError, TrainRun
from jaxground.training.optim import make_optimizer, trainable_filter
from jaxground.training.step import BATCH_KEYS, compile_step, eval_fn, init_state, make_step_fn
from jaxground.utils.jsonl import read_jsonl
from jaxground.utils.trees import path_string

log = logging.getLogger(__name__)


# ---- mesh ------------------------------------------------------------------------------------
def make_mesh(run: TrainRun) -> jax.sharding.Mesh:
    """The run's mesh; a batch's images (one per pair) must split evenly over its batch axes."""
    mesh = sharding.make_mesh(run.mesh)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
             jax.process_count())
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    groups = run.data.groups_per_batch
    if groups % batch_devices:
        raise ConfigValueError(
            f"config.data.groups_per_batch={groups}: a batch holds one image per pair, split "
            f"over the mesh's data x fsdp = {batch_devices} devices; use a multiple of "
            f"{batch_devices}")
    return mesh


# ---- data ------------------------------------------------------------------------------------
class TrainData(NamedTuple):
    train_dir: str            # "" when the run draws no grounding pairs
    records: list[dict]
    eval_dir: str | None      # None: no held-out data
    eval_records: list[dict]
    tokenizer_dir: str
    conversations: Conversations | None = None


def shapes_world(directory: str, images: int, seed: int) -> str:
    """Generates the shapes world once (process 0), others wait for it."""
    if jax.process_index() == 0:
        log.info("shapes world (%d images, seed %d) in %s", images, seed, directory)
        shapes.ensure_world(directory, images, seed)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"shapes world {directory}")
    return directory


def prepare_data(run: TrainRun, workdir: str) -> TrainData:
    """The run's folders, grounding records and conversations. The shapes preset trained
    from scratch generates its worlds (train, and held-out with other seeds) inside the
    workdir; a run of conversations alone (`data.mixture`) needs no grounding folder."""
    d, m = run.data, run.model
    generated = not d.dir and m.preset == "shapes"
    conversations_only = bool(d.conversations) and not d.mixture_weights.get("grounding", 0)
    if d.dir:
        train_dir = d.dir
    elif generated and not m.init_from:
        train_dir = shapes_world(os.path.join(workdir, "data", "train"), d.world_images, d.seed)
    elif conversations_only and m.init_from:
        train_dir = ""
    else:
        raise ValueError("config.data.dir is empty: set it to a COCO-format folder "
                         "(only the shapes preset generates its own data)")
    strategies = tuple(s for s in d.strategies.split(",") if s)
    kinds = tuple(k for k in d.kinds.split(",") if k)

    def records(given: str, directory: str, seed: int) -> list[dict]:
        return read_jsonl(given) if given else build_records(
            directory, strategies, kinds, seed=seed, attributes=d.label_attributes)

    train_records = records(d.records, train_dir, d.seed) if train_dir else []
    eval_dir, eval_records = None, []
    if d.eval_dir or generated:
        eval_dir = d.eval_dir or shapes_world(os.path.join(workdir, "data", "heldout"),
                                              d.eval_world_images, d.seed + 1000)
        eval_records = records(d.eval_records, eval_dir, d.seed + 1)
    conversations = (read_conversations(d.conversations, d.conversation_images)
                     if d.conversations else None)
    return TrainData(train_dir, train_records, eval_dir, eval_records,
                     tokenizer_source(m.init_from) if m.init_from else train_dir, conversations)


def mixture(run: TrainRun, data: TrainData) -> tuple[float, float]:
    """(grounding, conversations) weights of `data.mixture`; "" = grounding only, or
    conversations only when there are no grounding records."""
    d, weights = run.data, run.data.mixture_weights
    if not weights:
        weights = {"conversations": 1.0} if d.conversations and not data.records else {
            "grounding": 1.0}
    if d.conversations and not weights.get("conversations"):
        log.warning("config.data.conversations is set but config.data.mixture=%r draws no "
                    "conversations: grounding pairs only", d.mixture)
    if weights.get("conversations") and run.loss.objective == "contrastive":
        raise ConfigValueError("config.data.mixture: loss.objective='contrastive' pairs "
                               "images with captions; conversations cannot be mixed in")
    return weights.get("grounding", 0.0), weights.get("conversations", 0.0)


def pipelines(run: TrainRun, data: TrainData, processor) -> tuple[Iterator,
                                                                  Callable[[], Iterator]]:
    """(the training iterator, a function giving a fresh one-epoch held-out iterator of
    grounding pairs only)."""
    d = run.data
    grounding, conversations = mixture(run, data)
    train_cfg = PipelineConfig(groups_per_batch=d.groups_per_batch, max_length=d.max_length,
                               seed=d.seed, workers=d.workers, on_bad_image=d.on_bad_image,
                               on_too_long=d.on_too_long, grounding_weight=grounding,
                               conversation_weight=conversations)
    eval_cfg = PipelineConfig(groups_per_batch=d.groups_per_batch, max_length=d.max_length,
                              seed=d.seed + 7, num_epochs=1, on_too_long="drop")

    def heldout() -> Iterator:
        return iter(build_dataset(data.eval_records, processor, data.eval_dir, eval_cfg))

    return iter(build_dataset(data.records, processor, data.train_dir, train_cfg,
                              conversations=data.conversations)), heldout


# ---- model -----------------------------------------------------------------------------------
def model_config(run: TrainRun, tokenizer) -> LlavaConfig:
    """The preset's (or `init_from`'s) architecture with the run's heads, dtypes and remat."""
    m = run.model
    if m.init_from:
        base = read_config(m.init_from)
    elif m.preset == "shapes":  # sized to the generated world's tokenizer
        base = PRESETS["shapes"](len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    else:
        base = PRESETS[m.preset]()
    return base.replace(grounding=run.grounding, dtype=m.dtype, param_dtype=m.param_dtype,
                        remat=m.remat, lora=m.lora, quant=m.quant_config)


def build_model(run: TrainRun, config: LlavaConfig, mesh):
    """Random init (seeded), or the weights of `model.init_from` placed directly on their
    shardings; heads of another grounding config than the checkpoint's start fresh."""
    if not run.model.init_from:
        return init_model(config, seed=run.train.seed)
    saved = read_config(run.model.init_from)
    if saved.grounding != config.grounding:
        log.info("init_from has %s heads on layers %s; starting %s heads on layers %s fresh",
                 saved.grounding.type, list(saved.grounded_layers), config.grounding.type,
                 list(config.grounded_layers))
    return restore_model(run.model.init_from, config=config, mesh=mesh, seed=run.train.seed)


# ---- state and step --------------------------------------------------------------------------
class Compiled(NamedTuple):
    train_step: Callable      # (state, host batch) -> (state, metrics); donates the state
    evaluate: Callable        # (state, global batch) -> (metrics, grounding [B,T], mask [B,T])


def train_state(run: TrainRun, model, mesh):
    """(graphdef, TrainState on the mesh, its shardings, optimizer, LR schedule). The model
    is split into trainable and frozen parts; frozen floats may be kept in
    `model.frozen_dtype` (bf16 halves the memory of a frozen LLM)."""
    check_trainable(run, model)
    tx, schedule = make_optimizer(run.train)
    graphdef, state = init_state(model, trainable_filter(run.train.trainable), tx,
                                 run.train.seed)
    if run.model.frozen_dtype:
        frozen_dtype = jnp.dtype(run.model.frozen_dtype)
        # Quantization scales stay fp32 (as bitsandbytes keeps its absmax): they are 1/64 of
        # an nf4 kernel's size at most, and bf16 scales would coarsen every weight.
        state = state.replace(frozen=jax.tree_util.tree_map_with_path(
            lambda p, a: a.astype(frozen_dtype)
            if jnp.issubdtype(a.dtype, jnp.floating)
            and not path_string(p).endswith("kernel_scale") else a, state.frozen))
    shardings = sharding.tree_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    n_train = sum(x.size for x in jax.tree.leaves(state.trainable))
    n_all = n_train + sum(x.size for x in jax.tree.leaves(state.frozen))
    log.info("parameters: %.2fM trainable of %.2fM", n_train / 1e6, n_all / 1e6)
    return graphdef, state, shardings, tx, schedule


def check_trainable(run: TrainRun, model) -> None:
    """What `train.trainable` selects must be trainable: no quantized kernel (its codes have
    no gradient), and the adapters when LoRA is on (else they stay zero)."""
    selected = trainable_filter(run.train.trainable)
    quantized = [p for p, m in linear_layers(model) if m.quant_mode != "none"]
    hit = [p for p in quantized if selected((*p.split("/"), "kernel"), nnx.Param(0))]
    if hit:
        raise ConfigValueError(
            f"config.train.trainable={run.train.trainable!r} selects the kernels of "
            f"{hit[0]} (and {len(hit) - 1} more), which config.model.quant={run.model.quant!r} "
            "stores quantized and frozen; train the adapters instead (e.g. "
            "'lora,projector,grounding_heads') or set config.model.quant_targets")
    if run.model.lora.enabled:
        adapters = [p for p, m in linear_layers(model) if m.lora_scale]
        if not any(selected((*p.split("/"), "lora_a"), nnx.Param(0)) for p in adapters):
            raise ConfigValueError(
                f"config.train.trainable={run.train.trainable!r} trains none of the LoRA "
                "adapters that config.model.lora.enabled adds: add 'lora'")


def abstract(state, shardings):
    """ShapeDtypeStructs of `state` on `shardings` (what a checkpoint restores onto)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        state, shardings)


def compile_steps(run: TrainRun, graphdef, tx, schedule, state, shardings, first: dict,
                  mesh) -> Compiled:
    """The train step compiled ahead of time for the global batch `first` (this process's
    rows [B_local, ...]) belongs to, and the jitted held-out forward."""
    batch = {k: jax.ShapeDtypeStruct(
        (first[k].shape[0] * jax.process_count(),) + first[k].shape[1:], first[k].dtype,
        sharding=sharding.batch_sharding(mesh, first[k].ndim)) for k in BATCH_KEYS}
    compiled = compile_step(make_step_fn(graphdef, tx, run.loss, schedule), shardings,
                            {k: v.sharding for k, v in batch.items()},
                            abstract(state, shardings), batch)

    def train_step(state, host_batch: dict):
        return compiled(state, sharding.global_batch(host_batch, mesh))

    return Compiled(train_step, jax.jit(eval_fn(graphdef, run.loss),
                                        compiler_options=compiler_options(state)))
