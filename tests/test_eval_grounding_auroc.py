"""Grounding-score AUROC: ranking metrics against hand-worked numbers and brute force, token
spans with word-level, SentencePiece-like and byte-level tokenizers, and mention labels
and per-signal metrics on a hand-made caption."""

import itertools
import json
import math

import numpy as np
import pytest
from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxground.data.objects import vocabulary_for
from jaxground.data.processor import load_tokenizer
from jaxground.data.shapes import train_tokenizer
from jaxground.eval.grounding_auroc import (auroc, average_precision, mention_records, metrics,
                                            token_spans)

CORPUS = ["a dog and a cat near a fire hydrant", "a dog on a sofa", "the cat and the dog"]


# --- ranking metrics -------------------------------------------------------------------

def test_auroc_hand_worked():
    # positives {0.9, 0.8}, negatives {0.8, 0.3}: pairs 0.9>0.8, 0.9>0.3, 0.8=0.8 (1/2),
    # 0.8>0.3 -> 3.5 / 4
    assert auroc([0.9, 0.8, 0.8, 0.3], [1, 0, 1, 0]) == pytest.approx(0.875)
    assert auroc([0.9, 0.8, 0.8, 0.3], [True, False, True, False]) == pytest.approx(0.875)
    # all tied: every pair half a win
    assert auroc([0.5] * 4, [1, 0, 1, 0]) == pytest.approx(0.5)
    # perfectly wrong ordering
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    # positive {2}, negatives {1, 2, 3}: 1 + 0.5 + 0 over 3
    assert auroc([1, 2, 3, 2], [0, 0, 0, 1]) == pytest.approx(1.5 / 3)


def test_average_precision_hand_worked():
    # thresholds 0.9: tp 1 fp 0 (P 1, R 1/2); 0.8 (both tied scores at once): tp 2 fp 1
    # (P 2/3, R 1); 0.3: R unchanged -> 1/2 * 1 + 1/2 * 2/3
    assert average_precision([0.9, 0.8, 0.8, 0.3], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # tie at the top: 0.8: tp 1 fp 1 (P 1/2, R 1/2); 0.3: tp 2 fp 1 (P 2/3, R 1)
    # -> 1/2 * 1/2 + 1/2 * 2/3 = 7/12 (breaking the tie positive-first would give 5/6)
    assert average_precision([0.8, 0.8, 0.3], [0, 1, 1]) == pytest.approx(7 / 12)
    # sklearn's docstring example
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(5 / 6)
    # no negatives: precision 1 everywhere
    assert average_precision([0.2, 0.7], [1, 1]) == pytest.approx(1.0)


def test_empty_classes_are_nan():
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    assert math.isnan(auroc([0.1, 0.2], [0, 0]))
    assert math.isnan(auroc([], []))
    assert math.isnan(average_precision([0.1, 0.2], [0, 0]))
    assert not math.isnan(auroc([0.1, 0.2], [0, 1]))


def test_bad_labels_are_refused():
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError):
        average_precision([0.1, 0.2, 0.3], [0, 1])


def _auroc_pairs(s, y):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)])


def _ap_thresholds(s, y):
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        chosen = s >= t
        recall = (y[chosen] == 1).sum() / (y == 1).sum()
        ap += (recall - prev_recall) * (y[chosen] == 1).mean()
        prev_recall = recall
    return ap


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    s = rng.integers(0, 6, n).astype(float)  # few distinct values: many ties
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    assert auroc(s, y) == pytest.approx(_auroc_pairs(s, y))
    assert average_precision(s, y) == pytest.approx(_ap_thresholds(s, y))
    s = rng.normal(size=n)
    assert auroc(s, y) == pytest.approx(_auroc_pairs(s, y))
    assert average_precision(s, y) == pytest.approx(_ap_thresholds(s, y))


# --- token spans -----------------------------------------------------------------------

def _word_level(tmp_path, texts):
    """The shapes world's tokenizer (WordLevel, Lowercase) as the pipeline loads it."""
    train_tokenizer(texts).save(str(tmp_path / "tokenizer.json"))
    return load_tokenizer(str(tmp_path))


def _byte_level():
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 3, vocab_size=280, min_frequency=1,
                            special_tokens=["<unk>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>",
                                   unk_token="<unk>")


