"""Generation with a KV cache and a grounding score for every generated token.

    gen = jaxground.generate(model, input_ids, pixel_values, attention_mask=mask,
                             max_new_tokens=32, eos_token_id=2)
    gen.tokens, gen.grounding        # [B, N], [B, N]

One compiled program: prefill (image encoded once, prompt K/V written into a cache of
T + N positions), then a `lax.while_loop` that feeds one token per row per step and stops
when every row has produced EOS. Rows are left padded, so every row's step-i token lands at
cache position T + i. A token's grounding score is computed in the grounded layers when the
token is fed back in, i.e. from exactly the hidden states a teacher-forced forward would give
it.

Grounding-guided decoding (`guidance=alpha`): at each step the top-k candidates are fed
together (each attends to the cache and to itself; see `LlamaAttention.decode`), which gives
every candidate its grounding logit g and its own next-token logits at once, and the step
picks argmax(log p + alpha * g). The chosen candidate's K/V and logits are kept, so a guided
step costs one decode pass of width k instead of 1, and alpha = 0 picks the greedy token.

Visual contrastive decoding (`contrast="vcd"`, see `jaxground.inference.contrast`): the prompt
runs twice in one batch of 2B rows, with the clean and with the diffusion-noised images; each
step picks the token from the contrast of the two halves' logits and feeds it to both halves
(one cache of 2B rows). Log p, entropy and grounding are the clean half's.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxground.inference import contrast as contrast_lib
from jaxground.models.grounding import aggregate
from jaxground.models.llava import LlavaModel, check_image_tokens, check_padding_supported
from jaxground.models.ops import model_jit


@struct.dataclass
class Generation:
    tokens: jax.Array            # [B, N] int32; `pad_token_id` after a row's EOS
    valid: jax.Array             # [B, N] bool: generated tokens (up to and including EOS)
    lengths: jax.Array           # [B] number of valid tokens
    logprobs: jax.Array          # [B, N] log p of each token under the model (no guidance,
                                 # clean image under contrast)
    entropy: jax.Array           # [B, N] entropy of that next-token distribution
    grounding: jax.Array | None  # [B, N] aggregated head logit of each token (None: no heads
                                 # or no image); 0 where not valid or the row has no image
    grounding_scores: dict = struct.field(default_factory=dict)  # {layer: [B, N]}
    scored: jax.Array | None = None   # [B, N] bool: valid tokens that carry a score
    flagged: jax.Array | None = None  # [B, N] bool: scored tokens below `flag_threshold`
                                      # (only `flag_tokens` when given)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static part of a generate call (one compilation per distinct plan)."""

    max_new_tokens: int
    sample: bool
    guided: bool
    top_k: int
    guidance_score: str
    eos: tuple[int, ...]
    pad: int
    contrast: str | None = None


def generate(model: LlavaModel, input_ids, pixel_values=None, attention_mask=None, *,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             seed: int = 0, guidance: float | None = None, guidance_top_k: int = 5,
             guidance_score: str = "logit", guidance_tokens=None,
             flag_threshold: float | None = None, flag_tokens=None,
             contrast: str | None = None, contrast_alpha: float = 1.0,
             contrast_beta: float = 0.1, contrast_noise_step: int = 500) -> Generation:
    """Generates up to `max_new_tokens` per row after left-padded prompts [B, T].

    temperature 0 is greedy; otherwise samples from softmax(logits / temperature) restricted
    to the top-p nucleus, with `jax.random` keyed by `seed` and the step.
    guidance: alpha of grounding-guided decoding (None: off). Among the `guidance_top_k`
    most likely tokens, picks argmax log p + alpha * b, b the candidate's grounding logit
    (`guidance_score="logit"`) or log sigmoid of it ("log_sigmoid": only penalises poorly
    grounded tokens). With temperature > 0 it samples the candidates by
    softmax((log p + alpha * b) / temperature) instead. `guidance_tokens` (ids or a [V] bool
    mask) limits the bonus to those tokens, e.g. object words; others get b = 0.
    flag_threshold: scored tokens whose grounding logit is below it are flagged (only
    `flag_tokens`, ids or a [V] bool mask, when given).
    contrast: "vcd" for visual contrastive decoding (None: off). Tokens come from
    (1 + contrast_alpha) * l - contrast_alpha * l', l and l' the logits with the clean image
    and with the image after `contrast_noise_step` of 1000 diffusion steps (one noise image
    drawn from `seed`, shared by all rows), restricted to tokens with
    l >= log(contrast_beta) + max(l); argmax at temperature 0, else sampled like the plain
    logits. contrast_alpha = 0 is greedy. Not combinable with guidance.
    """
    out = _generate(*_program_arguments(**locals()))
    if out.grounding is None or flag_threshold is None:
        return out
    flagged = out.scored & (out.grounding < flag_threshold)
    if flag_tokens is not None:
        flagged &= token_mask(flag_tokens, model.config.text.vocab_size)[out.tokens]
    return out.replace(flagged=flagged)


