"""Evaluation settings: everything an evaluation reads from a run's config, typed, checked and
with its protocol resolved, built once.

`EvalSettings.from_config_dict(cfg)` takes a run's ml_collections config (or the dict of a
saved train_config.json): its `eval` section, whose fields keep their names here, and what
evaluation needs from the rest of it (`data.template` and `data.pad_to_square`, the
`training` protocol's prompt format; `data.label_attributes`; the `mesh`; `model.init_from`,
where a fine-tune's tokenizer lives). A field the config lacks (written before the field
existed) gets its default (`jaxground.config.default_config` takes its `eval` section
from these). Impossible
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
    # ---- the `eval` section of a run's config (jaxground.config.default_config)
    # The published way of asking (jaxground.eval.protocols): "llava_1_5" (LLaVA-1.5's own
    # scripts), "hf" (llava-hf's chat format), "lmms_eval", or "training" (the run's own
    # data.template / pad_to_square / caption prompt). Fields below left at ""/0 take the
    # protocol's value.
    protocol: str = "training"
    template: str = ""            # prompt format override: "hf" | "vicuna_v1"
    image_aspect_ratio: str = ""  # "pad" (LLaVA's expand2square) | "crop"
    dtype: str = ""               # "" = the checkpoint's; float32 | bfloat16 | float16 (LLaVA)
    quant: str = ""               # "" = the checkpoint's; "int8" | "nf4": the LLM's linears
                                  # quantized at load (a 7B in ~7 / ~4 GB of weights)
    batch_size: int = 8
    max_new_tokens: int = 0       # captions (chair, grounding); 0 = the protocol's (512)
    answer_tokens: int = 0        # short answers (pope, mme); 0 = the protocol's (128)
    pope_parser: str = ""         # "llava" | "lmms_eval"
    mme_parser: str = ""          # "official" | "lmms_eval"
    chair_matcher: str = "reference"  # "reference" (the original CHAIR code) | "clean"
    chair_images: int = 500       # CHAIR: images drawn (seeded by `seed`) from the folder
    image_ids: str = ""           # CHAIR: a file of image ids to caption instead (OPERA's)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    guided: bool = False          # grounding-guided decoding of captions
    guidance: float = 1.0         # its alpha: argmax log p + alpha * bonus, bonus = the
                                  # grounding logit or its log sigmoid (guidance_score)
    guidance_top_k: int = 5
    guidance_score: str = "logit"  # "logit" | "log_sigmoid"
    guidance_objects_only: bool = True  # the bonus only for object-word tokens (and the
                                        # attribute words before them with label_attributes)
    contrast: str = ""            # "vcd": visual contrastive decoding (Leng et al. 2024)
    contrast_alpha: float = 1.0
    contrast_beta: float = 0.1
    contrast_noise_step: int = 500
    flag_threshold: float = 0.0   # object tokens (and mentions, by their mean) with a lower
                                  # grounding logit are flagged
    caption_prompt: str = ""      # "" = the protocol's caption prompt
    limit: int = 0                # evaluate the first N images / questions only (0: all)
    split: str = ""               # COCO annotation split, when a folder holds several
    heatmaps: int = 4             # samples given heatmap pages (grounding task)
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
    _check(e.quant in ("", "none", "int8", "nf4"), "quant",
           f"{e.quant!r} is not '', none, int8 or nf4")
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
