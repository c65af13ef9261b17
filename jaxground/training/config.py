"""The training config: one ml_collections ConfigDict describing a whole run.

Presets in configs/*.py start from `default_config()` and change what differs. Every field
can be overridden on the command line (`--config.train.lr=1e-4`); `validate` rejects
impossible values, naming the field, before anything is compiled.
"""

from __future__ import annotations

import ml_collections

from jaxground.models.config import GROUNDING_TYPES, PRESETS, GroundingConfig


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        preset="shapes",       # a jaxground.models.config preset, or "shapes"
        init_from="",          # a converted checkpoint dir (overrides `preset`'s weights)
        dtype="float32",       # compute dtype
        param_dtype="float32",  # master copy of trainable parameters
        frozen_dtype="",       # e.g. "bfloat16": frozen parameters kept in that dtype
        remat="none",          # "none" | "full" | "dots" (save matmul outputs)
    ))
    c.grounding = ml_collections.ConfigDict(dict(
        layers="",             # "" = the last four decoder layers; "none"; or "28,29,30,31"
        type="similarity", dim=256, num_heads=8, aggregate="mean",
        image_features="projected", init_scale=1 / 0.07, init_bias=0.0))
    c.loss = ml_collections.ConfigDict(dict(grounding_weight=1.0, grounding_loss="bce",
                                            margin=1.0))
    c.data = ml_collections.ConfigDict(dict(
        dir="",                # COCO-format folder; "" = generate the shapes world in WORKDIR
        records="",            # grounding records .jsonl; "" = build them from `dir`
        eval_dir="",           # held-out COCO-format folder ("" = generated for shapes)
        eval_records="",
        world_images=2000,     # shapes world size when generated
        eval_world_images=200,
        strategies="random,popular,adversarial",
        kinds="caption,question",
        label_attributes=False,  # grounding labels also cover attribute words ("red car")
        template="hf", pad_to_square=False,
        groups_per_batch=8,    # global; a batch has 2x this many rows
        max_length=96, workers=0, on_bad_image="skip", on_too_long="drop", seed=0))
    c.train = ml_collections.ConfigDict(dict(
        steps=300, lr=3e-3, warmup_steps=20, end_lr_fraction=0.1, weight_decay=0.0,
        b1=0.9, b2=0.98, clip_norm=1.0, grad_accum=1, seed=0,
        trainable=".*",        # comma-separated regexes over parameter paths
        checkpoint_every=100, keep_checkpoints=3, save_frozen=True,
        log_every=1, eval_every=0, eval_batches=8, max_bad_steps=5,
        progress=True,
        stop_at=0,             # save and exit cleanly at this global step (0: off), e.g.
                               # to fit a job's time slice; rerun to continue
        debug_nan_steps=""))   # fault injection: comma-separated steps given a NaN batch
    c.eval = ml_collections.ConfigDict(dict(
        # The published way of asking (jaxground.eval.protocols): "llava_1_5" (LLaVA-1.5's
        # own scripts), "hf" (llava-hf's chat format), "lmms_eval", or "training" (the run's
        # own data.template / pad_to_square / caption prompt). The fields below left at
        # ""/0 take the protocol's value.
        protocol="training",
        template="",           # prompt format override: "hf" | "vicuna_v1"
        image_aspect_ratio="",  # "pad" (LLaVA's expand2square) | "crop"
        dtype="",              # "" = the checkpoint's; float32 | bfloat16 | float16 (LLaVA)
        batch_size=8,
        max_new_tokens=0,      # captions (chair, grounding); 0 = the protocol's (512)
        answer_tokens=0,       # short answers (pope, mme); 0 = the protocol's (128)
        pope_parser="",        # "llava" | "lmms_eval"
        mme_parser="",         # "official" | "lmms_eval"
        chair_matcher="reference",  # "reference" (the original CHAIR code) | "clean"
        chair_images=500,      # CHAIR: images drawn (seeded by eval.seed) from the folder
        image_ids="",          # CHAIR: a file of image ids to caption instead (e.g. OPERA's)
        temperature=0.0, top_p=1.0, seed=0,
        guided=False,          # grounding-guided decoding of captions
        guidance=1.0,          # its alpha: argmax log p + alpha * bonus, bonus = the
                               # grounding logit or its log sigmoid (guidance_score)
        guidance_top_k=5,
        guidance_score="logit",  # "logit" | "log_sigmoid"
        guidance_objects_only=True,  # the bonus only for object-word tokens (and the
                                     # attribute words before them with label_attributes)
        contrast="",           # "vcd": visual contrastive decoding (Leng et al. 2024)
        contrast_alpha=1.0, contrast_beta=0.1, contrast_noise_step=500,
        flag_threshold=0.0,    # object tokens (and mentions, by their mean) with a lower
                               # grounding logit are flagged
        caption_prompt="",     # "" = the protocol's caption prompt
        limit=0,               # evaluate the first N images / questions only (0: all)
        split="",              # COCO annotation split, when a folder holds several
        heatmaps=4))           # samples given heatmap pages (grounding task)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0,
                                                   process_id=0))
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


class ConfigValueError(ValueError):
    """An impossible training-config value; the message names the field."""


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigValueError(f"config.{field}: {msg}")


