"""Pure NNX modules: CLIP, LLaMA, LLaVA (and grounding heads). No I/O here."""

from jaxground.models.config import ConfigError, LlavaConfig, TextConfig, VisionConfig
from jaxground.models.llava import LlavaModel, LlavaOutput, abstract_model, init_model

__all__ = ["ConfigError", "LlavaConfig", "TextConfig", "VisionConfig", "LlavaModel",
           "LlavaOutput", "abstract_model", "init_model"]