def lower_generate(*args, **kwargs):
    """`jax.jit(...).lower` of the program that `generate(*args, **kwargs)` runs (the model
    may be abstract): for ahead-of-time compilation and XLA's memory analysis."""
    bound = inspect.signature(generate).bind(*args, **kwargs)
    bound.apply_defaults()
    return _generate.lower(*_program_arguments(**bound.arguments))


def _program_arguments(model, input_ids, pixel_values, attention_mask, max_new_tokens,
                       temperature, top_p, eos_token_id, pad_token_id, seed, guidance,
                       guidance_top_k, guidance_score, guidance_tokens, contrast,
                       contrast_alpha, contrast_beta, contrast_noise_step, **_flags):
    """`generate`'s arguments checked and turned into those of the compiled program."""
    cfg = model.config
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    check_image_tokens(input_ids, pixel_values, cfg)
    mask = (np.ones_like(input_ids) if attention_mask is None
            else np.asarray(attention_mask)).astype(np.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids {input_ids.shape}")
    if mask[:, -1].min() == 0:
        raise ValueError("prompts must be left padded: a row's last position is padding")
    check_padding_supported(cfg, mask)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, "
                         f"{top_p}")
    if guidance_score not in ("logit", "log_sigmoid"):
        raise ValueError(f"guidance_score must be 'logit' or 'log_sigmoid', got "
                         f"{guidance_score!r}")
    vocab = cfg.text.vocab_size
    eos = () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    guided = guidance is not None
    if guided and not 1 <= guidance_top_k <= vocab:
        raise ValueError(f"guidance_top_k must be in [1, {vocab}], got {guidance_top_k}")
    check_contrast(contrast, pixel_values, guided, contrast_alpha, contrast_beta)
    plan = _Plan(max_new_tokens=max_new_tokens, sample=temperature > 0, guided=guided,
                 top_k=guidance_top_k if guided else 1, guidance_score=guidance_score,
                 eos=eos, pad=int(pad), contrast=contrast)
    knobs = dict(temperature=jnp.float32(max(temperature, 1e-6)), top_p=jnp.float32(top_p),
                 alpha=jnp.float32(guidance or 0.0),
                 bonus_tokens=token_mask(guidance_tokens, vocab),
                 key=jax.random.key(seed),
                 contrast_alpha=jnp.float32(contrast_alpha),
                 contrast_beta=jnp.float32(contrast_beta))
    pixels = None if pixel_values is None else jnp.asarray(pixel_values)
    distorted = (None if contrast is None
                 else contrast_lib.distort(pixels, seed, contrast_noise_step))
    return model, jnp.asarray(input_ids), pixels, distorted, jnp.asarray(mask), knobs, plan


def check_contrast(contrast, pixel_values, guided: bool, alpha, beta) -> None:
    if contrast is None:
        return
    if contrast not in contrast_lib.CONTRASTS:
        raise ValueError(f"contrast must be None or one of {contrast_lib.CONTRASTS}, got "
                         f"{contrast!r}")
    if pixel_values is None:
        raise ValueError(f"contrast={contrast!r} contrasts the image with a distorted copy: "
                         "it needs pixel_values")
    if guided:
        raise ValueError(f"contrast={contrast!r} cannot be combined with grounding guidance "
                         "(guidance=...): use one or the other")
    if not alpha >= 0 or not 0 <= beta <= 1:
        raise ValueError(f"need contrast_alpha >= 0 and 0 <= contrast_beta <= 1, got "
                         f"{alpha}, {beta}")


def token_mask(tokens, vocab: int) -> jax.Array:
    """[V] bool from token ids or a [V] bool mask; None means every token."""
    if tokens is None:
        return jnp.ones((vocab,), bool)
    tokens = np.asarray(tokens)
    if tokens.dtype == bool:
        if tokens.shape != (vocab,):
            raise ValueError(f"a token mask must have shape ({vocab},), got {tokens.shape}")
        return jnp.asarray(tokens)
    if tokens.size and tokens.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {tokens.dtype}")
    tokens = tokens.astype(np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}), got {tokens.tolist()}")
    return jnp.zeros((vocab,), bool).at[tokens.reshape(-1)].set(True)


