"""Contrastive decoding baselines: Visual Contrastive Decoding (VCD).

Leng et al. 2024 (CVPR), "Mitigating Object Hallucinations in Large Vision-Language Models
through Visual Contrastive Decoding"; reference code DAMO-NLP-SG/VCD (`vcd_utils/`).

VCD decodes from the contrast of the next-token logits l given the image and l' given a
distorted image v' (the image after `noise_step` steps of a diffusion forward process):

    cd = (1 + alpha) * l - alpha * l'     for tokens with l >= log(beta) + max(l)
    cd = -inf                              for the others (adaptive plausibility cut-off)

Pure functions; `jaxground.inference.generate` runs both streams in one batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CONTRASTS = ("vcd",)   # valid values of generate(contrast=...)
NUM_STEPS = 1000       # the reference's diffusion schedule length
# Key stream of the noise: generate's step keys are fold_in(key(seed), i), i < max_new_tokens,
# so a tag this large never coincides with one of them.
_NOISE_STREAM = 2**31 - 1


def diffusion_schedule() -> np.ndarray:
    """alphas_prod [1000] float64: cumprod(1 - betas), betas = sigmoid(linspace(-6, 6, 1000))
    * (0.5e-2 - 1e-5) + 1e-5 (the reference computes this in float32)."""
    betas = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, NUM_STEPS)))
    betas = betas * (0.5e-2 - 1e-5) + 1e-5
    return np.cumprod(1.0 - betas)


def check_noise_step(noise_step) -> int:
    if isinstance(noise_step, bool) or not isinstance(noise_step, (int, np.integer)) or not (
            0 <= noise_step < NUM_STEPS):
        raise ValueError(f"contrast_noise_step must be an integer in [0, {NUM_STEPS}), got "
                         f"{noise_step!r}")
    return int(noise_step)


def noise_coefficients(noise_step: int) -> tuple[float, float]:
    """(sqrt(alphas_prod[T]), sqrt(1 - alphas_prod[T])) of q(x_T | x_0), T = noise_step."""
    alphas_prod = diffusion_schedule()[check_noise_step(noise_step)]
    return float(np.sqrt(alphas_prod)), float(np.sqrt(1.0 - alphas_prod))


def image_noise(seed: int, shape_chw) -> jax.Array:
    """One N(0, 1) noise image [C, H, W] float32 from `seed`; every image of a batch gets this
    same tensor, so a row's distorted image depends neither on its position nor the batch."""
    key = jax.random.fold_in(jax.random.key(seed), _NOISE_STREAM)
    return jax.random.normal(key, tuple(shape_chw), jnp.float32)


@jax.jit
def _q_sample(pixels_nchw, noise_chw, signal, noise_scale):
    return signal * pixels_nchw + noise_scale * noise_chw[None].astype(pixels_nchw.dtype)


def add_diffusion_noise(pixels_nchw, noise_chw, noise_step: int) -> jax.Array:
    """q(x_T | x_0) = sqrt(ab_T) * x_0 + sqrt(1 - ab_T) * noise for CLIP-normalised pixels
    [N, C, H, W] and one noise image [C, H, W] shared by all N."""
    pixels_nchw = jnp.asarray(pixels_nchw)
    if pixels_nchw.ndim != 4 or tuple(noise_chw.shape) != tuple(pixels_nchw.shape[1:]):
        raise ValueError(f"need pixels [N, C, H, W] and noise [C, H, W], got "
                         f"{tuple(pixels_nchw.shape)} and {tuple(noise_chw.shape)}")
    signal, noise_scale = noise_coefficients(noise_step)
    dtype = pixels_nchw.dtype
    return _q_sample(pixels_nchw, jnp.asarray(noise_chw), jnp.asarray(signal, dtype),
                     jnp.asarray(noise_scale, dtype))


def distort(pixels_nchw, seed: int, noise_step: int) -> jax.Array:
    """VCD's distorted images [N, C, H, W]: diffusion noise of step `noise_step` drawn from
    `seed` (what `generate(contrast="vcd", seed=seed)` feeds its contrast stream)."""
    pixels_nchw = jnp.asarray(pixels_nchw)
    return add_diffusion_noise(pixels_nchw, image_noise(seed, pixels_nchw.shape[1:]),
                               noise_step)


def vcd_logits(clean_bv, distorted_bv, alpha, beta):
    """VCD scores [B, V] from raw next-token logits with the clean and the distorted image:
    (1 + alpha) * l - alpha * l', -inf where l < log(beta) + max(l). alpha = 0 leaves l."""
    cutoff_b1 = jnp.log(beta) + jnp.max(clean_bv, axis=-1, keepdims=True)
    contrast_bv = (1 + alpha) * clean_bv - alpha * distorted_bv
    return jnp.where(clean_bv < cutoff_b1, -jnp.inf, contrast_bv)
