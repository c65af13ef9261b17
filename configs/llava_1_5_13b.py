"""LLaVA-1.5-13b with grounding heads, from a converted checkpoint (real sizes).

  python convert/hf_to_orbax.py --hf_dir llava-1.5-13b-hf --out ckpt/llava_13b
  python -m jaxground.train --config configs/llava_1_5_13b.py --workdir runs/13b \
      --config.model.init_from=ckpt/llava_13b --config.data.dir=coco2014 \
      --config.data.records=coco_train.jsonl
Default trainable set: projector + grounding heads (add the LLM with
--config.train.trainable='projector,grounding_heads,language_model').
"""

from jaxground.training.config import default_config


def get_config():
    c = default_config()
    c.model.preset = "llava-1.5-13b"
    c.model.dtype = "bfloat16"          # compute
    c.model.param_dtype = "float32"     # master copies of what trains
    c.model.frozen_dtype = "bfloat16"   # the frozen CLIP + LLM stay bf16
    c.model.remat = "dots"
    c.grounding.layers = ""             # the last four decoder layers
    c.grounding.type = "similarity"
    c.loss.grounding_weight = 0.5
    c.data.template = "hf"
    c.data.pad_to_square = True         # LLaVA-1.5's image_aspect_ratio="pad"
    c.data.groups_per_batch = 64
    c.data.max_length = 768             # 576 image tokens + prompt + caption
    c.data.workers = 8
    c.train.steps = 5000
    c.train.lr = 2e-5
    c.train.warmup_steps = 150
    c.train.weight_decay = 0.0
    c.train.trainable = "projector,grounding_heads"
    c.train.save_frozen = False         # frozen weights come back from init_from
    c.train.checkpoint_every = 500
    c.train.progress = True
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
