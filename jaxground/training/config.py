"""The training part of a run's config, typed and checked: `TrainRun`, made once at the
command line's edge (`jaxground.config.RunConfig`) from the run's ml_collections ConfigDict.

`TrainRun.from_config_dict` rejects impossible values, naming the field, before anything
is compiled; the library (jaxground.training.trainer) takes only the `TrainRun`. The
settings dataclasses below hold the defaults (and say what each field means);
`train_config_dict()` is built from them, so the two cannot drift apart.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from jaxground.models.config import (GROUNDING_TYPES, LLM_LINEARS, PRESETS, QUANT_MODES,
                                     ConfigError, GroundingConfig, LoraConfig, QuantConfig)
from jaxground.parallel.sharding import MESH_AXES
from jaxground.training.losses import LossConfig


class ConfigValueError(ValueError):
    """An impossible training-config value; the message names the field."""


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigValueError(f"config.{field}: {msg}")


# ---- typed sections (field names = the ConfigDict's) -----------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """config.model"""

    preset: str = "shapes"       # a jaxground.models.config preset, or "shapes"
    init_from: str = ""          # a converted checkpoint dir (overrides `preset`'s weights)
    dtype: str = "float32"       # compute dtype
    param_dtype: str = "float32"  # master copy of trainable parameters
    frozen_dtype: str = ""       # e.g. "bfloat16": frozen parameters kept in that dtype
    remat: str = "none"          # "none" | "full" | "dots" (save matmul outputs)
    # LoRA adapters (jaxground.models.config.LoraConfig: enabled, rank, alpha, targets);
    # train them with "lora" in train.trainable. Needs `init_from` (the base).
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    quant: str = "none"          # frozen LLM linears stored as "int8" | "nf4" (needs init_from)
    quant_group_size: int = 0    # rows per scale; 0: int8 per channel, nf4 blocks of 64
    quant_targets: str = LLM_LINEARS

    def __post_init__(self):
        _check(self.remat in ("none", "full", "dots"), "model.remat",
               f"{self.remat!r} is not 'none', 'full' or 'dots'")
        if isinstance(self.lora, Mapping):  # as read from a ConfigDict / train_config.json
            known = {f.name for f in dataclasses.fields(LoraConfig)}
            unknown = sorted(set(self.lora) - known)
            _check(not unknown, f"model.lora.{unknown[0] if unknown else ''}",
                   f"not a field of config.model.lora (fields: {sorted(known)})")
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        _check(not self.lora.enabled or self.lora.rank > 0, "model.lora.rank",
               f"{self.lora.rank} must be positive")
        _check(not self.lora.enabled or self.lora.alpha > 0, "model.lora.alpha",
               f"{self.lora.alpha} must be positive")
        _check(self.quant in QUANT_MODES, "model.quant",
               f"{self.quant!r} is not one of {list(QUANT_MODES)}")
        _check(self.quant_group_size >= 0 and not (self.quant == "nf4"
                                                   and self.quant_group_size % 2),
               "model.quant_group_size", f"{self.quant_group_size}: use 0 (the mode's "
               "default) or a positive size (even for nf4)")
        for name, on in (("model.lora.enabled", self.lora.enabled),
                         ("model.quant", self.quant != "none")):
            _check(not on or self.init_from, "model.init_from",
                   f"{name} adapts a base model: set config.model.init_from to it (a "
                   "converted dir or a training workdir)")
        _check(self.preset in PRESETS or self.preset == "shapes" or self.init_from,
               "model.preset", f"{self.preset!r} is not one of {sorted(PRESETS) + ['shapes']}")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            _check(value in ("float32", "bfloat16", "float16"), f"model.{name}",
                   f"{value!r} is not float32, bfloat16 or float16")

    @property
    def quant_config(self) -> QuantConfig:
        return QuantConfig(mode=self.quant, group_size=self.quant_group_size,
                           targets=self.quant_targets)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """config.data"""

    dir: str = ""                # COCO-format folder; "" = generate the shapes world in WORKDIR
    records: str = ""            # grounding records .jsonl; "" = build them from `dir`
    eval_dir: str = ""           # held-out COCO-format folder ("" = generated for shapes)
    eval_records: str = ""
    world_images: int = 2000     # shapes world size when generated
    eval_world_images: int = 200
    strategies: str = "random,popular,adversarial"
    kinds: str = "caption,question"
    label_attributes: bool = False  # grounding labels also cover attribute words ("red car")
    template: str = "hf"
    pad_to_square: bool = False
    groups_per_batch: int = 8    # global; a batch has 2x this many rows
    max_length: int = 96
    workers: int = 0
    on_bad_image: str = "skip"
    on_too_long: str = "drop"
    seed: int = 0
    conversations: str = ""      # LLaVA instruction-tuning .json (llava_v1_5_mix665k.json's
                                 # format) to mix with the grounding pairs
    conversation_images: str = ""  # root of its "image" paths ("" = the .json's folder)
    mixture: str = ""            # examples drawn per source, e.g. "conversations=1,grounding=3"
                                 # (a source left out: 0); "" = grounding only, or
                                 # conversations only when there are no grounding records

    def __post_init__(self):
        _check(self.groups_per_batch >= 1, "data.groups_per_batch", "must be >= 1")
        _check(self.max_length >= 8, "data.max_length", f"{self.max_length} is too short")
        self.mixture_weights  # parses, or names the field

    @property
    def mixture_weights(self) -> dict[str, float]:
        """`mixture` as {"grounding": w, "conversations": w} ({} for "")."""
        weights: dict[str, float] = {}
        for part in (p.strip() for p in self.mixture.split(",") if p.strip()):
            name, _, value = (x.strip() for x in part.partition("="))
            _check(name in ("grounding", "conversations") and name not in weights,
                   "data.mixture", f"{part!r}: give each of 'grounding' and 'conversations' "
                   "at most once, as name=weight")
            try:
                weights[name] = float(value)
            except ValueError:
                weights[name] = float("nan")
            _check(0 <= weights[name] < float("inf"), "data.mixture",
                   f"{part!r}: the weight must be a number >= 0")
        _check(not weights or any(weights.values()), "data.mixture",
               f"{self.mixture!r}: all weights are 0")
        _check(not weights.get("conversations") or self.conversations, "data.mixture",
               f"{self.mixture!r} draws conversations but config.data.conversations is empty")
        return weights


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """config.train"""

    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 20
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.98
    clip_norm: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    trainable: str = ".*"        # comma-separated regexes over parameter paths ("lora": the
                                 # adapters, e.g. "lora,projector,grounding_heads")
    lr_groups: str = ""          # per-group learning rates, "regex=lr,...": trainable
                                 # parameters whose path matches take that peak lr (same
                                 # schedule), e.g. LLaVA's LoRA recipe "projector=2e-5"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    save_frozen: bool = True
    log_every: int = 1
    eval_every: int = 0          # 0: no held-out evaluation
    eval_batches: int = 8
    max_bad_steps: int = 5
    progress: bool = True
    stop_at: int = 0             # save and exit cleanly at this global step (0: off), e.g.
                                 # to fit a job's time slice; rerun to continue
    debug_nan_steps: str = ""    # fault injection: comma-separated steps given a NaN batch

    def __post_init__(self):
        _check(self.steps > 0, "train.steps", f"{self.steps} must be positive")
        _check(self.lr > 0, "train.lr", f"{self.lr} must be positive")
        _check(0 <= self.warmup_steps <= self.steps, "train.warmup_steps",
               f"{self.warmup_steps} must lie in [0, train.steps={self.steps}]")
        _check(self.grad_accum >= 1, "train.grad_accum", f"{self.grad_accum} must be >= 1")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", f"{self.log_every} must be >= 1")
        _check(self.eval_every >= 0, "train.eval_every", f"{self.eval_every} must be >= 0 "
               "(0: off)")
        self.nan_steps  # parses, or names the field
        self.lr_group_list  # parses, or names the field

    @property
    def lr_group_list(self) -> tuple[tuple[str, float], ...]:
        """`lr_groups` as (regex, peak lr) pairs, in order (the first match wins)."""
        out = []
        for item in (x.strip() for x in str(self.lr_groups or "").split(",")):
            if not item:
                continue
            pattern, sep, lr = item.rpartition("=")
            try:
                value = float(lr)
                re.compile(pattern)
            except (ValueError, re.error) as e:
                raise ConfigValueError(f"config.train.lr_groups={self.lr_groups!r}: "
                                       f"{item!r} is not 'regex=learning_rate'") from e
            _check(bool(sep and pattern) and value > 0, "train.lr_groups",
                   f"{item!r}: use 'regex=learning_rate' with a positive rate")
            out.append((pattern, value))
        return tuple(out)

    @property
    def nan_steps(self) -> frozenset[int]:
        """`debug_nan_steps` as step numbers."""
        try:
            return frozenset(int(s) for s in str(self.debug_nan_steps or "").split(",") if s)
        except ValueError as e:
            raise ConfigValueError(f"config.train.debug_nan_steps={self.debug_nan_steps!r}: "
                                   "use comma-separated step numbers") from e


def _check_loss(loss: LossConfig) -> None:
    _check(loss.objective in ("lm", "contrastive"), "loss.objective",
           f"{loss.objective!r} is not 'lm' or 'contrastive'")
    _check(loss.temperature > 0, "loss.temperature", f"{loss.temperature} must be > 0")
    _check(loss.pooling in ("mean", "token_max"), "loss.pooling",
           f"{loss.pooling!r} is not 'mean' or 'token_max'")
    _check(loss.grounding_weight >= 0, "loss.grounding_weight", "must be >= 0")
    _check(loss.grounding_loss in ("bce", "margin"), "loss.grounding_loss",
           f"{loss.grounding_loss!r} is not 'bce' or 'margin'")


def parse_layers(text) -> tuple[int, ...] | None:
    """`grounding.layers` as the user spells it ("", "none" or "28,29,30,31"), read by the
    one parser (`GroundingConfig.parse_layers`); a mistake is a ConfigValueError."""
    try:
        return GroundingConfig.parse_layers(text, field="config.grounding.layers")
    except ConfigError as e:
        raise ConfigValueError(str(e)) from e


def layers_text(layers: tuple[int, ...] | None) -> str:
    """`parse_layers`'s inverse."""
    return "" if layers is None else ",".join(map(str, layers)) or "none"


