"""Model config: HF config.json round trip, presets with the real sizes. Training config:
the typed TrainRun made from the ml_collections ConfigDict (defaults, parsing, errors)."""

import dataclasses
import json
import math

import jax
import pytest
import torch
from transformers import LlamaConfig
from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaForConditionalGeneration

from jaxground.models.config import (LLM_LINEARS, GroundingConfig, LlavaConfig, llava_1_5_13b,
                                     llava_1_5_7b)
from jaxground.models.llava import abstract_model, param_dict
from jaxground.config import (RunConfig, default_config, llava_1_5_config, recipe_config,
                              shapes_config)
from jaxground.eval.settings import EvalConfigError, EvalSettings
from jaxground.training.config import (ConfigValueError, DataSettings, ModelSettings, TrainRun,
                                       TrainSettings)
from jaxground.training.losses import LossConfig
from jaxground.training.setup import model_config


def hf_preset(hidden, inter, layers, heads):
    """HF's own config for llava-1.5 (CLIP ViT-L/14-336 defaults + Vicuna sizes)."""
    return HFLlavaConfig(
        text_config=LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=inter,
                                num_hidden_layers=layers, num_attention_heads=heads,
                                rms_norm_eps=1e-5, max_position_embeddings=4096,
                                pad_token_id=32001),
        image_token_index=32000, pad_token_id=32001)


@pytest.mark.parametrize("preset,sizes", [(llava_1_5_7b, (4096, 11008, 32, 32)),
                                          (llava_1_5_13b, (5120, 13824, 40, 40))])
def test_presets_have_the_real_shapes(preset, sizes):
    hf_cfg = hf_preset(*sizes)
    ours = LlavaConfig.from_hf(hf_cfg.to_dict())
    assert ours == preset()
    # Same number of parameters as HF's model of that config (built on the meta device).
    with torch.device("meta"):
        hf_model = LlavaForConditionalGeneration(hf_cfg)
    hf_count = sum(p.numel() for p in hf_model.parameters())
    no_heads = ours.replace(grounding=GroundingConfig(layers=()))
    count = lambda cfg: sum(math.prod(a.shape) for a in
                            jax.tree.leaves(param_dict(abstract_model(cfg))))
    assert count(no_heads) == hf_count
    assert count(ours) == hf_count + 4 * 2  # four similarity heads: scale and bias each
    assert (hf_count > 7.0e9) if sizes[0] == 4096 else (hf_count > 13.0e9)


def test_hf_config_round_trip():
    cfg = llava_1_5_7b().replace(vision_feature_layer=(-3, -2), tie_word_embeddings=True)
    assert LlavaConfig.from_hf(cfg.to_hf()) == cfg
    assert LlavaConfig.from_dict(cfg.to_dict()) == cfg


