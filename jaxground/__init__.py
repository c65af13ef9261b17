"""jaxground: LLaVA-1.5 in JAX/Flax NNX with grounding heads native in the decoder."""

from jaxground.models import LlavaConfig, LlavaModel, LlavaOutput
from jaxground.inference import generate, score
from jaxground.checkpoints import load, load_processor, restore_model

__all__ = ["LlavaConfig", "LlavaModel", "LlavaOutput", "generate", "load", "load_processor",
           "restore_model", "score"]