def _check_grounding(g: GroundingConfig) -> None:
    _check(g.type in GROUNDING_TYPES, "grounding.type",
           f"{g.type!r} is not one of {list(GROUNDING_TYPES)}")


def _default_mesh() -> dict[str, int]:
    return dict(data=1, fsdp=-1, tensor=1)


def _default_distributed() -> dict[str, Any]:
    return dict(coordinator_address="", num_processes=0, process_id=0)


_SECTIONS = {"train": TrainSettings, "data": DataSettings, "loss": LossConfig,
             "grounding": GroundingConfig, "model": ModelSettings}


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """A whole training run, typed and checked: what `jaxground.training.trainer.train`
    takes. Build it with `TrainRun.from_config_dict(cfg)` (once, at the CLI's edge)."""

    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    grounding: GroundingConfig = dataclasses.field(default_factory=GroundingConfig)
    mesh: dict[str, int] = dataclasses.field(default_factory=_default_mesh)
    distributed: dict[str, Any] = dataclasses.field(default_factory=_default_distributed)
    # The ConfigDict as given (`cfg.to_dict()`): sections the trainer does not read (`eval`)
    # and the spelling of `grounding.layers` go to train_config.json as they came.
    raw: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        _check_loss(self.loss)
        _check(self.loss.objective == "lm" or not self.train.eval_every, "train.eval_every",
               "held-out evaluation measures the LM loss and grounding AUROC, which "
               "loss.objective='contrastive' does not train: set it to 0")
        _check_grounding(self.grounding)
        unknown = sorted(set(self.mesh) - set(MESH_AXES))
        _check(not unknown, "mesh", f"axes {unknown} are not among {list(MESH_AXES)}")

    @classmethod
    def from_config_dict(cls, cfg) -> TrainRun:
        """A ConfigDict (or the plain dict of one, e.g. a saved train_config.json) -> the
        typed run. Missing fields take their defaults (a config saved before a field
        existed); an unknown field, an impossible value or an unparsable
        `grounding.layers` raises ConfigValueError naming `config.<section>.<field>`."""
        raw = cfg.to_dict() if hasattr(cfg, "to_dict") else copy.deepcopy(dict(cfg))
        sections = {}
        for name, settings in _SECTIONS.items():
            values = dict(raw.get(name, {}))
            known = {f.name for f in dataclasses.fields(settings)}
            unknown = sorted(set(values) - known)
            _check(not unknown, f"{name}.{unknown[0] if unknown else ''}",
                   f"not a field of config.{name} (fields: {sorted(known)})")
            if name == "grounding":
                values["layers"] = parse_layers(values.get("layers", ""))
            sections[name] = settings(**values)
        return cls(**sections, mesh=dict(raw.get("mesh", _default_mesh())),
                   distributed=dict(raw.get("distributed", _default_distributed())), raw=raw)

    def to_dict(self) -> dict:
        """The ConfigDict's dict again (train_config.json; `write_train_config` takes the
        run): `raw` with the typed sections' values written over it, so a run changed with
        `dataclasses.replace` saves the values it trains with."""
        out = copy.deepcopy(self.raw)
        for name in (*_SECTIONS, "mesh", "distributed"):
            value = getattr(self, name)
            out.setdefault(name, {}).update(
                dict(value) if isinstance(value, Mapping) else dataclasses.asdict(value))
        given = self.raw.get("grounding", {}).get("layers", "")
        out["grounding"]["layers"] = (given if parse_layers(given) == self.grounding.layers
                                      else layers_text(self.grounding.layers))
        return out


# ---- the ConfigDict ---------------------------------------------------------------------------
def _config_dict(settings) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(settings))


def train_config_dict() -> ml_collections.ConfigDict:
    """Every training field at its default (the settings dataclasses above say what each
    means); `jaxground.config.default_config` adds the `eval` section."""
    c = ml_collections.ConfigDict()
    c.model = _config_dict(ModelSettings())
    # grounding.layers: "" = the last four decoder layers; "none"; or "28,29,30,31"
    c.grounding = ml_collections.ConfigDict({**dataclasses.asdict(GroundingConfig()),
                                             "layers": ""})
    c.loss = _config_dict(LossConfig())
    c.data = _config_dict(DataSettings())
    c.train = _config_dict(TrainSettings())
    c.mesh = ml_collections.ConfigDict(_default_mesh())
    c.distributed = ml_collections.ConfigDict(_default_distributed())
    return c
