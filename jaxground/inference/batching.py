"""Many (question, image) prompts through `generate` in fixed-shape batches.

Batches keep one shape per run where they can: rows are left padded to a multiple of
`pad_multiple` tokens and a short last batch is filled with copies of its first row (dropped
from the results), so a whole evaluation compiles `generate` once or twice, not per batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

import numpy as np

from jaxground.data.processor import IGNORE, BadImageError, Processor, open_image
from jaxground.inference.generate import generate
from jaxground.inference.score import score


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How to decode; see `jaxground.generate` for the meaning of each field."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    guidance: float | None = None
    guidance_top_k: int = 5
    guidance_score: str = "logit"
    flag_threshold: float | None = 0.0
    contrast: str | None = None
    contrast_alpha: float = 1.0
    contrast_beta: float = 0.1
    contrast_noise_step: int = 500


@dataclasses.dataclass
class Prompt:
    question: str
    image: str     # path
    key: object    # the caller's id for this prompt
    answer: str | None = None  # a given answer to score (teacher forced) instead


def left_pad(rows: list[list[int]], pad_id: int, multiple: int = 8, length: int | None = None):
    """ids, mask [B, T] int32, T the longest row rounded up to `multiple`, or `length`."""
    t = length or -(-max(map(len, rows)) // multiple) * multiple
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return ids, mask


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _open_images(batch: list[Prompt]):
    """(images, prompts whose image opened, error results for the others)."""
    images, ok, errors = [], [], []
    for p in batch:
        try:
            images.append(open_image(p.image))
            ok.append(p)
        except (BadImageError, FileNotFoundError) as e:
            errors.append({"key": p.key, "error": str(e)})
    return images, ok, errors


def _pad_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)


def score_all(model, processor: Processor, prompts: Iterable[Prompt], batch_size: int = 8,
              pad_multiple: int = 8, progress: Callable[[int], None] | None = None
              ) -> Iterator[dict]:
    """Teacher-forced scores of each prompt's given answer: {"key", "token_ids" (the
    answer's tokens, EOS excluded), "grounding", "logprobs", "entropy"} per answer token,
    or {"key", "error"}."""
    pad = _pad_id(processor.tokenizer)
    for batch in _chunks(list(prompts), batch_size):
        images, ok, errors = _open_images(batch)
        yield from errors
        if ok:
            encoded = [processor.encode(p.question, p.answer) for p in ok]
            rows = [e["input_ids"] for e in encoded]
            # The answer starts where the LM labels do (the prompt is never a target).
            prompt_lens = [next((i for i, l in enumerate(e["labels"]) if l != IGNORE),
                                len(e["labels"]))
                           for e in encoded]
            fill = batch_size - len(rows)
            ids, mask = left_pad(rows + [rows[0]] * fill, pad, pad_multiple)
            out = score(model, ids, processor.pixel_values(images + [images[0]] * fill), mask)
            signals = {"grounding": out.grounding, "logprobs": out.logprobs,
                       "entropy": out.entropy}
            signals = {k: np.asarray(v) for k, v in signals.items() if v is not None}
            t = ids.shape[1]
            for row, (p, r, n) in enumerate(zip(ok, rows, prompt_lens)):
                eos = processor.tokenizer.eos_token_id
                end = len(r) - (1 if eos is not None and r[-1] == eos else 0)
                cols = slice(t - len(r) + n, t - len(r) + end)  # the answer, left padded
                yield {"key": p.key, "token_ids": r[n:end],
                       **{k: v[row, cols].tolist() for k, v in signals.items()}}
        if progress is not None:
            progress(len(batch))


def generate_all(model, processor: Processor, prompts: Iterable[Prompt],
                 settings: DecodeSettings, batch_size: int = 8, guidance_tokens=None,
                 flag_tokens=None, pad_multiple: int = 8,
                 progress: Callable[[int], None] | None = None) -> Iterator[dict]:
    """Yields one result per prompt, in order: {"key", "token_ids", "grounding", "logprobs",
    "entropy", "scored", "flagged"} (per generated token, EOS excluded), or {"key",
    "error"} for a prompt whose image cannot be read (the rest of the batch goes on)."""
    eos = processor.tokenizer.eos_token_id
    pad = _pad_id(processor.tokenizer)
    for batch in _chunks(list(prompts), batch_size):
        images, ok, errors = _open_images(batch)
        yield from errors
        if not ok:
            if progress is not None:
                progress(len(batch))
            continue
        rows = [processor.encode(p.question)["input_ids"] for p in ok]
        fill = batch_size - len(rows)
        ids, mask = left_pad(rows + [rows[0]] * fill, pad, pad_multiple)
        pixels = processor.pixel_values(images + [images[0]] * fill)
        gen = generate(model, ids, pixels, attention_mask=mask,
                       max_new_tokens=settings.max_new_tokens,
                       temperature=settings.temperature, top_p=settings.top_p,
                       eos_token_id=eos, pad_token_id=pad, seed=settings.seed,
                       guidance=settings.guidance, guidance_top_k=settings.guidance_top_k,
                       guidance_score=settings.guidance_score, guidance_tokens=guidance_tokens,
                       flag_threshold=settings.flag_threshold, flag_tokens=flag_tokens,
                       contrast=settings.contrast, contrast_alpha=settings.contrast_alpha,
                       contrast_beta=settings.contrast_beta,
                       contrast_noise_step=settings.contrast_noise_step)
        out = {k: np.asarray(v) for k, v in dict(
            tokens=gen.tokens, valid=gen.valid, logprobs=gen.logprobs, entropy=gen.entropy,
            grounding=gen.grounding, scored=gen.scored, flagged=gen.flagged).items()
            if v is not None}
        for row, p in enumerate(ok):
            n = int(out["valid"][row].sum())
            if n and eos is not None and out["tokens"][row, n - 1] == eos:
                n -= 1  # EOS carries no text
            result = {"key": p.key, "token_ids": out["tokens"][row, :n].tolist()}
            for name in ("grounding", "logprobs", "entropy", "scored", "flagged"):
                if name in out:
                    result[name] = out[name][row, :n].tolist()
            yield result
        if progress is not None:
            progress(len(batch))
