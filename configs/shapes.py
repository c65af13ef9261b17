"""The embedded default: a tiny LLaVA trained from scratch on the synthetic shapes world.

  python -m jaxground.train --config configs/shapes.py --workdir runs/shapes
Trains in a few minutes on 2 CPU cores; the world is generated into WORKDIR/data on the
first run unless --config.data.dir points at one.
"""

from jaxground.training.config import default_config


def get_config():
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
