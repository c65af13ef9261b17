"""LLaVA-1.5-13b with grounding heads, from a converted checkpoint (real sizes).

  python convert/hf_to_orbax.py --hf_dir llava-1.5-13b-hf --out ckpt/llava_13b
  python -m jaxground.train --config configs/llava_1_5_13b.py --workdir runs/13b \\
      --config.model.init_from=ckpt/llava_13b --config.data.dir=coco2014 \\
      --config.data.records=coco_train.jsonl
Default trainable set: projector + grounding heads (add the LLM with
--config.train.trainable='projector,grounding_heads,language_model'). Every other
default is in `jaxground.config.llava_1_5_config`.
"""

from jaxground.config import llava_1_5_config


def get_config():
    return llava_1_5_config("llava-1.5-13b")