def nucleus_sample(key, scores_bc, temperature, top_p):
    """Index [B] sampled from softmax(scores / temperature) within the top-p nucleus (the
    smallest set of most likely entries whose mass reaches top_p; never empty)."""
    logits = scores_bc / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    outside = jnp.cumsum(probs, axis=-1) - probs >= top_p  # mass before it already >= top_p
    choice = jax.random.categorical(key, jnp.where(outside, -jnp.inf, sorted_logits), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def _propose(logp_bv, pick_bv, knobs, plan: _Plan, key):
    """Candidate tokens [B, C] and their log p: the top-k when guided, else the one pick from
    the scores `pick_bv` (log p, or the contrast scores)."""
    if plan.guided:
        return jax.lax.top_k(logp_bv, plan.top_k)
    token_b = (nucleus_sample(key, pick_bv, knobs["temperature"], knobs["top_p"])
               if plan.sample else jnp.argmax(pick_bv, axis=-1))
    token_b1 = token_b[:, None].astype(jnp.int32)
    return jnp.take_along_axis(logp_bv, token_b1, axis=-1), token_b1


def _choose(cand_logp_bc, cand_bc, grounding_bc, knobs, plan: _Plan, key):
    """Index [B] of the candidate to keep."""
    if not plan.guided:
        return jnp.zeros(cand_bc.shape[0], jnp.int32)
    bonus = (grounding_bc if plan.guidance_score == "logit"
             else jax.nn.log_sigmoid(grounding_bc))
    bonus = jnp.where(knobs["bonus_tokens"][cand_bc], bonus, 0.0)
    total = cand_logp_bc + knobs["alpha"] * bonus
    if plan.sample:
        return nucleus_sample(key, total, knobs["temperature"], knobs["top_p"])
    return jnp.argmax(total, axis=-1)


@model_jit(static_argnames=("plan",))
def _generate(model: LlavaModel, input_ids, pixel_values, distorted_pixels, attention_mask,
              knobs, plan: _Plan) -> Generation:
    b, t = input_ids.shape
    n, g = plan.max_new_tokens, len(model.config.grounded_layers)
    streams = 1
    if plan.contrast is not None:
        # Rows [0, B) see the clean images, rows [B, 2B) the distorted ones; same text.
        streams = 2
        input_ids = jnp.concatenate([input_ids, input_ids])
        attention_mask = jnp.concatenate([attention_mask, attention_mask])
        pixel_values = jnp.concatenate([pixel_values, distorted_pixels])
    logits_sv, cache, ground = model.prefill(input_ids, pixel_values, attention_mask, t + n)
    positions_s = attention_mask.sum(-1).astype(jnp.int32)  # each row's next position
    eos = jnp.asarray(plan.eos or (-1,), jnp.int32)
    rows = jnp.arange(b)
    rows_s = jnp.arange(streams * b)  # S = streams * B cache rows
    g = g if ground is not None else 0
    init = dict(i=jnp.int32(0), cache=cache, logits=logits_sv.astype(jnp.float32),
                done=jnp.zeros(b, bool),
                tokens=jnp.full((b, n), plan.pad, jnp.int32), valid=jnp.zeros((b, n), bool),
                logprobs=jnp.zeros((b, n)), entropy=jnp.zeros((b, n)),
                scores=jnp.zeros((g, b, n)))

    def step(s):
        i = s["i"]
        propose_key, choose_key = jax.random.split(jax.random.fold_in(knobs["key"], i))
        clean_bv = s["logits"][:b]
        logp_bv = jax.nn.log_softmax(clean_bv, axis=-1)
        pick_bv = (logp_bv if plan.contrast is None else contrast_lib.vcd_logits(
            clean_bv, s["logits"][b:], knobs["contrast_alpha"], knobs["contrast_beta"]))
        cand_logp_bc, cand_bc = _propose(logp_bv, pick_bv, knobs, plan, propose_key)
        cand_bc = jnp.where(s["done"][:, None], plan.pad, cand_bc).astype(jnp.int32)
        next_logits_scv, scores_gsc, (k, v) = model.decode_step(
            jnp.tile(cand_bc, (streams, 1)), positions_s + i, s["cache"], ground)
        scores_gbc = (jnp.zeros((0,) + cand_bc.shape) if scores_gsc is None
                      else scores_gsc[:, :b])  # grounding of the clean stream
        grounding_bc = (aggregate(scores_gbc, model.config.grounding.aggregate) if g
                        else jnp.zeros(cand_bc.shape))
        j = _choose(cand_logp_bc, cand_bc, grounding_bc, knobs, plan, choose_key)
        j_s = jnp.tile(j, streams)
        token_b = cand_bc[rows, j]
        live = ~s["done"]
        return dict(
            i=i + 1,
            cache=s["cache"].write(t + i, k[:, rows_s, j_s], v[:, rows_s, j_s]),
            logits=next_logits_scv[rows_s, j_s].astype(jnp.float32),
            done=s["done"] | jnp.isin(token_b, eos),
            tokens=s["tokens"].at[:, i].set(token_b),
            valid=s["valid"].at[:, i].set(live),
            logprobs=s["logprobs"].at[:, i].set(jnp.where(live, logp_bv[rows, token_b], 0.0)),
            entropy=s["entropy"].at[:, i].set(
                jnp.where(live, -jnp.sum(jnp.exp(logp_bv) * logp_bv, axis=-1), 0.0)),
            scores=s["scores"].at[:, :, i].set(jnp.where(live, scores_gbc[:, rows, j], 0.0)),
        )

    s = jax.lax.while_loop(lambda s: (s["i"] < n) & ~jnp.all(s["done"]), step, init)
    out = Generation(tokens=s["tokens"], valid=s["valid"], lengths=s["valid"].sum(-1),
                     logprobs=s["logprobs"], entropy=s["entropy"], grounding=None)
    if not g:
        return out
    scored = s["valid"] & ground.scored_b[:b, None]
    return out.replace(grounding=aggregate(s["scores"], model.config.grounding.aggregate),
                       grounding_scores=model.per_layer(s["scores"]), scored=scored)
