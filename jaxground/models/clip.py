"""CLIP vision transformer (the vision tower of LLaVA-1.5), in Flax NNX. No I/O."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from jaxground.models.config import VisionConfig, dtype_of
from jaxground.models.layers import scan_layers, stack_layers
from jaxground.models.ops import Linear, attention, shard_rows


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


class _Dims:
    """dtype/param_dtype keyword arguments shared by every sub-layer."""

    def __init__(self, dtype: str, param_dtype: str):
        self.kw = dict(dtype=dtype_of(dtype), param_dtype=dtype_of(param_dtype))


class ClipAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, dims: _Dims, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = Linear(d, d, rngs=rngs, **dims.kw)
        self.k_proj = Linear(d, d, rngs=rngs, **dims.kw)
        self.v_proj = Linear(d, d, rngs=rngs, **dims.kw)
        self.out_proj = Linear(d, d, rngs=rngs, **dims.kw)

    def __call__(self, x_bsd):
        split = lambda t: rearrange(t, "b s (n h) -> b s n h", n=self.num_heads)
        q, k, v = split(self.q_proj(x_bsd)), split(self.k_proj(x_bsd)), split(self.v_proj(x_bsd))
        out_bsnh = attention(q, k, v)  # bidirectional, scale 1/sqrt(h)
        return self.out_proj(rearrange(out_bsnh, "b s n h -> b s (n h)"))


class ClipMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, dims: _Dims, *, rngs: nnx.Rngs):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, **dims.kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs, **dims.kw)

    def __call__(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


def _layer_norm(cfg: VisionConfig, dims: _Dims, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x-mu)^2] like torch, not E[x^2]-mu^2 (which loses digits).
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False,
                         rngs=rngs, **dims.kw)


class ClipLayer(nnx.Module):
    """Pre-LN block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig, dims: _Dims, *, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(cfg, dims, rngs)
        self.self_attn = ClipAttention(cfg, dims, rngs=rngs)
        self.layer_norm2 = _layer_norm(cfg, dims, rngs)
        self.mlp = ClipMLP(cfg, dims, rngs=rngs)

    def __call__(self, x_bsd):
        x_bsd = x_bsd + self.self_attn(self.layer_norm1(x_bsd))
        return x_bsd + self.mlp(self.layer_norm2(x_bsd))


class ClipVisionModel(nnx.Module):
    """Returns the requested entries of HF's `hidden_states` tuple, running no layer past
    the last one requested (LLaVA reads layer -2, so CLIP's final layer is never run)."""

    def __init__(self, cfg: VisionConfig, dtype: str = "float32", param_dtype: str = "float32",
                 *, rngs: nnx.Rngs, remat: str = "none"):
        dims = _Dims(dtype, param_dtype)
        self.remat = remat
        self.config = cfg
        self.compute_dtype = dtype_of(dtype)
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = nnx.Conv(cfg.num_channels, d, kernel_size=(p, p), strides=(p, p),
                                    padding="VALID", use_bias=False, rngs=rngs, **dims.kw)
        init = nnx.initializers.normal(0.02)
        self.class_embedding = nnx.Param(init(rngs.params(), (d,), dims.kw["param_dtype"]))
        self.position_embedding = nnx.Embed(cfg.num_patches + 1, d, rngs=rngs, **dims.kw)
        self.pre_layernorm = _layer_norm(cfg, dims, rngs)
        self.layers = stack_layers(lambda r: ClipLayer(cfg, dims, rngs=r), cfg.num_layers, rngs)
        # Unused by LLaVA; kept so a converted checkpoint exports back to HF unchanged.
        self.post_layernorm = _layer_norm(cfg, dims, rngs)

    def __call__(self, pixel_values_nchw, hidden_state_indices: tuple[int, ...]):
        """pixel_values [N, C, H, W] -> list of [N, 1 + P, D], one per requested index
        (0 = embeddings after pre_layrnorm, i = output of layer i)."""
        n, c, h, w = pixel_values_nchw.shape
        size = self.config.image_size
        if (h, w) != (size, size):
            raise ValueError(f"pixel_values are {h}x{w}; the vision tower expects "
                             f"{size}x{size} images")
        x_nhwc = jnp.transpose(pixel_values_nchw, (0, 2, 3, 1)).astype(self.compute_dtype)
        patches_npd = rearrange(self.patch_embed(x_nhwc), "n gh gw d -> n (gh gw) d")
        cls_n1d = jnp.broadcast_to(self.class_embedding[...].astype(patches_npd.dtype),
                                   (n, 1, patches_npd.shape[-1]))
        x_nsd = jnp.concatenate([cls_n1d, patches_npd], axis=1)
        x_nsd = x_nsd + self.position_embedding.embedding[...].astype(x_nsd.dtype)[None]
        x_nsd = self.pre_layernorm(x_nsd)

        outputs, done = {0: x_nsd}, 0
        for idx in sorted(set(hidden_state_indices)):
            x_nsd, _ = scan_layers(self.layers, shard_rows(x_nsd),
                                   lambda layer, c, _: (shard_rows(layer(c)), None),
                                   done, idx, remat=self.remat)
            outputs[idx], done = x_nsd, idx
        return [outputs[i] for i in hidden_state_indices]
