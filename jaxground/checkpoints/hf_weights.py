"""HF LLaVA state dict <-> our NNX parameter tree: one table, both directions.

HF has shipped LLaVA under four key layouts (Hub llava-hf repos, transformers 4.52-5.5,
>= 5.6 state dicts, 5.2x `save_pretrained`). They differ only in prefixes, so keys are first
normalised to one canonical form (`vision.*`, `projector.*`, `text.*`, `lm_head.*`) and a
single table maps canonical modules to NNX modules. Decoder/encoder layers are stacked on a
leading [L] axis in NNX; HF keys carry the layer index instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

# ---- prefix normalisation -------------------------------------------------------------------
_PREFIXES = [
    (re.compile(r"^(model\.)?language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^(model\.)?language_model\.(model\.)?"), "text."),
    (re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?"), "vision."),
    (re.compile(r"^(model\.)?multi_modal_projector\."), "projector."),
    (re.compile(r"^lm_head\."), "lm_head."),
]
# Buffers some writers saved; they carry no parameters.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")


def canonical_key(hf_key: str) -> str | None:
    """Canonical key, `None` for known non-parameter buffers, or the key unchanged when no
    prefix matched (it is then reported as unexpected)."""
    if _IGNORED.search(hf_key):
        return None
    for pattern, repl in _PREFIXES:
        if pattern.match(hf_key):
            return pattern.sub(repl, hf_key, count=1)
    return hf_key


# ---- leaf transforms (HF torch layout -> NNX layout, and back) ----------------------------------
def _transpose(a):  # torch Linear [out, in] <-> flax [in, out]
    return a.T


def _conv_to_nnx(a):  # torch Conv2d [O, I, kh, kw] -> flax [kh, kw, I, O]
    return a.transpose(2, 3, 1, 0)


def _conv_to_hf(a):
    return a.transpose(3, 2, 0, 1)


def _same(a):
    return a


# kind -> {hf leaf: (nnx leaf, to_nnx, to_hf)}
_LEAVES: dict[str, dict[str, tuple[str, Callable, Callable]]] = {
    "linear": {"weight": ("kernel", _transpose, _transpose), "bias": ("bias", _same, _same)},
    "norm": {"weight": ("scale", _same, _same), "bias": ("bias", _same, _same)},
    "embed": {"weight": ("embedding", _same, _same)},
    "conv": {"weight": ("kernel", _conv_to_nnx, _conv_to_hf)},
    "param": {"class_embedding": ("class_embedding", _same, _same)},
}

# (canonical HF module, NNX module, kind). `{L}` is the layer index (the NNX [L] axis);
# `{m}` a sub-module name that is the same on both sides.
_MODULES = [
    ("vision.embeddings.patch_embedding", "vision_tower.patch_embed", "conv"),
    ("vision.embeddings.position_embedding", "vision_tower.position_embedding", "embed"),
    ("vision.embeddings", "vision_tower", "param"),
    ("vision.pre_layrnorm", "vision_tower.pre_layernorm", "norm"),
    ("vision.post_layernorm", "vision_tower.post_layernorm", "norm"),
    ("vision.encoder.layers.{L}.self_attn.{m}", "vision_tower.layers.self_attn.{m}", "linear"),
    ("vision.encoder.layers.{L}.{m}", "vision_tower.layers.{m}", "norm"),
    ("vision.encoder.layers.{L}.mlp.{m}", "vision_tower.layers.mlp.{m}", "linear"),
    ("projector.{m}", "projector.{m}", "linear"),
    ("text.embed_tokens", "language_model.embed_tokens", "embed"),
    ("text.layers.{L}.self_attn.{m}", "language_model.layers.self_attn.{m}", "linear"),
    ("text.layers.{L}.mlp.{m}", "language_model.layers.mlp.{m}", "linear"),
    ("text.layers.{L}.{m}", "language_model.layers.{m}", "norm"),
    ("text.norm", "language_model.norm", "norm"),
    ("lm_head", "lm_head", "linear"),
]


def _compile(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{m\}", r"(?P<m>\w+)")
    return re.compile(rx + r"\.(?P<leaf>\w+)")


_RULES = [(_compile(hf), _compile(nnx), hf, nnx, kind) for hf, nnx, kind in _MODULES]


@dataclass(frozen=True)
class Target:
    path: tuple[str, ...]        # NNX parameter path
    layer: int | None            # index on the stacked [L] axis, None if not stacked
    to_nnx: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    def hf_shape(self, nnx_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF-layout shape of a tensor whose NNX shape is `nnx_shape`."""
        return tuple(self.to_hf(np.empty(nnx_shape, np.uint8)).shape)


def nnx_target(canonical: str) -> Target | None:
    """Where a canonical HF tensor goes in the NNX tree (None if no rule applies)."""
    for hf_rx, _, _, nnx_t, kind in _RULES:
        m = hf_rx.fullmatch(canonical)
        if m and m["leaf"] in _LEAVES[kind]:
            leaf, to_nnx, to_hf = _LEAVES[kind][m["leaf"]]
            g = m.groupdict()
            module = nnx_t.replace("{m}", g.get("m") or "")
            return Target(tuple(module.split(".")) + (leaf,),
                          int(g["L"]) if g.get("L") is not None else None, to_nnx, to_hf)
    return None


def hf_tensors(flat_params: dict[tuple[str, ...], np.ndarray],
               prefix_of: Callable[[str], str]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, torch-layout array) for every parameter; stacked ones yield one per layer.

    `prefix_of(canonical_key)` turns a canonical key into the written layout's key.
    """
    for path, value in flat_params.items():
        dotted = ".".join(path)
        for _, nnx_rx, hf_t, _, kind in _RULES:
            m = nnx_rx.fullmatch(dotted)
            if not m:
                continue
            hf_leaf = next((h for h, (n, _, _) in _LEAVES[kind].items() if n == m["leaf"]), None)
            if hf_leaf is None:
                continue
            to_hf = _LEAVES[kind][hf_leaf][2]
            module = hf_t.replace("{m}", m.groupdict().get("m") or "")
            if "{L}" in module:
                for layer in range(value.shape[0]):
                    yield prefix_of(f"{module.replace('{L}', str(layer))}.{hf_leaf}"), \
                        to_hf(value[layer])
            else:
                yield prefix_of(f"{module}.{hf_leaf}"), to_hf(value)
            break
        else:
            raise KeyError(f"parameter {dotted} has no HF name (is it a jaxground-only "
                           "parameter, such as a grounding head?)")


def hub_layout(canonical: str) -> str:
    """Canonical key -> the llava-hf Hub layout, which every transformers version loads."""
    head, _, rest = canonical.partition(".")
    return {"text": "language_model.model.", "vision": "vision_tower.vision_model.",
            "projector": "multi_modal_projector.", "lm_head": "language_model.lm_head."}[head] + rest
