"""Which parameters train: path patterns -> NNX filters."""

from __future__ import annotations

import re
from collections.abc import Sequence

from flax import nnx


def path_string(path) -> str:
    """'language_model/grounding_heads/scale' for an NNX state path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def trainable_filter(patterns: Sequence[str]):
    """Params whose path matches any regex in `patterns` (searched, not anchored).

    ("projector", "grounding_heads") trains the projector and the heads and freezes CLIP
    and the LLM; (".*",) trains everything.
    """
    compiled = [re.compile(p) for p in patterns]

    def matches(path, _value) -> bool:
        s = path_string(path)
        return any(c.search(s) for c in compiled)

    return nnx.All(nnx.Param, matches)
