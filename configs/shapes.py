"""The embedded default: a tiny LLaVA trained from scratch on the synthetic shapes world.

  python -m jaxground.train --config configs/shapes.py --workdir runs/shapes
Trains in a few minutes on 2 CPU cores; the world is generated into WORKDIR/data on the
first run unless --config.data.dir points at one. Every default is in
`jaxground.config.shapes_config` (the demo starts from it too).
"""

from jaxground.config import shapes_config


def get_config():
    return shapes_config()
