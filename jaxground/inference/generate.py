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

Serving (`jaxground.serve`) needs more than one call per batch: every row has its own
temperature, top_p, seed and token budget (`row_max_new_tokens`), so that a request's answer
is the same alone or in any batch, and `on_token` streams each step's tokens to the host
while the loop runs (a host callback inside the compiled loop; it can also stop rows, e.g.
when a client went away).

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
from jax.experimental import io_callback

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
    stream_top_k: int = -1  # >= 0: hand steps to the host with this many top log p ...
    stream_every: int = 1   # ... this many steps at a time


@dataclasses.dataclass(frozen=True)
class StepTokens:
    """What `on_token` receives at step `index` of the loop (numpy arrays, one row each)."""

    index: int
    tokens: np.ndarray          # [B] int32 (pad for finished rows)
    live: np.ndarray            # [B] bool: rows that produced a token this step
    logprobs: np.ndarray        # [B] float32 log p of the token (see Generation.logprobs)
    grounding: np.ndarray | None  # [B] float32 aggregated grounding logit (None: no heads)
    scored: np.ndarray | None     # [B] bool: live rows whose token carries a score
    top_ids: np.ndarray         # [B, K] int32 the K most likely tokens (K = stream_top_k)
    top_logprobs: np.ndarray    # [B, K] float32 their log p


# on_token callbacks of the running generate calls: the compiled loop knows a call by the
# integer id it was given, so one compiled program serves every callback.
_LISTENERS: dict[int, object] = {}
_NEXT_LISTENER = iter(range(1, 1 << 30))


def _dispatch(header, ints_ebc, floats_ebc) -> np.ndarray:
    """Host side of the step callback: unpacks `count` steps from `first` on (`_pack` packs
    each step into two arrays: every argument of a callback costs a transfer), hands them
    to the listener in order and returns [B] bool, the rows it wants stopped."""
    listener_id, first, count, has_grounding = (int(x) for x in header)
    stop = np.zeros(ints_ebc.shape[1], bool)
    listener = _LISTENERS.get(listener_id)
    if listener is None:
        return stop
    ints_ebc, floats_ebc = np.asarray(ints_ebc), np.asarray(floats_ebc)
    for e in range(count):
        ints, floats = ints_ebc[e], floats_ebc[e]
        wanted = listener(StepTokens(
            first + e, tokens=ints[:, 0], live=ints[:, 1].astype(bool), logprobs=floats[:, 0],
            grounding=floats[:, 1] if has_grounding else None,
            scored=ints[:, 2].astype(bool) if has_grounding else None,
            top_ids=ints[:, 3:], top_logprobs=floats[:, 2:]))
        if wanted is not None:
            stop |= np.asarray(wanted, bool).reshape(stop.shape)
    return stop


