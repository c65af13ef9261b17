"""Inference: cached generation with grounding per token, teacher-forced scoring."""

from jaxground.inference.generate import Generation, generate
from jaxground.inference.score import Scores, score

__all__ = ["Generation", "Scores", "generate", "score"]
