"""Evaluation settings: everything an evaluation reads from a run's config, typed, checked and
with its protocol resolved, built once.

`EvalSettings.from_config_dict(cfg)` takes a run's ml_collections config (or the dict of a
saved train_config.json): its `eval` section, whose fields keep their names here, and what
evaluation needs from the rest of it (`data.template` and `data.pad_to_square`, the
`training` protocol's prompt format; `data.label_attributes`; the `mesh`; `model.init_from`,
where a fine-tune's tokenizer lives). A field the config lacks (written before the field
existed) gets its default: the defaults are those of the training config's. Impossible
values raise `EvalConfigError` naming the field (`config.eval.<field>`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jaxground.eval import protocols
from jaxground.eval.protocols import EvalConfigError

__all__ = ["EVAL_FIELDS", "EvalConfigError", "EvalSettings", "RUN_FIELDS"]

DEFAULT_MESH = {"data": 1, "fsdp": -1, "tensor": 1}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    # ---- the `eval` section (jaxground.training.config.default_config documents each)
    protocol: str = "training"    # llava_1_5 | hf | lmms_eval | training (eval/protocols.py)
    template: str = ""            # ""/0 below: the protocol's value
    image_aspect_ratio: str = ""
    dtype: str = ""               # "" = the checkpoint's
    batch_size: int = 8
    max_new_tokens: int = 0       # captions (chair, grounding)
    answer_tokens: int = 0        # short answers (pope, mme)
    pope_parser: str = ""
    mme_parser: str = ""
    chair_matcher: str = "reference"
    chair_images: int = 500
    image_ids: str = ""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    guided: bool = False
    guidance: float = 1.0
    guidance_top_k: int = 5
    guidance_score: str = "logit"
    guidance_objects_only: bool = True
    contrast: str = ""
    contrast_alpha: float = 1.0
    contrast_beta: float = 0.1
    contrast_noise_step: int = 500
    flag_threshold: float = 0.0
    caption_prompt: str = ""
    limit: int = 0
    split: str = ""
    heatmaps: int = 4
    # ---- from the rest of the run's config
    data_template: str = "hf"         # data.template
    data_pad_to_square: bool = False  # data.pad_to_square
    label_attributes: bool = False    # data.label_attributes
    mesh: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_MESH), hash=False)  # mesh
    init_from: str = ""               # model.init_from
    # ---- derived
    resolved_protocol: protocols.Protocol = dataclasses.field(
        init=False, repr=False, compare=False)

    def __post_init__(self):
        _validate(self)
        object.__setattr__(self, "resolved_protocol", protocols.resolve(self))

    @classmethod
    def from_config_dict(cls, cfg) -> EvalSettings:
        """The settings of a run's config: an ml_collections ConfigDict or a plain dict (a
        saved train_config.json); absent sections and fields get their defaults."""
        e = _section(cfg, "eval")
        unknown = sorted(set(e) - set(EVAL_FIELDS))
        if unknown:
            raise EvalConfigError(f"config.eval.{unknown[0]}: not an evaluation setting "
                                  f"(known: {', '.join(EVAL_FIELDS)})")
        data, model, mesh = (_section(cfg, k) for k in ("data", "model", "mesh"))
        run = {"data_template": data.get("template"),
               "data_pad_to_square": data.get("pad_to_square"),
               "label_attributes": data.get("label_attributes"),
               "mesh": mesh or None, "init_from": model.get("init_from")}
        return cls(**e, **{k: v for k, v in run.items() if v is not None})

    def eval_dict(self) -> dict:
        """The `eval` section's fields, as a config holds them."""
        return {k: getattr(self, k) for k in EVAL_FIELDS}


RUN_FIELDS = ("data_template", "data_pad_to_square", "label_attributes", "mesh", "init_from")
EVAL_FIELDS = tuple(f.name for f in dataclasses.fields(EvalSettings)
                    if f.init and f.name not in RUN_FIELDS)


def _section(cfg, name: str) -> dict:
    section = cfg.get(name) if cfg is not None else None
    if section is None:
        return {}
    return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise EvalConfigError(f"config.eval.{field}: {message}")


def _validate(e: EvalSettings) -> None:
    _check(e.batch_size >= 1, "batch_size", f"{e.batch_size} must be >= 1")
    _check(e.max_new_tokens >= 0, "max_new_tokens", f"{e.max_new_tokens} must be >= 0 "
           "(0: the protocol's)")
    _check(e.answer_tokens >= 0, "answer_tokens", f"{e.answer_tokens} must be >= 0 "
           "(0: the protocol's)")
    _check(e.temperature >= 0, "temperature", f"{e.temperature} must be >= 0")
    _check(0 < e.top_p <= 1, "top_p", f"{e.top_p} must lie in (0, 1]")
    _check(e.guidance_top_k >= 1, "guidance_top_k", f"{e.guidance_top_k} must be >= 1")
    _check(e.guidance_score in ("logit", "log_sigmoid"), "guidance_score",
           f"{e.guidance_score!r} is not 'logit' or 'log_sigmoid'")
    _check(e.dtype in ("", "float32", "bfloat16", "float16"), "dtype",
           f"{e.dtype!r} is not '', float32, bfloat16 or float16")
    _check(e.contrast in ("", "vcd"), "contrast", f"{e.contrast!r} is not '' or 'vcd'")
    _check(not (e.contrast and e.guided), "contrast",
           "contrastive decoding and grounding guidance cannot be combined")
    _check(0 <= e.contrast_beta <= 1, "contrast_beta", f"{e.contrast_beta} must lie in [0, 1]")
    _check(0 <= e.contrast_noise_step < 1000, "contrast_noise_step",
           f"{e.contrast_noise_step} must lie in [0, 1000)")
    _check(e.chair_matcher in ("reference", "clean"), "chair_matcher",
           f"{e.chair_matcher!r} is not 'reference' or 'clean'")
    _check(e.chair_images >= 0, "chair_images", f"{e.chair_images} must be >= 0")
    _check(e.limit >= 0, "limit", f"{e.limit} must be >= 0")
    _check(e.heatmaps >= 0, "heatmaps", f"{e.heatmaps} must be >= 0")
