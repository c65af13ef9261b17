"""Stage 'finetune' of LLaVA-1.5's recipe at toy scale (see `jaxground.config.recipe_config`).

  python -m jaxground.train --config configs/recipe_finetune.py --workdir runs/hard/finetune \
      --config.data.dir=DATA/train --config.model.init_from=runs/hard/align
"""

from jaxground.config import recipe_config


def get_config():
    return recipe_config("finetune")
