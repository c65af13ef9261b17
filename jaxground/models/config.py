"""Model configuration: plain frozen dataclasses, built from an HF `config.json` or a preset.

Config is data: the model is fully described by a `LlavaConfig`, which round-trips through
JSON (`to_dict` / `from_dict`) and through HF's `config.json` (`from_hf` / `to_hf`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A configuration value a user can get wrong; the message names the field."""


def dtype_of(name: str):
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP vision transformer (HF `CLIPVisionConfig`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaMA decoder (HF `LlamaConfig`)."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # "xla": any mask (left padding included). "cudnn": fused flash attention on NVIDIA
    # GPUs, causal only, so valid for right-padded batches (training) and unpadded rows.
    attention_impl: str = "xla"


GROUNDING_TYPES = ("similarity", "learned", "cross_attention")


@dataclasses.dataclass(frozen=True)
class GroundingConfig:
    """Grounding heads (see models/grounding.py for the score formulas)."""

    # Decoder layer indices carrying a head. None: the last four layers (28-31 for the
    # 32-layer 7B, 36-39 for 13B); (): no heads at all.
    layers: tuple[int, ...] | None = None
    type: str = "similarity"
    dim: int = 256             # grounding space of the `learned` head
    num_heads: int = 8         # attention heads of the `cross_attention` head
    aggregate: str = "mean"    # over grounded layers: "mean" | "max"
    image_features: str = "projected"  # "projected" (merged projector output) | "hidden"
    init_scale: float = 1 / 0.07       # calibration scale at init (the seed's temperature)
    init_bias: float = 0.0

    @staticmethod
    def parse_layers(text, field: str = "grounding.layers") -> tuple[int, ...] | None:
        """The user's spelling of `layers`: "" (the last four), "none", or "28,29,30,31"
        (a tuple or list of ints passes through). One parser for configs and CLIs."""
        layers = text.strip() if isinstance(text, str) else text
        if layers in ("", None):
            return None
        if layers == "none":
            return ()
        if isinstance(layers, (tuple, list)):
            return tuple(int(x) for x in layers)
        try:
            return tuple(int(x) for x in str(layers).split(","))
        except ValueError as e:
            raise ConfigError(f"{field}={text!r}: use '', 'none' or comma-separated layer "
                              "indices") from e


# The LLM's linear layers (LLaVA's LoRA recipe: every linear of the LLM; not the vision
# tower, the projector, the heads or lm_head), as a regex searched in parameter paths.
LLM_LINEARS = r"language_model/layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)$"
QUANT_MODES = ("none", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on linear layers: y = x W + (alpha / rank) * (x A) B, A [in, rank]
    random, B [rank, out] zero (so a fresh adapter leaves the model's outputs unchanged).
    Defaults are LLaVA-1.5's LoRA recipe (rank 128, alpha 256, the LLM's q/k/v/o and
    gate/up/down)."""

    enabled: bool = False
    rank: int = 128
    alpha: float = 256.0
    targets: str = LLM_LINEARS   # regex searched in each linear layer's path

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of frozen linear layers, dequantized inside the matmul.

    int8: symmetric absmax, one scale per output channel (`group_size` 0) or per group of
    `group_size` input rows; nf4: bitsandbytes' 4-bit NormalFloat codes, two per byte, one
    absmax per block of `group_size` input rows of a column (0: 64, bitsandbytes' block)."""

    mode: str = "none"           # "none" | "int8" | "nf4"
    group_size: int = 0
    targets: str = LLM_LINEARS

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def group_for(self, in_features: int) -> int:
        """Rows per scale for a kernel with `in_features` input rows."""
        if self.group_size:
            return self.group_size
        return 64 if self.mode == "nf4" else in_features


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    grounding: GroundingConfig = dataclasses.field(default_factory=GroundingConfig)
    image_token_id: int = 32000
    # HF semantics: an index into CLIP's hidden_states tuple (0 = embeddings after
    # pre_layrnorm, i = output of layer i; negative counts from the end), or a tuple of them
    # whose features are concatenated.
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    remat: str = "none"     # rematerialise layers in the backward: "none" | "full" | "dots"
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)

    def __post_init__(self):
        self.validate()

    # ---- derived quantities -------------------------------------------------------------
    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Selected CLIP hidden-state indices, made non-negative (0..num_layers)."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        n = self.vision.num_layers + 1
        return tuple(l + n if l < 0 else l for l in layers)

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image in the LLM sequence."""
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + extra

    @property
    def grounded_layers(self) -> tuple[int, ...]:
        """Sorted decoder layer indices that carry a grounding head."""
        layers = self.grounding.layers
        if layers is None:
            n = self.text.num_layers
            return tuple(range(max(0, n - 4), n))
        return tuple(sorted(layers))

    def validate(self) -> None:
        self._validate_grounding()
        n = self.vision.num_layers + 1
        for raw, l in zip(
            (self.vision_feature_layer,) if isinstance(self.vision_feature_layer, int)
            else self.vision_feature_layer, self.feature_layers):
            if not 0 <= l < n:
                raise ConfigError(
                    f"vision_feature_layer {raw} is out of range for a CLIP with "
                    f"{self.vision.num_layers} layers (valid: {-n}..{n - 1})")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} "
                "must be 'default' or 'full'")
        t = self.text
        if t.num_heads % t.num_kv_heads:
            raise ConfigError(f"text.num_heads={t.num_heads} is not a multiple of "
                              f"text.num_kv_heads={t.num_kv_heads}")
        if self.vision.hidden_size % self.vision.num_heads:
            raise ConfigError(f"vision.hidden_size={self.vision.hidden_size} is not divisible "
                              f"by vision.num_heads={self.vision.num_heads}")
        if self.vision.hidden_act != "quick_gelu":
            raise ConfigError(f"vision.hidden_act {self.vision.hidden_act!r}: only quick_gelu "
                              "(CLIP's) is implemented")
        if t.attention_impl not in ("xla", "cudnn"):
            raise ConfigError(f"text.attention_impl {t.attention_impl!r}: use 'xla' or 'cudnn'")
        if t.hidden_act != "silu":
            raise ConfigError(f"text.hidden_act {t.hidden_act!r}: only silu is implemented")
        if self.projector_hidden_act != "gelu":
            raise ConfigError(f"projector_hidden_act {self.projector_hidden_act!r}: only gelu "
                              "is implemented")
        dtype_of(self.param_dtype)
        dtype_of(self.dtype)
        if self.remat not in ("none", "full", "dots"):
            raise ConfigError(f"remat {self.remat!r} is not 'none', 'full' or 'dots'")
        self._validate_adapters()

    def _validate_adapters(self) -> None:
        lora, quant = self.lora, self.quant
        if lora.enabled and lora.rank <= 0:
            raise ConfigError(f"lora.rank={lora.rank} must be positive")
        if lora.enabled and lora.alpha <= 0:
            raise ConfigError(f"lora.alpha={lora.alpha} must be positive")
        if quant.mode not in QUANT_MODES:
            raise ConfigError(f"quant.mode {quant.mode!r} is not one of {list(QUANT_MODES)}")
        if quant.group_size < 0 or (quant.mode == "nf4" and quant.group_size % 2):
            raise ConfigError(f"quant.group_size={quant.group_size} must be 0 (the mode's "
                              "default) or positive (and even for nf4)")

    @property
    def base(self) -> "LlavaConfig":
        """This model without adapters or quantization: the layout of the weights a LoRA /
        quantized model is built from (a converted dir, a base run)."""
        return self.replace(lora=LoraConfig(), quant=QuantConfig())

    def _validate_grounding(self) -> None:
        g, n = self.grounding, self.text.num_layers
        if g.layers is not None:
            bad = [l for l in g.layers if not (isinstance(l, int) and 0 <= l < n)]
            if bad:
                raise ConfigError(f"grounding.layers {list(g.layers)}: {bad} out of range for a "
                                  f"decoder with {n} layers (valid: 0..{n - 1})")
            dup = sorted({l for l in g.layers if list(g.layers).count(l) > 1})
            if dup:
                raise ConfigError(f"grounding.layers {list(g.layers)}: {dup} listed twice")
        for field, value, allowed in (("type", g.type, GROUNDING_TYPES),
                                      ("aggregate", g.aggregate, ("mean", "max")),
                                      ("image_features", g.image_features,
                                       ("projected", "hidden"))):
            if value not in allowed:
                raise ConfigError(f"grounding.{field} {value!r} is not one of {list(allowed)}")
        if g.type == "cross_attention" and self.text.hidden_size % g.num_heads:
            raise ConfigError(f"grounding.num_heads={g.num_heads} must divide "
                              f"text.hidden_size={self.text.hidden_size}")
        if g.type == "learned" and g.dim <= 0:
            raise ConfigError(f"grounding.dim={g.dim} must be positive")

    def replace(self, **changes) -> "LlavaConfig":
        return dataclasses.replace(self, **changes)

    # ---- JSON (our own format) --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.vision_feature_layer, tuple):
            d["vision_feature_layer"] = list(self.vision_feature_layer)
        if self.grounding.layers is not None:
            d["grounding"]["layers"] = list(self.grounding.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlavaConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields {unknown}; known: {sorted(known)}")
        vision = _sub(VisionConfig, d.pop("vision", {}), "vision")
        text = _sub(TextConfig, d.pop("text", {}), "text")
        grounding = dict(d.pop("grounding", {}))
        if isinstance(grounding.get("layers"), list):
            grounding["layers"] = tuple(grounding["layers"])
        grounding = _sub(GroundingConfig, grounding, "grounding")
        if isinstance(d.get("vision_feature_layer"), list):
            d["vision_feature_layer"] = tuple(d["vision_feature_layer"])
        lora = _sub(LoraConfig, d.pop("lora", {}), "lora")
        quant = _sub(QuantConfig, d.pop("quant", {}), "quant")
        return cls(vision=vision, text=text, grounding=grounding, lora=lora, quant=quant, **d)

    # ---- HF config.json -----------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "LlavaConfig":
        """Builds our config from the dict of an HF LLaVA `config.json`."""
        if hf.get("model_type") not in (None, "llava"):
            raise ConfigError(f"config.json has model_type {hf.get('model_type')!r}; "
                              "expected 'llava'")
        v, t = hf.get("vision_config", {}) or {}, hf.get("text_config", {}) or {}
        vision = VisionConfig(
            hidden_size=v.get("hidden_size", 1024),
            intermediate_size=v.get("intermediate_size", 4096),
            num_layers=v.get("num_hidden_layers", 24),
            num_heads=v.get("num_attention_heads", 16),
            image_size=v.get("image_size", 336),
            patch_size=v.get("patch_size", 14),
            num_channels=v.get("num_channels", 3),
            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
            hidden_act=v.get("hidden_act", "quick_gelu"),
        )
        num_heads = t.get("num_attention_heads", 32)
        hidden = t.get("hidden_size", 4096)
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"text_config rope type {rope_type!r}: only 'default' RoPE "
                              "(LLaVA-1.5's) is implemented")
        text = TextConfig(
            vocab_size=t.get("vocab_size", 32000),
            hidden_size=hidden,
            intermediate_size=t.get("intermediate_size", 11008),
            num_layers=t.get("num_hidden_layers", 32),
            num_heads=num_heads,
            num_kv_heads=t.get("num_key_value_heads") or num_heads,
            head_dim=t.get("head_dim") or hidden // num_heads,
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", t.get("rope_theta", 10000.0)),
            max_position_embeddings=t.get("max_position_embeddings", 4096),
            attention_bias=t.get("attention_bias", False),
            mlp_bias=t.get("mlp_bias", False),
            hidden_act=t.get("hidden_act", "silu"),
        )
        layer = hf.get("vision_feature_layer", -2)
        kwargs = dict(
            vision=vision,
            text=text,
            image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)),
            vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
            projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
            projector_bias=hf.get("multimodal_projector_bias", True),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)
                                     or t.get("tie_word_embeddings", False)),
            pad_token_id=hf.get("pad_token_id", t.get("pad_token_id")),
            bos_token_id=t.get("bos_token_id", 1),
            eos_token_id=_first(t.get("eos_token_id", 2)),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The dict of an HF LLaVA `config.json` describing this model."""
        v, t = self.vision, self.text
        layer = self.vision_feature_layer
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": self.image_token_id,
            "image_seq_length": self.image_seq_length,
            "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.projector_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.num_channels,
                "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": v.hidden_act,
            },
            "text_config": {
                "model_type": "llama",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads,
                "head_dim": t.head_dim,
                "rms_norm_eps": t.rms_norm_eps,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
                "rope_theta": t.rope_theta,
                "max_position_embeddings": t.max_position_embeddings,
                "attention_bias": t.attention_bias,
                "mlp_bias": t.mlp_bias,
                "hidden_act": t.hidden_act,
                "tie_word_embeddings": self.tie_word_embeddings,
                "pad_token_id": self.pad_token_id,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
            },
        }


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def _sub(cls, d: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown model config fields {where}.{unknown}; known: {sorted(known)}")
    return cls(**d)


# ---- presets --------------------------------------------------------------------------------
def llava_1_5_7b() -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + Vicuna-7B (32 layers x 4096)."""
    return LlavaConfig(
        vision=VisionConfig(),
        text=TextConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                        rms_norm_eps=1e-5, max_position_embeddings=4096),
        image_token_id=32000, pad_token_id=32001)


def llava_1_5_13b() -> LlavaConfig:
    """llava-hf/llava-1.5-13b-hf: CLIP ViT-L/14-336 + Vicuna-13B (40 layers x 5120)."""
    return LlavaConfig(
        vision=VisionConfig(),
        text=TextConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824,
                        num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                        rms_norm_eps=1e-5, max_position_embeddings=4096),
        image_token_id=32000, pad_token_id=32001)


def tiny(vocab_size: int = 128) -> LlavaConfig:
    """A few-MB model for tests and the shapes world."""
    return LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                            image_size=28, patch_size=7),
        text=TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                        rms_norm_eps=1e-6, max_position_embeddings=512),
        image_token_id=vocab_size - 1, pad_token_id=0)


def mid() -> LlavaConfig:
    """The benchmark config (bench/cpu_vs_hf.py): CLIP 6x384 at 224px/14, LLaMA 8x512."""
    return LlavaConfig(
        vision=VisionConfig(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=6,
                            image_size=224, patch_size=14),
        text=TextConfig(vocab_size=32064, hidden_size=512, intermediate_size=1376,
                        num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64,
                        rms_norm_eps=1e-5, max_position_embeddings=1024),
        image_token_id=32000, pad_token_id=32001)


def shapes(vocab_size: int = 64, image_token_id: int = 4) -> LlavaConfig:
    """The shapes-world model: 64 px images (64 patches), a 4-layer 128-wide decoder."""
    vocab = -(-vocab_size // 64) * 64  # round up: friendlier shapes, room for new tokens
    return LlavaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            image_size=64, patch_size=8),
        text=TextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                        rms_norm_eps=1e-6, max_position_embeddings=256),
        image_token_id=image_token_id, pad_token_id=0, bos_token_id=2, eos_token_id=3)


PRESETS = {"llava-1.5-7b": llava_1_5_7b, "llava-1.5-13b": llava_1_5_13b, "tiny": tiny,
           "mid": mid, "shapes": shapes}
