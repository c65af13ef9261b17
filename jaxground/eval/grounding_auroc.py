"""How well per-token signals separate real from hallucinated object mentions.

Labels come from CHAIR's matching (`jaxground.eval.chair`): the object mentions of a caption
are `ObjectVocabulary.mentions(text)` (duplicates kept), and a mention is hallucinated when
its category is not in the image's ground truth (`chair.ground_truth(...)[1]`: annotated
categories UNION reference-caption objects). Each mention's tokens are those whose decoded
character span (`token_spans`) overlaps the mention's span.

Signals, one value per token, and the "real-ness" score each is turned into (higher = more
likely real; reported under the second name):

  grounding  the grounding head's score (higher = more grounded)     ->  grounding  "grounding"
  logprob    log p(token | prefix), i.e. -NLL (higher = confident)   ->  logprob    "nll"
  entropy    entropy of the predictive distribution (lower = conf.)  -> -entropy    "entropy"

Two granularities: "token" (each token of each mention is one example with its own values
and its mention's label) and "mention" (one example per mention with the means over its
tokens). For each signal:

  auroc  real = positive class, ranked by the real-ness score: P(real > hallucinated),
         ties counting 1/2. 0.5 = chance.
  aupr   average precision of DETECTING hallucinations: hallucinated = positive class,
         ranked by -real-ness (sklearn's average_precision_score). Chance = the
         hallucinated fraction, so compare it with "hallucinated_tokens" / "tokens".

Either is nan when a class it needs is empty.
"""

from __future__ import annotations

import os

import numpy as np

from jaxground.data.objects import ObjectVocabulary
from jaxground.utils.auroc import auroc as ties_half_auroc

# report name -> (signal name, sign making higher = more likely real)
ORIENTATION = {"grounding": ("grounding", 1.0), "nll": ("logprob", 1.0),
               "entropy": ("entropy", -1.0)}


def _binary(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.isin(y, [0, 1]).all():
        raise ValueError("labels must be 0/1 (or bool)")
    return s, y.astype(bool)


def auroc(scores, labels) -> float:
    """P(score of a random positive > score of a random negative) + 0.5 * P(tie)."""
    s, y = _binary(scores, labels)
    return float(ties_half_auroc(s, y))


def average_precision(scores, labels) -> float:
    """sum_n (R_n - R_{n-1}) P_n over the distinct thresholds, highest score first."""
    s, y = _binary(scores, labels)
    if not y.any():
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    # A threshold admits all tied scores at once: keep only the last index of each run.
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp, fp = tp[last], fp[last]
    precision, recall = tp / (tp + fp), tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def token_spans(tokenizer, ids) -> tuple[str, list[tuple[int, int]]]:
    """(decoded text, [(start, end) of each token's contribution to it]).

    Pieces need not map 1:1 to text (SentencePiece drops the first "▁", byte-level pieces
    may hold half a character), so token k ends where decode(ids[:k+1]) stops agreeing
    with the full text. A prefix ending mid-character decodes to "\\ufffd", which disagrees,
    so that token gets an empty span and the token completing the character gets it all.
    """
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    spans, end = [], 0
    for k in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:k], skip_special_tokens=True)
        # max(): a longer prefix may rewrite earlier text; spans stay monotonic regardless.
        new_end = max(end, len(os.path.commonprefix([prefix, text])))
        spans.append((end, new_end))
        end = new_end
    return text, spans


def mention_records(text: str, spans, vocab: ObjectVocabulary, truth: set,
                    signals: dict) -> list[dict]:
    """One dict per object mention of `text` (CHAIR order, duplicates kept): word, category,
    start, end, tokens (indices into spans), hallucinated, and each signal's mean over the
    mention's tokens. signals: name -> per-token values, len(spans) each."""
    values = {name: np.asarray(v, dtype=np.float64) for name, v in signals.items()}
    for name, v in values.items():
        if v.shape != (len(spans),):
            raise ValueError(f"signal {name!r} has shape {v.shape}, expected ({len(spans)},)")
    records = []
    for m in vocab.mentions(text):
        tokens = [k for k, (s, e) in enumerate(spans) if s < e and s < m.end and m.start < e]
        if not tokens:  # only if a span cannot be aligned; nothing to score
            continue
        rec = {"word": m.word, "category": m.category, "start": m.start, "end": m.end,
               "tokens": tokens, "hallucinated": m.category not in truth}
        rec.update({name: float(v[tokens].mean()) for name, v in values.items()})
        records.append(rec)
    return records


def _scores(scores, real) -> dict:
    scores, real = np.asarray(scores, dtype=np.float64), np.asarray(real, dtype=bool)
    return {"auroc": auroc(scores, real), "aupr": average_precision(-scores, ~real)}


def metrics(samples: list[dict]) -> dict:
    """AUROC / AUPR per signal at token and mention level. samples: [{"mentions":
    mention_records(...), "signals": the per-token signals given to it}, ...]. A signal
    absent from any sample is skipped, so every reported signal ranks the same examples."""
    real_tok = [not m["hallucinated"] for s in samples for m in s["mentions"] for _ in m["tokens"]]
    real_men = [not m["hallucinated"] for s in samples for m in s["mentions"]]
    out = {"tokens": len(real_tok), "hallucinated_tokens": real_tok.count(False),
           "mentions": len(real_men), "hallucinated_mentions": real_men.count(False),
           "token": {}, "mention": {}}
    for report, (signal, sign) in ORIENTATION.items():
        if not all(signal in s["signals"] for s in samples):
            continue
        per_token, per_mention = [], []
        for s in samples:
            v = np.asarray(s["signals"][signal], dtype=np.float64)
            for m in s["mentions"]:
                per_token.extend(v[m["tokens"]])
                per_mention.append(v[m["tokens"]].mean())
        out["token"][report] = _scores(sign * np.asarray(per_token), real_tok)
        out["mention"][report] = _scores(sign * np.asarray(per_mention), real_men)
    return out
