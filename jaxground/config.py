"""A run's config at the command line's edge: one ml_collections ConfigDict in, one typed,
checked tree out.

Presets in configs/*.py start from `default_config()` (or `shapes_config()`,
`llava_1_5_config(preset)`) and change what differs; every field can be overridden on the
command line (`--config.train.lr=1e-4`). `RunConfig.from_config_dict(cfg)` turns the dict
into the typed tree once - `TrainRun` (model, grounding, loss, data, train, mesh) for the
trainer and `EvalSettings` (the eval section, protocol resolved) for evaluation - and
rejects any impossible value naming `config.<section>.<field>`, before anything is
compiled. The library below the CLIs takes only the typed pieces.

Each section's defaults live with the dataclass that reads it (jaxground.training.config,
jaxground.eval.settings); the ConfigDict is built from them, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxground.eval.settings import EvalSettings
from jaxground.training.config import TrainRun, train_config_dict


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole run, typed: what training (`train`) and evaluation (`eval`) read."""

    train: TrainRun
    eval: EvalSettings

    @classmethod
    def from_config_dict(cls, cfg) -> RunConfig:
        """A ConfigDict, or the plain dict of one (a saved train_config.json); absent
        fields take their defaults, a mistake raises naming its field."""
        return cls(train=TrainRun.from_config_dict(cfg), eval=EvalSettings.from_config_dict(cfg))


def default_config() -> ml_collections.ConfigDict:
    """Every field at its default."""
    c = train_config_dict()
    c.eval = ml_collections.ConfigDict(EvalSettings().eval_dict())
    return c


def shapes_config() -> ml_collections.ConfigDict:
    """The embedded default (configs/shapes.py, the demo): a tiny LLaVA trained from
    scratch on the synthetic shapes world, attribute words labelled with their object."""
    c = default_config()
    c.model.preset = "shapes"
    c.grounding.layers = ""          # the last four of the tiny decoder's layers
    c.grounding.type = "similarity"
    c.loss.grounding_weight = 1.0
    c.data.label_attributes = True   # the colour before a shape is labelled with it
    c.data.world_images = 2000
    c.data.eval_world_images = 200
    c.data.groups_per_batch = 8
    c.data.max_length = 96
    c.train.steps = 400
    c.train.lr = 3e-3
    c.train.warmup_steps = 20
    c.train.checkpoint_every = 100
    c.train.eval_every = 100
    return c


RECIPE_STAGES = ("vision", "align", "finetune")


def recipe_config(stage: str) -> ml_collections.ConfigDict:
    """LLaVA-1.5's recipe at toy scale on the shapes world: three runs chained by
    `model.init_from` (configs/recipe_*.py; `python -m jaxground.demo --world hard` runs
    them). Every stage reads `data.dir` (stages after the first must be given one).

    vision    CLIP-style contrastive pretraining of the vision tower, the projector giving
              the image side's embedding and the token embeddings the text side's
              (jaxground/training/contrastive.py); the LLM's layers do not run
    align     stage 1: the projector alone on captions (LM loss), tower and LLM frozen
    finetune  stage 2: projector + LLM + heads on captions and questions with the
              grounding loss (`loss.grounding_weight=0` for the ungrounded twin), tower
              frozen, as LLaVA-1.5 fine-tunes with its CLIP frozen
    """
    if stage not in RECIPE_STAGES:
        raise ValueError(f"recipe stage {stage!r} is not one of {RECIPE_STAGES}")
    c = shapes_config()
    c.train.eval_every = 0
    if stage == "vision":
        c.loss.objective = "contrastive"
        c.train.trainable = "vision_tower,projector,language_model/embed_tokens"
        c.data.kinds = "caption"
        c.data.groups_per_batch = 32     # images per contrastive batch (no LLM: cheap)
        c.train.steps = 600
    elif stage == "align":
        c.train.trainable = "projector"
        c.data.kinds = "caption"
        c.loss.grounding_weight = 0.0
        c.train.steps = 300
    else:
        c.train.trainable = "projector,language_model"
        c.train.steps = 1200
    c.train.checkpoint_every = c.train.steps
    return c


def llava_1_5_config(preset: str) -> ml_collections.ConfigDict:
    """Grounding fine-tuning of a converted LLaVA-1.5 (7B or 13B): bf16 compute, fp32
    master copies of the trainable projector + heads, frozen CLIP and LLM kept in bf16."""
    c = default_config()
    c.model.preset = preset
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.frozen_dtype = "bfloat16"
    c.model.remat = "dots"
    c.grounding.layers = ""             # the last four decoder layers
    c.grounding.type = "similarity"
    c.loss.grounding_weight = 0.5
    c.data.template = "vicuna_v1"       # LLaVA-1.5's own conversation format
    c.data.pad_to_square = True         # LLaVA-1.5's image_aspect_ratio="pad"
    c.eval.protocol = "llava_1_5"       # numbers comparable with LLaVA's Model Zoo
    c.data.groups_per_batch = 64
    c.data.max_length = 768             # 576 image tokens + prompt + caption
    c.data.workers = 8
    c.train.steps = 5000
    c.train.lr = 2e-5
    c.train.warmup_steps = 150
    c.train.trainable = "projector,grounding_heads"
    c.train.save_frozen = False         # frozen weights come back from init_from
    c.train.checkpoint_every = 500
    return c


def llava_1_5_lora_config(preset: str, quant: str = "none") -> ml_collections.ConfigDict:
    """LLaVA-1.5's LoRA recipe (its scripts/v1_5/finetune_lora.sh) with the grounding loss,
    sized for one GPU: rank 128 / alpha 256 adapters on every linear of the LLM, peak lr
    2e-4 for them and 2e-5 for the projector, 3% warmup + cosine, no weight decay, full
    rematerialisation (its gradient checkpointing), 128 rows per update (here 2 rows x 64
    accumulated micro-batches). `quant` "int8" / "nf4" keeps the frozen LLM linears
    quantized (QLoRA); see bench/memory_7b.py for what each setting needs."""
    c = llava_1_5_config(preset)
    c.model.lora.enabled = True
    c.model.quant = quant
    c.model.remat = "full"
    c.train.trainable = "lora,projector,grounding_heads"
    c.train.lr = 2e-4
    c.train.lr_groups = "projector=2e-5"
    c.train.weight_decay = 0.0
    c.data.groups_per_batch = 1
    c.train.grad_accum = 64
    c.train.warmup_steps = int(0.03 * c.train.steps)
    return c

