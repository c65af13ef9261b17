"""The HF processor (tokenizer + CLIP image processor) saved beside a checkpoint's weights."""

from __future__ import annotations

import os

from jaxground.checkpoints.converted import read_config


def load_processor(path: str):
    """The HF LLaVA processor (tokenizer + CLIP image processor) saved next to the weights."""
    from transformers import AutoProcessor, AutoTokenizer, LlavaProcessor

    from jaxground.data.processor import TOKENIZER_FILES, clip_image_processor

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint dir {path} does not exist")
    has_tokenizer = any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES)
    if not has_tokenizer:
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json / tokenizer.model) in "
                                f"{path}; convert from an HF dir that has them")
    if os.path.exists(os.path.join(path, "processor_config.json")):
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    config = read_config(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = clip_image_processor(config.vision.image_size, path)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=config.vision.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=1)