def grounding_config(cfg) -> GroundingConfig:
    g = cfg.grounding
    layers = g.layers.strip() if isinstance(g.layers, str) else g.layers
    if layers in ("", None):
        parsed = None
    elif layers == "none":
        parsed = ()
    else:
        try:
            parsed = tuple(int(x) for x in str(layers).split(","))
        except ValueError as e:
            raise ConfigValueError(f"config.grounding.layers={layers!r}: use '', 'none' or "
                                   "comma-separated layer indices") from e
    return GroundingConfig(layers=parsed, type=g.type, dim=g.dim, num_heads=g.num_heads,
                           aggregate=g.aggregate, image_features=g.image_features,
                           init_scale=g.init_scale, init_bias=g.init_bias)


def validate(cfg) -> None:
    t, d = cfg.train, cfg.data
    _check(t.steps > 0, "train.steps", f"{t.steps} must be positive")
    _check(t.lr > 0, "train.lr", f"{t.lr} must be positive")
    _check(0 <= t.warmup_steps <= t.steps, "train.warmup_steps",
           f"{t.warmup_steps} must lie in [0, train.steps={t.steps}]")
    _check(t.grad_accum >= 1, "train.grad_accum", f"{t.grad_accum} must be >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _check(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    _check(d.groups_per_batch >= 1, "data.groups_per_batch", "must be >= 1")
    _check(d.max_length >= 8, "data.max_length", f"{d.max_length} is too short")
    _check(cfg.loss.grounding_weight >= 0, "loss.grounding_weight", "must be >= 0")
    _check(cfg.loss.grounding_loss in ("bce", "margin"), "loss.grounding_loss",
           f"{cfg.loss.grounding_loss!r} is not 'bce' or 'margin'")
    _check(cfg.grounding.type in GROUNDING_TYPES, "grounding.type",
           f"{cfg.grounding.type!r} is not one of {list(GROUNDING_TYPES)}")
    _check(cfg.model.remat in ("none", "full", "dots"), "model.remat",
           f"{cfg.model.remat!r} is not 'none', 'full' or 'dots'")
    _check(cfg.model.preset in PRESETS or cfg.model.preset == "shapes" or cfg.model.init_from,
           "model.preset", f"{cfg.model.preset!r} is not one of {sorted(PRESETS) + ['shapes']}")
    for name in ("dtype", "param_dtype"):
        _check(cfg.model[name] in ("float32", "bfloat16", "float16"), f"model.{name}",
               f"{cfg.model[name]!r} is not float32, bfloat16 or float16")
    grounding_config(cfg)
    if "eval" in cfg:
        validate_eval(cfg.eval)


def validate_eval(e) -> None:
    _check(e.batch_size >= 1, "eval.batch_size", f"{e.batch_size} must be >= 1")
    _check(e.max_new_tokens >= 0, "eval.max_new_tokens", f"{e.max_new_tokens} must be >= 0 "
           "(0: the protocol's)")
    _check(e.answer_tokens >= 0, "eval.answer_tokens", f"{e.answer_tokens} must be >= 0 "
           "(0: the protocol's)")
    _check(e.temperature >= 0, "eval.temperature", f"{e.temperature} must be >= 0")
    _check(0 < e.top_p <= 1, "eval.top_p", f"{e.top_p} must lie in (0, 1]")
    _check(e.guidance_top_k >= 1, "eval.guidance_top_k", f"{e.guidance_top_k} must be >= 1")
    _check(e.guidance_score in ("logit", "log_sigmoid"), "eval.guidance_score",
           f"{e.guidance_score!r} is not 'logit' or 'log_sigmoid'")
    _check(e.dtype in ("", "float32", "bfloat16", "float16"), "eval.dtype",
           f"{e.dtype!r} is not '', float32, bfloat16 or float16")
    _check(e.contrast in ("", "vcd"), "eval.contrast", f"{e.contrast!r} is not '' or 'vcd'")
    _check(not (e.contrast and e.guided), "eval.contrast",
           "contrastive decoding and grounding guidance cannot be combined")
    _check(0 <= e.contrast_beta <= 1, "eval.contrast_beta",
           f"{e.contrast_beta} must lie in [0, 1]")
    _check(0 <= e.contrast_noise_step < 1000, "eval.contrast_noise_step",
           f"{e.contrast_noise_step} must lie in [0, 1000)")
    _check(e.chair_matcher in ("reference", "clean"), "eval.chair_matcher",
           f"{e.chair_matcher!r} is not 'reference' or 'clean'")
    _check(e.chair_images >= 0, "eval.chair_images", f"{e.chair_images} must be >= 0")
    _check(e.limit >= 0, "eval.limit", f"{e.limit} must be >= 0")
    _check(e.heatmaps >= 0, "eval.heatmaps", f"{e.heatmaps} must be >= 0")


def with_eval_defaults(cfg) -> ml_collections.ConfigDict:
    """`cfg` with every eval field present: a config saved before a field existed gets
    its default (its own values are kept)."""
    eval_cfg = default_config().eval
    if "eval" in cfg:
        eval_cfg.update(cfg.eval.to_dict() if hasattr(cfg.eval, "to_dict") else cfg.eval)
    cfg.unlock()
    cfg.eval = eval_cfg
    return cfg
