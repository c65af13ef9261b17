"""Model config: HF config.json round trip, presets with the real sizes."""

import math

import jax
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig
from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaForConditionalGeneration

from jaxground.models.config import GroundingConfig, LlavaConfig, llava_1_5_13b, llava_1_5_7b
from jaxground.models.llava import abstract_model, param_dict


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
