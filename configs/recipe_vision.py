"""Stage 'vision' of LLaVA-1.5's recipe at toy scale (see `jaxground.config.recipe_config`).

  python -m jaxground.train --config configs/recipe_vision.py --workdir runs/hard/vision \
      --config.data.dir=DATA/train
"""

from jaxground.config import recipe_config


def get_config():
    return recipe_config("vision")