def generate(model: LlavaModel, input_ids, pixel_values=None, attention_mask=None, *,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             seed: int = 0, guidance: float | None = None, guidance_top_k: int = 5,
             guidance_score: str = "logit", guidance_tokens=None,
             flag_threshold: float | None = None, flag_tokens=None,
             contrast: str | None = None, contrast_alpha: float = 1.0,
             contrast_beta: float = 0.1, contrast_noise_step: int = 500,
             row_max_new_tokens=None, row_ignore_eos=None, on_token=None,
             stream_top_k: int = 0, stream_every: int = 1) -> Generation:
    """Generates up to `max_new_tokens` per row after left-padded prompts [B, T].

    temperature 0 is greedy; otherwise samples from softmax(logits / temperature) restricted
    to the top-p nucleus, with `jax.random` keyed by `seed` and the step. `temperature`,
    `top_p` and `seed` may be one value or one per row ([B]); with one seed, row b draws
    from the b-th key split from it; with one seed per row, a row's draws depend on its own
    seed only (not on its place in the batch).
    row_max_new_tokens: [B] per-row budgets (<= max_new_tokens): a row stops after that
    many tokens, as it does after EOS. row_ignore_eos: [B] bool, rows that go on after EOS
    (to their budget; benchmarks use it for answers of a known length).
    on_token: a host function called at every step with a `StepTokens` (`stream_top_k` most
    likely alternatives included); it may return [B] bool, rows to stop now. It runs inside
    the compiled loop: keep it quick. The loop hands steps over `stream_every` at a time
    (each hand-over is a round trip to the host, ~0.4 ms on CPU) and the rest at the end;
    a row stopped by `on_token` stops at the end of that hand-over.
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
    args = _program_arguments(**locals())
    if on_token is None:
        out, _ = _generate(*args)
    else:
        listener = next(_NEXT_LISTENER)
        _LISTENERS[listener] = on_token
        args[5]["listener"] = jnp.int32(listener)
        try:
            out, pending = jax.block_until_ready(_generate(*args))
            _dispatch(*pending)  # the last steps, fewer than stream_every
        finally:
            del _LISTENERS[listener]
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
                       contrast_alpha, contrast_beta, contrast_noise_step,
                       row_max_new_tokens=None, row_ignore_eos=None, on_token=None,
                       stream_top_k=0, stream_every=1, **_flags):
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
    b = input_ids.shape[0]
    temperature_b, top_p_b = (_per_row(x, b, name, np.float32) for x, name in
                              ((temperature, "temperature"), (top_p, "top_p")))
    if (temperature_b < 0).any() or not ((0 < top_p_b) & (top_p_b <= 1)).all():
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, "
                         f"{top_p}")
    row_max = _per_row(max_new_tokens if row_max_new_tokens is None else row_max_new_tokens,
                       b, "row_max_new_tokens", np.int32)
    if (row_max < 1).any() or (row_max > max_new_tokens).any():
        raise ValueError(f"row_max_new_tokens must be in [1, max_new_tokens="
                         f"{max_new_tokens}], got {row_max.tolist()}")
    if not 0 <= stream_top_k <= cfg.text.vocab_size:
        raise ValueError(f"stream_top_k must be in [0, {cfg.text.vocab_size}], got "
                         f"{stream_top_k}")
    if not 1 <= stream_every <= max_new_tokens:
        raise ValueError(f"stream_every must be in [1, max_new_tokens={max_new_tokens}], got "
                         f"{stream_every}")
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
    seeds = np.asarray(seed)
    if seeds.ndim == 0:
        row_keys = jax.random.split(jax.random.key(int(seeds)), b)
    else:
        seeds = _per_row(seeds, b, "seed", np.int64)
        if contrast is not None:
            raise ValueError("contrast draws one noise image for the batch: give one seed")
        row_keys = jnp.stack([jax.random.key(int(x)) for x in seeds])
    plan = _Plan(max_new_tokens=max_new_tokens, sample=bool((temperature_b > 0).any()),
                 guided=guided, top_k=guidance_top_k if guided else 1,
                 guidance_score=guidance_score, eos=eos, pad=int(pad), contrast=contrast,
                 stream_top_k=-1 if on_token is None else stream_top_k,
                 stream_every=stream_every)
    knobs = dict(temperature=jnp.asarray(temperature_b), top_p=jnp.asarray(top_p_b),
                 alpha=jnp.float32(guidance or 0.0),
                 bonus_tokens=token_mask(guidance_tokens, vocab),
                 row_keys=row_keys, row_max=jnp.asarray(row_max),
                 eos_ends=~jnp.asarray(_per_row(
                     False if row_ignore_eos is None else row_ignore_eos, b, "row_ignore_eos",
                     bool)),
                 listener=jnp.int32(0),
                 contrast_alpha=jnp.float32(contrast_alpha),
                 contrast_beta=jnp.float32(contrast_beta))
    pixels = None if pixel_values is None else jnp.asarray(pixel_values)
    distorted = (None if contrast is None
                 else contrast_lib.distort(pixels, int(seeds), contrast_noise_step))
    return model, jnp.asarray(input_ids), pixels, distorted, jnp.asarray(mask), knobs, plan


def _per_row(x, b: int, name: str, dtype) -> np.ndarray:
    """One value or [B] values -> [B] array of `dtype`."""
    x = np.asarray(x)
    if x.ndim == 0:
        return np.full((b,), x, dtype)
    if x.shape != (b,):
        raise ValueError(f"{name} must be one value or one per row ({b}), got shape {x.shape}")
    return x.astype(dtype)


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


def nucleus_sample(keys_b, scores_bc, temperature_b, top_p_b):
    """Index [B] sampled from softmax(scores / temperature) within the top-p nucleus (the
    smallest set of most likely entries whose mass reaches top_p; never empty); row b draws
    with its own key and knobs."""
    logits = scores_bc / jnp.maximum(temperature_b, 1e-6)[:, None]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    outside = jnp.cumsum(probs, axis=-1) - probs >= top_p_b[:, None]  # mass before it >= top_p
    choice = jax.vmap(jax.random.categorical)(keys_b,
                                              jnp.where(outside, -jnp.inf, sorted_logits))
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def _pick(keys_b, scores_bc, knobs, plan: _Plan):
    """Index [B]: sampled in rows with a temperature, the argmax in the others."""
    best = jnp.argmax(scores_bc, axis=-1)
    if not plan.sample:
        return best
    drawn = nucleus_sample(keys_b, scores_bc, knobs["temperature"], knobs["top_p"])
    return jnp.where(knobs["temperature"] > 0, drawn, best)


def _propose(logp_bv, pick_bv, knobs, plan: _Plan, keys_b):
    """Candidate tokens [B, C] and their log p: the top-k when guided, else the one pick from
    the scores `pick_bv` (log p, or the contrast scores)."""
    if plan.guided:
        return jax.lax.top_k(logp_bv, plan.top_k)
    token_b = _pick(keys_b, pick_bv, knobs, plan)
    token_b1 = token_b[:, None].astype(jnp.int32)
    return jnp.take_along_axis(logp_bv, token_b1, axis=-1), token_b1


def _choose(cand_logp_bc, cand_bc, grounding_bc, knobs, plan: _Plan, keys_b):
    """Index [B] of the candidate to keep."""
    if not plan.guided:
        return jnp.zeros(cand_bc.shape[0], jnp.int32)
    bonus = (grounding_bc if plan.guidance_score == "logit"
             else jax.nn.log_sigmoid(grounding_bc))
    bonus = jnp.where(knobs["bonus_tokens"][cand_bc], bonus, 0.0)
    return _pick(keys_b, cand_logp_bc + knobs["alpha"] * bonus, knobs, plan)


def _pack(token_b, live_b, logp_bv, token_logp_b, grounding_b, ground, plan: _Plan):
    """One step for the host: ints [B, 3 + K] (token, live, scored, top ids) and floats
    [B, 2 + K] (the token's log p, grounding, top log p)."""
    b = token_b.shape[0]
    top_logp_bk, top_ids_bk = jax.lax.top_k(logp_bv, plan.stream_top_k)
    scored_b = live_b & ground.scored_b[:b] if ground is not None else jnp.zeros(b, bool)
    ints_bc = jnp.concatenate([jnp.stack([token_b, live_b, scored_b], 1).astype(jnp.int32),
                               top_ids_bk.astype(jnp.int32)], 1)
    floats_bc = jnp.concatenate([jnp.stack([token_logp_b, grounding_b], 1), top_logp_bk],
                                1).astype(jnp.float32)
    return ints_bc, floats_bc


def _header(knobs, first, count, ground):
    return jnp.stack([knobs["listener"], first, count, jnp.int32(ground is not None)])


def _hand_over(i, pending, knobs, ground, plan: _Plan):
    """After step i: the host gets the pending steps when there are `stream_every` of them;
    returns [B] bool, the rows it stops."""
    e = plan.stream_every
    ints_ebc, floats_ebc = pending
    b = ints_ebc.shape[1]
    call = lambda: io_callback(_dispatch, jax.ShapeDtypeStruct((b,), jnp.bool_),
                               _header(knobs, i + 1 - e, e, ground), ints_ebc, floats_ebc)
    return jax.lax.cond(i % e == e - 1, call, lambda: jnp.zeros(b, bool))


@model_jit(static_argnames=("plan",))
def _generate(model: LlavaModel, input_ids, pixel_values, distorted_pixels, attention_mask,
              knobs, plan: _Plan) -> tuple[Generation, tuple | None]:
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
    if plan.stream_top_k >= 0:  # steps not yet handed to the host: [E, B, C]
        e, k = plan.stream_every, plan.stream_top_k
        init["pending"] = (jnp.zeros((e, b, 3 + k), jnp.int32),
                           jnp.zeros((e, b, 2 + k), jnp.float32))

    def step(s):
        i = s["i"]
        step_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, i)))(
            knobs["row_keys"])  # [B, 2]
        propose_key, choose_key = step_keys[:, 0], step_keys[:, 1]
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
        token_logp_b = logp_bv[rows, token_b]
        stop = (s["done"] | (jnp.isin(token_b, eos) & knobs["eos_ends"])
                | (i + 1 >= knobs["row_max"]))
        streamed = {}
        if plan.stream_top_k >= 0:
            packed = _pack(token_b, live, logp_bv, token_logp_b, grounding_bc[rows, j], ground,
                           plan)
            pending = tuple(p.at[i % plan.stream_every].set(x)
                            for p, x in zip(s["pending"], packed))
            stop |= _hand_over(i, pending, knobs, ground, plan)
            streamed["pending"] = pending
        return dict(
            **streamed,
            i=i + 1,
            cache=s["cache"].write(t + i, k[:, rows_s, j_s], v[:, rows_s, j_s]),
            logits=next_logits_scv[rows_s, j_s].astype(jnp.float32),
            done=stop,
            tokens=s["tokens"].at[:, i].set(token_b),
            valid=s["valid"].at[:, i].set(live),
            logprobs=s["logprobs"].at[:, i].set(jnp.where(live, token_logp_b, 0.0)),
            entropy=s["entropy"].at[:, i].set(
                jnp.where(live, -jnp.sum(jnp.exp(logp_bv) * logp_bv, axis=-1), 0.0)),
            scores=s["scores"].at[:, :, i].set(jnp.where(live, scores_gbc[:, rows, j], 0.0)),
        )

    s = jax.lax.while_loop(lambda s: (s["i"] < n) & ~jnp.all(s["done"]), step, init)
    out = Generation(tokens=s["tokens"], valid=s["valid"], lengths=s["valid"].sum(-1),
                     logprobs=s["logprobs"], entropy=s["entropy"], grounding=None)
    # The steps the loop has not handed over (fewer than stream_every), for the host.
    left = None
    if plan.stream_top_k >= 0:
        count = s["i"] % plan.stream_every
        left = (_header(knobs, s["i"] - count, count, ground), *s["pending"])
    if not g:
        return out, left
    scored = s["valid"] & ground.scored_b[:b, None]
    return out.replace(grounding=aggregate(s["scores"], model.config.grounding.aggregate),
                       grounding_scores=model.per_layer(s["scores"]), scored=scored), left
