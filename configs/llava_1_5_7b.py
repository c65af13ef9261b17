"""LLaVA-1.5-7b with grounding heads, from a converted checkpoint (real sizes).

  python convert/hf_to_orbax.py --hf_dir llava-1.5-7b-hf --out ckpt/llava_7b
  python -m jaxground.train --config configs/llava_1_5_7b.py --workdir runs/7b \\
      --config.model.init_from=ckpt/llava_7b --config.data.dir=coco2014 \\
      --config.data.records=coco_train.jsonl
Default trainable set: projector + grounding heads (add the LLM with
--config.train.trainable='projector,grounding_heads,language_model'). Every other
default is in `jaxground.config.llava_1_5_config`.
"""

from jaxground.config import llava_1_5_config


def get_config():
    return llava_1_5_config("llava-1.5-7b")