def test_rope_theta_from_old_and_new_config_keys():
    new = {"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}}
    old = {"text_config": {"rope_theta": 5e5}}
    assert LlavaConfig.from_hf(new).text.rope_theta == LlavaConfig.from_hf(old).text.rope_theta \
        == 5e5


# ---- the training config: TrainRun, typed once from the ml_collections ConfigDict ------------
# default_config() before the typed config existed, less `eval` (train_config.json's format).
DEFAULTS = {
    "data": {"dir": "", "eval_dir": "", "eval_records": "", "eval_world_images": 200,
             "groups_per_batch": 8, "kinds": "caption,question", "label_attributes": False,
             "max_length": 96, "on_bad_image": "skip", "on_too_long": "drop",
             "conversations": "", "conversation_images": "", "mixture": "",
             "pad_to_square": False, "records": "", "seed": 0,
             "strategies": "random,popular,adversarial", "template": "hf", "workers": 0,
             "world_images": 2000},
    "distributed": {"coordinator_address": "", "num_processes": 0, "process_id": 0},
    "grounding": {"aggregate": "mean", "dim": 256, "image_features": "projected",
                  "init_bias": 0.0, "init_scale": 1 / 0.07, "layers": "", "num_heads": 8,
                  "type": "similarity"},
    "loss": {"grounding_loss": "bce", "grounding_weight": 1.0, "margin": 1.0, "objective": "lm", "pooling": "mean",
             "temperature": 0.07},
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    "model": {"dtype": "float32", "frozen_dtype": "", "init_from": "",
              "lora": {"alpha": 256.0, "enabled": False, "rank": 128,
                       "targets": LLM_LINEARS},
              "param_dtype": "float32", "preset": "shapes", "quant": "none",
              "quant_group_size": 0, "quant_targets": LLM_LINEARS, "remat": "none"},
    "train": {"b1": 0.9, "b2": 0.98, "checkpoint_every": 100, "clip_norm": 1.0,
              "debug_nan_steps": "", "end_lr_fraction": 0.1, "eval_batches": 8,
              "eval_every": 0, "grad_accum": 1, "keep_checkpoints": 3, "log_every": 1,
              "lr": 0.003, "lr_groups": "", "max_bad_steps": 5, "progress": True, "save_frozen": True,
              "seed": 0, "steps": 300, "stop_at": 0, "trainable": ".*", "warmup_steps": 20,
              "weight_decay": 0.0}}


def test_typed_defaults_are_default_config():
    # As JSON, so that 0 for 0.0 (a ConfigDict field typed int refuses 0.1) counts too.
    as_json = lambda d: json.dumps(d, sort_keys=True)
    assert as_json(TrainRun().to_dict()) == as_json(DEFAULTS)
    assert as_json({k: v for k, v in default_config().to_dict().items() if k != "eval"}) \
        == as_json(DEFAULTS)
    run = TrainRun.from_config_dict(default_config())
    assert run == TrainRun()
    assert (run.model, run.data, run.train, run.loss, run.grounding) == (
        ModelSettings(), DataSettings(), TrainSettings(), LossConfig(), GroundingConfig())
    assert run.mesh == {"data": 1, "fsdp": -1, "tensor": 1}
    # Every field of every section made it across, with its value.
    d = default_config()
    for name in ("model", "data", "train", "loss"):
        assert dataclasses.asdict(getattr(run, name)) == d[name].to_dict(), name


def test_presets_become_typed_runs():
    run = TrainRun.from_config_dict(llava_1_5_config("llava-1.5-7b"))
    assert (run.model.dtype, run.model.frozen_dtype, run.model.remat) == \
        ("bfloat16", "bfloat16", "dots")
    assert run.train.trainable == "projector,grounding_heads" and not run.train.save_frozen
    assert run.loss.grounding_weight == 0.5 and run.data.template == "vicuna_v1"
    assert TrainRun.from_config_dict(shapes_config()).train.eval_every == 100


@pytest.mark.parametrize("text,layers", [("", None), ("none", ()), ("1,2,3", (1, 2, 3)),
                                         (" 3, 1 ", (3, 1))])
def test_grounding_layers_are_parsed_into_the_grounding_config(text, layers):
    cfg = default_config()
    cfg.model.preset = "tiny"  # 4 decoder layers
    cfg.grounding.layers = text
    cfg.grounding.type = "learned"
    cfg.grounding.dim = 16
    run = TrainRun.from_config_dict(cfg)
    assert run.grounding == GroundingConfig(layers=layers, type="learned", dim=16)
    # The model config takes the parsed heads as they are (they are not parsed again).
    config = model_config(run, tokenizer=None)
    assert config.grounding is run.grounding


@pytest.mark.parametrize("section,field,value,message", [
    ("train", "steps", 0, "config.train.steps: 0 must be positive"),
    ("train", "warmup_steps", 500, r"config.train.warmup_steps: 500 must lie in \[0, "
                                   r"train.steps=300\]"),
    ("train", "log_every", 0, "config.train.log_every: 0 must be >= 1"),
    ("train", "debug_nan_steps", "2,x", "config.train.debug_nan_steps='2,x'"),
    ("data", "max_length", 4, "config.data.max_length: 4 is too short"),
    ("loss", "grounding_loss", "hinge", "config.loss.grounding_loss: 'hinge' is not 'bce'"),
    ("loss", "grounding_weight", -1.0, "config.loss.grounding_weight: must be >= 0"),
    ("grounding", "type", "attention", "config.grounding.type: 'attention' is not one of"),
    ("grounding", "layers", "28;29", "config.grounding.layers='28;29': use ''"),
    ("model", "remat", "some", "config.model.remat: 'some' is not 'none'"),
    ("model", "preset", "llava-2", "config.model.preset: 'llava-2' is not one of"),
    ("model", "param_dtype", "fp8", "config.model.param_dtype: 'fp8' is not float32"),
    ("eval", "top_p", 0.0, r"config.eval.top_p: 0.0 must lie in \(0, 1\]"),
    ("loss", "objective", "clip", "config.loss.objective: 'clip' is not 'lm' or"),
    ("loss", "pooling", "max", "config.loss.pooling: 'max' is not 'mean' or"),
    ("loss", "temperature", 0.0, "config.loss.temperature: 0.0 must be > 0"),
])
def test_a_config_mistake_names_its_field(section, field, value, message):
    cfg = default_config()
    cfg[section][field] = value
    with pytest.raises((ConfigValueError, EvalConfigError), match=f"^{message}"):
        RunConfig.from_config_dict(cfg)


def test_the_recipe_stages_are_typed_runs_and_contrastive_has_no_heldout_eval():
    vision, align, finetune = (TrainRun.from_config_dict(recipe_config(s))
                               for s in ("vision", "align", "finetune"))
    assert vision.loss.objective == "contrastive" and "vision_tower" in vision.train.trainable
    assert align.train.trainable == "projector" and align.loss.grounding_weight == 0
    assert "vision_tower" not in finetune.train.trainable
    cfg = recipe_config("vision")
    cfg.train.eval_every = 10
    with pytest.raises(ConfigValueError, match="^config.train.eval_every: held-out"):
        TrainRun.from_config_dict(cfg)
    with pytest.raises(ValueError, match="recipe stage 'stage3'"):
        recipe_config("stage3")


def test_a_saved_config_dict_reads_back_old_fields_default_unknown_ones_named():
    saved = default_config().to_dict()
    del saved["train"]["debug_nan_steps"], saved["eval"]["heatmaps"]  # an older run's file
    assert TrainRun.from_config_dict(saved) == TrainRun()
    saved["train"]["stepz"] = 3
    with pytest.raises(ConfigValueError, match=r"^config.train.stepz: not a field"):
        TrainRun.from_config_dict(saved)
    with pytest.raises(ConfigValueError, match=r"^config.mesh: axes \['pipe'\]"):
        TrainRun(mesh={"data": 1, "pipe": 2})


def test_to_dict_is_the_config_dicts_dict_with_the_runs_current_values():
    cfg = llava_1_5_config("llava-1.5-13b")
    cfg.grounding.layers = "36, 38"
    run = TrainRun.from_config_dict(cfg)
    assert run.to_dict() == cfg.to_dict()  # train_config.json as before: eval, spelling kept
    assert TrainRun.from_config_dict(run.to_dict()) == run
    changed = dataclasses.replace(
        run, train=dataclasses.replace(run.train, steps=700),
        grounding=dataclasses.replace(run.grounding, layers=()))
    saved = changed.to_dict()
    assert saved["train"]["steps"] == 700 and saved["grounding"]["layers"] == "none"
    assert TrainRun.from_config_dict(saved) == changed
    assert TrainRun().to_dict()["grounding"]["layers"] == ""


def test_the_run_config_checks_every_section_once_at_the_edge():
    """RunConfig is the one typed tree: training's sections and the eval section, each from
    the dataclass that owns it; a mistake in eval fails before training starts."""
    cfg = shapes_config()
    run = RunConfig.from_config_dict(cfg)
    assert run.train == TrainRun.from_config_dict(cfg)
    assert run.eval == EvalSettings.from_config_dict(cfg)
    assert run.eval.label_attributes and run.train.data.label_attributes
    assert default_config().eval.to_dict() == EvalSettings().eval_dict()
    cfg.eval.top_p = 0.0
    with pytest.raises(EvalConfigError, match=r"^config\.eval\.top_p"):
        RunConfig.from_config_dict(cfg)