def _metaspace():
    """SentencePiece-like: "▁"-prefixed BPE pieces, the first one's space dropped on decode."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=35, min_frequency=1, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def _check_spans(text, spans):
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(s <= e for s, e in spans)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))   # contiguous, monotonic
    assert "".join(text[s:e] for s, e in spans) == text


def _covering(spans, start, end):
    return [k for k, (s, e) in enumerate(spans) if s < e and s < end and start < e]


def test_token_spans_word_level(tmp_path):
    tok = _word_level(tmp_path, ["A red circle next to a blue square"])
    ids = ([tok.convert_tokens_to_ids("<image>")]
           + tok.encode("A red circle next to a blue square", add_special_tokens=False)
           + [tok.eos_token_id])
    text, spans = token_spans(tok, ids)
    assert text == "a red circle next to a blue square"    # the normaliser lowercases
    _check_spans(text, spans)
    assert spans[0] == (0, 0) and spans[-1] == (len(text), len(text))  # specials: no text
    assert [text[s:e] for s, e in spans[1:-1]] == [
        "a", " red", " circle", " next", " to", " a", " blue", " square"]


@pytest.mark.parametrize("make", [_byte_level, _metaspace])
def test_token_spans_subword(make):
    tok = make()
    text_in = "a dog near a fire hydrant"
    ids = tok.encode(text_in, add_special_tokens=False) + [tok.eos_token_id]
    text, spans = token_spans(tok, ids)
    assert text == text_in
    _check_spans(text, spans)
    assert spans[-1] == (len(text), len(text))
    start = text.index("hydrant")
    pieces = _covering(spans, start, start + len("hydrant"))
    assert len(pieces) > 1                                   # the word is split ...
    covered = "".join(text[spans[k][0]:spans[k][1]] for k in pieces)
    assert covered.strip() == "hydrant"                      # ... and its pieces cover it
    assert spans[pieces[0]][0] <= start and spans[pieces[-1]][1] == start + len("hydrant")


def test_token_spans_partial_utf8():
    # "🐶" and "é" are not in the byte-level vocabulary: one token per UTF-8 byte, and a
    # prefix ending mid-character decodes to "\ufffd"
    tok = _byte_level()
    ids = tok.encode("a dog 🐶 café", add_special_tokens=False)
    text, spans = token_spans(tok, ids)
    assert text == "a dog 🐶 café"
    _check_spans(text, spans)
    assert "\ufffd" not in "".join(text[s:e] for s, e in spans)
    dog = _covering(spans, text.index("🐶"), text.index("🐶") + 1)
    assert len(dog) == 1 and text[slice(*spans[dog[0]])] == "🐶"
    assert [spans[k][0] == spans[k][1] for k in range(dog[0] - 3, dog[0])] == [True] * 3
    e = _covering(spans, text.index("é"), len(text))
    assert len(e) == 1 and text[slice(*spans[e[0]])] == "é"


class _Rewriting:
    """A decoder whose longer prefix rewrites earlier text ("ab" -> "a" -> "abc")."""
    _prefixes = {1: "ab", 2: "a", 3: "abc"}

    def decode(self, ids, skip_special_tokens=False):
        return self._prefixes[len(ids)]


def test_token_spans_stay_monotonic_when_a_prefix_rewrites():
    text, spans = token_spans(_Rewriting(), [7, 8, 9])
    assert text == "abc" and spans == [(0, 2), (2, 2), (2, 3)]


# --- mention records and metrics -------------------------------------------------------

CAPTION = "a dog and a cat near a fire hydrant"
TRUTH = {"dog", "fire hydrant"}
# token:           a    dog   and   a   cat   near   a   fire hydrant </s>
GROUNDING = [9.0, 0.9, 9.0, 9.0, 0.5, 9.0, 9.0, 0.6, 0.4, 9.0]
LOGPROB = [-9.0, -0.1, -9.0, -9.0, -2.0, -9.0, -9.0, -0.5, -3.0, -9.0]
ENTROPY = [9.0, 0.2, 9.0, 9.0, 1.0, 9.0, 9.0, 1.0, 0.4, 9.0]
SIGNALS = {"grounding": GROUNDING, "logprob": LOGPROB, "entropy": ENTROPY}


def _caption_sample(tmp_path):
    tok = _word_level(tmp_path, [CAPTION])
    ids = tok.encode(CAPTION, add_special_tokens=False) + [tok.eos_token_id]
    text, spans = token_spans(tok, ids)
    assert text == CAPTION and len(spans) == len(GROUNDING)
    vocab = vocabulary_for(["dog", "cat", "fire hydrant"])
    return {"mentions": mention_records(text, spans, vocab, TRUTH, SIGNALS), "signals": SIGNALS}


def test_mention_records(tmp_path):
    records = _caption_sample(tmp_path)["mentions"]
    assert [(r["word"], r["category"], r["tokens"], r["hallucinated"]) for r in records] == [
        ("dog", "dog", [1], False), ("cat", "cat", [4], True),
        ("fire hydrant", "fire hydrant", [7, 8], False)]
    assert (records[2]["start"], records[2]["end"]) == (23, 35)
    # a multi-token mention gets its tokens' means
    assert records[2]["grounding"] == pytest.approx(0.5)
    assert records[2]["logprob"] == pytest.approx(-1.75)
    assert records[2]["entropy"] == pytest.approx(0.7)
    assert (records[0]["grounding"], records[1]["grounding"]) == (0.9, 0.5)


def test_mention_records_subword_and_duplicates():
    tok = _byte_level()
    # an EOS inside the mention adds no text, so it is none of the mention's tokens
    ids = (tok.encode("a dog and a dog near a fire", add_special_tokens=False)
           + [tok.eos_token_id] + tok.encode(" hydrant", add_special_tokens=False))
    eos = ids.index(tok.eos_token_id)
    text, spans = token_spans(tok, ids)
    assert text == "a dog and a dog near a fire hydrant"
    signal = np.arange(len(ids), dtype=float)
    records = mention_records(text, spans, vocabulary_for(["dog", "fire hydrant"]),
                              {"fire hydrant"}, {"grounding": signal})
    assert [(r["word"], r["hallucinated"]) for r in records] == [
        ("dog", True), ("dog", True), ("fire hydrant", False)]
    hydrant = records[2]["tokens"]
    assert len(hydrant) > 2 and eos not in hydrant
    assert hydrant == [k for k in range(hydrant[0], hydrant[-1] + 1) if k != eos]
    assert "".join(text[slice(*spans[k])] for k in hydrant).strip() == "fire hydrant"
    assert records[2]["grounding"] == pytest.approx(np.mean(hydrant))
    with pytest.raises(ValueError):
        mention_records(text, spans, vocabulary_for(["dog"]), set(), {"grounding": [0.0]})


def test_metrics_hand_worked(tmp_path):
    sample = _caption_sample(tmp_path)
    empty = {"mentions": [], "signals": {k: [] for k in SIGNALS}}    # mentions nothing
    out = metrics([sample, empty])
    assert (out["tokens"], out["hallucinated_tokens"]) == (4, 1)
    assert (out["mentions"], out["hallucinated_mentions"]) == (3, 1)
    # token examples (real: dog, fire, hydrant; hallucinated: cat)
    tok, men = out["token"], out["mention"]
    # grounding real {0.9, 0.6, 0.4} vs 0.5: 2 of 3 pairs won
    assert tok["grounding"]["auroc"] == pytest.approx(2 / 3)
    # detecting by -grounding: hydrant (real) first: P 0, R 0; then cat: P 1/2, R 1
    assert tok["grounding"]["aupr"] == pytest.approx(0.5)
    # logprob real {-0.1, -0.5, -3.0} vs -2.0: 2 of 3; NLL 3.0 (real) ranks above 2.0 (cat)
    assert tok["nll"]["auroc"] == pytest.approx(2 / 3)
    assert tok["nll"]["aupr"] == pytest.approx(0.5)
    # -entropy real {-0.2, -1.0, -0.4} vs -1.0: 1 + 1/2 + 1 over 3; entropy 1.0 is a tie of
    # cat and fire: one threshold with P 1/2, R 1
    assert tok["entropy"]["auroc"] == pytest.approx(2.5 / 3)
    assert tok["entropy"]["aupr"] == pytest.approx(0.5)
    # mention means: dog 0.9 / -0.1 / 0.2, fire hydrant 0.5 / -1.75 / 0.7, cat 0.5 / -2 / 1
    assert men["grounding"]["auroc"] == pytest.approx(1.5 / 2)   # 0.9 > 0.5, 0.5 = 0.5
    assert men["grounding"]["aupr"] == pytest.approx(0.5)        # cat tied with the hydrant
    assert men["nll"] == {"auroc": 1.0, "aupr": 1.0}             # cat least likely
    assert men["entropy"] == {"auroc": 1.0, "aupr": 1.0}         # cat most uncertain
    json.dumps(out)


def test_metrics_skips_missing_signals_and_empty_classes(tmp_path):
    sample = _caption_sample(tmp_path)
    real_only = dict(sample, mentions=[m for m in sample["mentions"] if not m["hallucinated"]],
                     signals={"grounding": GROUNDING})
    out = metrics([real_only])
    assert list(out["token"]) == list(out["mention"]) == ["grounding"]
    assert out["hallucinated_mentions"] == 0
    assert math.isnan(out["token"]["grounding"]["auroc"])
    assert math.isnan(out["mention"]["grounding"]["aupr"])
    json.dumps(out)
