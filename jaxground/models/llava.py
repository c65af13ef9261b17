"""LLaVA-1.5: CLIP vision tower -> projector -> LLaMA, in Flax NNX. No I/O."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxground.models.clip import ClipVisionModel
from jaxground.models.config import LlavaConfig, dtype_of
from jaxground.models.cache import KVCache
from jaxground.models.grounding import (DecodeGrounding, aggregate, grounding_inputs,
                                        make_grounding_heads)
from jaxground.models.llama import LlamaModel, positions_from_mask
from jaxground.models.adapters import attach_lora, quantize_linears
from jaxground.models.ops import Linear, model_jit, shard_rows


@struct.dataclass
class LlavaOutput:
    logits: jax.Array                      # [B, T, V]
    image_mask: jax.Array                  # [B, T] bool: positions holding image features
    grounding_scores: dict[int, jax.Array] = struct.field(default_factory=dict)  # {l: [B, T]}
    grounding_mask: jax.Array | None = None  # [B, T] bool
    grounding: jax.Array | None = None       # [B, T]
    grounding_patches: jax.Array | None = None  # [B, T, K] per-patch scores, mean over
                                                # grounded layers (only when asked for)


class Projector(nnx.Module):
    """linear_1 -> exact GELU -> linear_2 (HF LlavaMultiModalProjector)."""

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.projector_bias, dtype=dtype_of(cfg.dtype),
                  param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)
        d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
        self.linear_1 = Linear(d_in, cfg.text.hidden_size, **kw)
        self.linear_2 = Linear(cfg.text.hidden_size, cfg.text.hidden_size, **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


def merge_image_features(embeds_btd, image_mask_bt, features_npd):
    """Writes image features into the image-token positions, in order (HF masked_scatter).

    The k-th image token of the flattened batch receives the k-th row of the flattened
    features, so image tokens may sit anywhere (LLaVA's prompt puts text before them).
    With one image per row (N = B) the count restarts in every row instead, which is the
    same for rows that each hold their image's P tokens and keeps later rows aligned when a
    row holds none (a text-only conversation in a training batch; HF refuses that batch).
    Static shapes: a cumsum gives each image position its feature row.
    """
    b, t, d = embeds_btd.shape
    features_npd = features_npd.astype(embeds_btd.dtype)
    if features_npd.shape[0] == b:
        slot_bt = jnp.clip(jnp.cumsum(image_mask_bt, axis=1) - 1, 0, features_npd.shape[1] - 1)
        gathered = jnp.take_along_axis(features_npd, slot_bt[..., None], axis=1)
    else:
        flat_features = features_npd.reshape(-1, d)
        flat_mask = image_mask_bt.reshape(-1)
        row = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, flat_features.shape[0] - 1)
        gathered = flat_features[row].reshape(b, t, d)
    return jnp.where(image_mask_bt[..., None], gathered, embeds_btd)


def check_image_tokens(input_ids, pixel_values, cfg: LlavaConfig) -> None:
    """Eager check (needs concrete ids): image tokens must match images x tokens per image."""
    n_tokens = int(np.sum(np.asarray(input_ids) == cfg.image_token_id))
    n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
    expected = n_images * cfg.image_seq_length
    if n_tokens != expected:
        raise ValueError(
            f"input_ids hold {n_tokens} image tokens (id {cfg.image_token_id}) but "
            f"{n_images} image(s) x {cfg.image_seq_length} tokens per image = {expected} "
            "were expected; expand '<image>' with the processor")


def check_padding_supported(cfg: LlavaConfig, mask) -> None:
    """cuDNN's fused attention here is causal-only: padded rows would attend to padding."""
    if cfg.text.attention_impl == "cudnn" and mask is not None and np.min(mask) == 0:
        raise ValueError("text.attention_impl='cudnn' ignores padding; use 'xla' for padded "
                         "batches (rows of different lengths)")


class LlavaModel(nnx.Module):
    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision_tower = ClipVisionModel(config.vision, config.dtype, config.param_dtype,
                                            rngs=rngs, remat=config.remat)
        self.projector = Projector(config, rngs=rngs)
        self.language_model = LlamaModel(config.text, config.dtype, config.param_dtype,
                                         rngs=rngs, grounding=config.grounding,
                                         grounded_layers=config.grounded_layers,
                                         remat=config.remat)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size,
                                      use_bias=False, dtype=dtype_of(config.dtype),
                                      param_dtype=dtype_of(config.param_dtype),
                                      preferred_element_type=jnp.float32, rngs=rngs)
        if config.lora.enabled:  # adapters before quantization: they are sized by the kernels
            attach_lora(self, config.lora, rngs)
        if config.quant.enabled:
            quantize_linears(self, config.quant)

    # ---- pieces -----------------------------------------------------------------------------
    def vision_hidden_states(self, pixel_values_nchw) -> jax.Array:
        """Selected CLIP features [N, P, Dv * num_feature_layers] (CLS dropped for 'default')."""
        selected = self.vision_tower(pixel_values_nchw, self.config.feature_layers)
        if self.config.vision_feature_select_strategy == "default":
            selected = [h[:, 1:] for h in selected]
        return jnp.concatenate(selected, axis=-1)

    def image_features(self, pixel_values_nchw) -> jax.Array:
        """Projected image features [N, P, D] as merged into the LLM sequence."""
        return self.projector(self.vision_hidden_states(pixel_values_nchw))

    def logits(self, hidden_btd) -> jax.Array:
        """[B, T, V] in fp32 whatever the compute dtype: the matmul accumulates in fp32
        anyway, and a bf16 copy would be one more [B, T, V] buffer."""
        hidden_btd = shard_rows(hidden_btd)
        if self.config.tie_word_embeddings:
            return shard_rows(self.language_model.embed_tokens.attend(hidden_btd))
        return shard_rows(self.lm_head(hidden_btd))

    # ---- forward ----------------------------------------------------------------------------
    def __call__(self, input_ids, pixel_values=None, attention_mask=None,
                 position_ids=None) -> LlavaOutput:
        """input_ids [B, T] (left-padded), pixel_values [N, C, H, W] (HF NCHW),
        attention_mask [B, T] (1 = token), position_ids [B, T] (default: from the mask)."""
        if not isinstance(input_ids, jax.core.Tracer):
            # Called eagerly: validate with concrete values, then run compiled.
            check_image_tokens(input_ids, pixel_values, self.config)
            check_padding_supported(self.config, attention_mask)
            return _forward_jit(self, jnp.asarray(input_ids),
                                None if pixel_values is None else jnp.asarray(pixel_values),
                                None if attention_mask is None else jnp.asarray(attention_mask),
                                None if position_ids is None else jnp.asarray(position_ids))
        return self.forward(input_ids, pixel_values, attention_mask, position_ids)

    def forward(self, input_ids, pixel_values=None, attention_mask=None,
                position_ids=None, patches: bool = False,
                rows_per_image: int = 1) -> LlavaOutput:
        """Traceable forward; `__call__` routes eager calls here through `model_jit`.
        `patches` adds `grounding_patches` (heatmaps). `rows_per_image` (static): image i
        serves rows [i*r, (i+1)*r) (training pairs share their image: CLIP encodes it
        once)."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        embeds_btd, image_mask_bt, ground = self.embed(input_ids, pixel_values, attention_mask,
                                                       rows_per_image)
        dec = self.language_model(embeds_btd, attention_mask, position_ids, ground,
                                  return_patches=patches)
        out = LlavaOutput(logits=self.logits(dec.hidden), image_mask=image_mask_bt)
        if dec.scores_gbt is None:
            return out
        return out.replace(grounding_scores=self.per_layer(dec.scores_gbt),
                           grounding_mask=ground.text_mask_bt,
                           grounding=aggregate(dec.scores_gbt, self.config.grounding.aggregate),
                           grounding_patches=(None if dec.patches_gbtk is None
                                              else jnp.mean(dec.patches_gbtk, axis=0)))

    def embed(self, input_ids, pixel_values, attention_mask, rows_per_image: int = 1):
        """Token embeddings with the projected image features merged in [B, T, D], the image
        mask [B, T], and the grounding inputs (None without images or heads)."""
        cfg = self.config
        image_mask_bt = input_ids == cfg.image_token_id
        # Image-token ids may lie outside the vocabulary; they are overwritten below anyway.
        safe_ids = jnp.where(image_mask_bt, 0, input_ids)
        embeds_btd = self.language_model.embed_tokens(safe_ids)
        ground = None
        if pixel_values is not None:
            features_npd = self.image_features(pixel_values)
            if rows_per_image > 1:  # [N, P, D] -> [N * r, P, D], each image r times in a row
                features_npd = jnp.repeat(features_npd, rows_per_image, axis=0)
            embeds_btd = merge_image_features(embeds_btd, image_mask_bt, features_npd)
            if cfg.grounded_layers:
                ground = grounding_inputs(embeds_btd, image_mask_bt, attention_mask,
                                          cfg.image_seq_length, cfg.grounding.image_features)
        return embeds_btd, image_mask_bt, ground

    def per_layer(self, scores_g) -> dict[int, jax.Array]:
        return {l: scores_g[i] for i, l in enumerate(self.config.grounded_layers)}

    # ---- cached decoding (used by jaxground.inference) ----------------------------------
    def prefill(self, input_ids, pixel_values, attention_mask, cache_length: int):
        """Runs the prompt [B, T] (left padded) once. Returns the next-token logits [B, V],
        a KV cache of `cache_length` positions holding the prompt, and what the heads need
        to score new tokens (None without images or heads)."""
        positions = positions_from_mask(attention_mask)
        embeds_btd, _, ground = self.embed(input_ids, pixel_values, attention_mask)
        dec = self.language_model(embeds_btd, attention_mask, positions, ground, return_kv=True)
        cache = KVCache.from_prefill(dec.kv, attention_mask, cache_length,
                                     per_layer=self.language_model.unrolled)
        decode_ground = (DecodeGrounding.from_prefill(ground, dec.image_gbkd)
                         if ground is not None else None)
        return self.logits(dec.hidden[:, -1]), cache, decode_ground

    def decode_step(self, tokens_bc, positions_b, cache: KVCache,
                    ground: DecodeGrounding | None):
        """Candidate next tokens [B, C] at positions [B]. Returns (logits [B, C, V], head
        logits [G, B, C] or None, (k, v) [L, B, C, K, H] to write for the chosen one)."""
        embeds_bcd = self.language_model.embed_tokens(tokens_bc)
        hidden, scores_gbc, kv = self.language_model.decode(embeds_bcd, positions_b, cache,
                                                            ground)
        return self.logits(hidden), scores_gbc, kv


# model_jit: like nnx.jit with graph_updates=False (the forward mutates nothing; with updates
# on, nnx.jit returns a copy of the whole model state from every call: 50-60 ms per call on a
# 279 MB model), compiled with the backend's options (ops.py).
@model_jit
def _forward_jit(model: LlavaModel, input_ids, pixel_values, attention_mask, position_ids):
    return model.forward(input_ids, pixel_values, attention_mask, position_ids)


def init_model(config: LlavaConfig, seed: int = 0) -> LlavaModel:
    return LlavaModel(config, rngs=nnx.Rngs(seed))


def abstract_model(config: LlavaConfig) -> LlavaModel:
    """The model with ShapeDtypeStruct leaves: shapes without allocating anything."""
    return nnx.eval_shape(lambda: LlavaModel(config, rngs=nnx.Rngs(0)))


def fresh_grounding_heads(config: LlavaConfig, seed: int = 0) -> dict[str, Any]:
    """Newly initialised head parameters as {"language_model": {"grounding_heads": ...}}:
    for checkpoints that have no heads, or heads of another grounding config."""
    if not config.grounded_layers:
        return {}
    heads = make_grounding_heads(config.text, config.grounding, len(config.grounded_layers),
                                 dtype_of(config.dtype), dtype_of(config.param_dtype),
                                 nnx.Rngs(seed))
    return {"language_model": {"grounding_heads": param_dict(heads)}}


def param_dict(model: nnx.Module) -> dict[str, Any]:
    """Nested {name: array} of the model's parameters (the checkpoint layout)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
