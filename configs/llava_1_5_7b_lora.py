"""LLaVA-1.5-7b grounding fine-tune on one GPU: LLaVA's LoRA recipe, frozen weights in
bf16 (default), int8 or nf4 (QLoRA), picked after the colon.

  python convert/hf_to_orbax.py --hf_dir llava-1.5-7b-hf --out ckpt/llava_7b --dtype bfloat16
  python -m jaxground.train --config configs/llava_1_5_7b_lora.py:nf4 --workdir runs/7b_qlora \\
      --config.model.init_from=ckpt/llava_7b --config.data.dir=coco2014 \\
      --config.data.records=coco_train.jsonl
Every default is in `jaxground.config.llava_1_5_lora_config`.
"""

from jaxground.config import llava_1_5_lora_config


def get_config(quant: str = "none"):
    return llava_1_5_lora_config("llava-1.5-7b", quant)
