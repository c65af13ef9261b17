"""Tiny random HF LLaVA checkpoints for parity tests: built, perturbed, saved locally."""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from jaxground.checkpoints.hf_weights import canonical_key
from jaxground.checkpoints.safetensors_io import SafetensorsFile, write_safetensors

IMAGE_TOKEN = 250
VOCAB = 256

# name -> (LlavaConfig kwargs, vision kwargs, text kwargs)
VARIANTS = {
    # MHA, layer -2, drop CLS: llava-1.5's own choices.
    "mha": (dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
            dict(), dict(num_attention_heads=4, num_key_value_heads=4)),
    # GQA, a list of vision layers concatenated, CLS kept, tied lm_head, no projector bias.
    "gqa_multi_full": (dict(vision_feature_layer=[-3, -1], vision_feature_select_strategy="full",
                            multimodal_projector_bias=False, tie_word_embeddings=True),
                       dict(), dict(num_attention_heads=4, num_key_value_heads=2,
                                    tie_word_embeddings=True)),
    # Attention biases and a non-default rope theta.
    "bias_theta": (dict(vision_feature_layer=-1), dict(),
                   dict(num_attention_heads=4, num_key_value_heads=1, attention_bias=True,
                        rope_theta=500.0)),
}


def hf_config(variant: str, **text_overrides) -> LlavaConfig:
    top, vision, text = VARIANTS[variant]
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, image_size=28, patch_size=7, **vision)
    text = dict(text)
    theta = text.pop("rope_theta", 10000.0)
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=56,
                     num_hidden_layers=3, max_position_embeddings=256, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": theta},
                     **{**text, **text_overrides})
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, **top)


def build_hf(variant: str, seed: int = 0, init_scale: float = 1.0) -> LlavaForConditionalGeneration:
    """A random model whose every parameter matters: norm weights/biases moved off 1/0."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config(variant)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            elif init_scale != 1.0:
                p.mul_(init_scale)
    return model


def save_hf(model, out_dir: str) -> str:
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def num_image_tokens(model) -> int:
    cfg = model.config
    patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    return patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)


def batch(model, seed: int = 0):
    """3 left-padded rows of different lengths; text before and after the image tokens."""
    rng = np.random.RandomState(seed)
    p = num_image_tokens(model)
    rows = []
    for before, after in ((3, 9), (1, 4), (5, 1)):
        rows.append(list(rng.randint(3, 200, before)) + [IMAGE_TOKEN] * p +
                    list(rng.randint(3, 200, after)))
    t = max(map(len, rows))
    ids = np.zeros((3, t), np.int64)
    mask = np.zeros((3, t), np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    size = model.config.vision_config.image_size
    px = rng.randn(3, 3, size, size).astype(np.float32)
    return ids, mask, px


def hf_logits(model, ids, mask, px) -> np.ndarray:
    """HF reference with explicit positions = cumsum(mask) - 1 (left padding)."""
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    pixel_values=torch.tensor(px), position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


# ---- key layouts seen in the wild ---------------------------------------------------------
LAYOUTS = {
    "hub": {"text": "language_model.model.", "lm_head": "language_model.lm_head.",
            "vision": "vision_tower.vision_model.", "projector": "multi_modal_projector."},
    "tf4_52": {"text": "model.language_model.", "lm_head": "lm_head.",
               "vision": "model.vision_tower.vision_model.",
               "projector": "model.multi_modal_projector."},
    "tf5_6": {"text": "model.language_model.", "lm_head": "lm_head.",
              "vision": "model.vision_tower.", "projector": "model.multi_modal_projector."},
    "tf5_2x_save": {"text": "language_model.model.", "lm_head": "language_model.lm_head.",
                    "vision": "vision_tower.", "projector": "multi_modal_projector."},
}


def read_all(hf_dir: str) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            st = SafetensorsFile(os.path.join(hf_dir, name))
            out.update({k: st.read(k) for k in st.keys()})
    return out


def rewrite_layout(src_dir: str, dst_dir: str, layout: str, shards: int = 1,
                   edit=None) -> str:
    """Copies an HF dir with its tensors renamed into `layout`, split into `shards` files.

    `edit(dict) -> dict` may add, drop or reshape tensors (bad-input tests).
    """
    os.makedirs(dst_dir, exist_ok=True)
    for name in os.listdir(src_dir):
        if not name.endswith(".safetensors") and not name.endswith("index.json"):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    prefixes = LAYOUTS[layout]
    tensors = {}
    for key, value in read_all(src_dir).items():
        canon = canonical_key(key)
        head, _, rest = canon.partition(".")
        tensors[prefixes[head] + rest] = value
    if edit is not None:
        tensors = edit(tensors)
    items = sorted(tensors.items())
    if shards == 1:
        write_safetensors(os.path.join(dst_dir, "model.safetensors"), items)
        return dst_dir
    import json
    weight_map = {}
    per = -(-len(items) // shards)
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = items[i * per:(i + 1) * per]
        write_safetensors(os.path.join(dst_dir, fname), chunk)
        weight_map.update({k: fname for k, _ in chunk})
    with open(os.path.join(dst_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return dst_dir


def fit_briefly(model, ids, mask, px, steps: int = 80, lr: float = 3e-3):
    """A few AdamW steps of next-token prediction on one batch, so the output distribution
    is peaked like a trained model's (random models put near-ties everywhere)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    labels = torch.tensor(np.where(mask.astype(bool), ids, -100))
    pos = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     pixel_values=torch.tensor(px), position_ids=pos, labels=labels).loss
        loss.backward()
        opt.step()
    return model.eval(), float(loss.detach())


def make_processor(model):
    """A LlavaProcessor with a WordLevel tokenizer built locally by `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + ("user assistant what is in the image a red "
                                                 "square blue circle : ? . \n").split(" ")
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB) if i != IMAGE_TOKEN})
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("<image>", "isolated"), pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vc = model.config.vision_config
    image_processor = CLIPImageProcessor(size={"shortest_edge": vc.image_size},
                                         crop_size={"height": vc.image_size,
                                                    "width": vc.image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=fast,
                          patch_size=vc.patch_size, image_token="<image>",
                          vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                          num_additional_image_tokens=1)
