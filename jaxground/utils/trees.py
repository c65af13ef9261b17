"""Parameter-tree paths: one spelling ("language_model/layers/q_proj/kernel") everywhere."""

from __future__ import annotations

from typing import Any

import jax


def path_string(path) -> str:
    """'language_model/grounding_heads/scale' for a JAX/NNX key path. An NNX Variable's own
    `.value` step (the last one in a State's paths) is left out: a parameter's path is the
    same in a State, its optimizer moments and a pure dict."""
    return "/".join(str(getattr(k, "key", k)) for k in path
                    if getattr(k, "name", None) != "value")


def leaves_by_path(tree) -> dict[str, Any]:
    """{path string: leaf} of a pytree."""
    return {path_string(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def flatten(nested: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{("a", "b"): leaf} of a nested dict."""
    out: dict[tuple[str, ...], Any] = {}
    for k, v in nested.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """The nested dict of `flatten`'s output."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        node = nested
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return nested


def merge(base: dict, update: dict) -> dict:
    """`base` with `update`'s leaves written over it (nested dicts merged, not replaced)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out
