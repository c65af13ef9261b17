"""Finding object mentions in text, with character spans, the way CHAIR does.

CHAIR (Rohrbach et al., EMNLP 2018) maps caption words to the 80 MSCOCO categories through a
synonym list, after singularising each word, with two-word phrases matched first ("fire
hydrant", "motor bike") and a few special cases ("baby elephant" is an elephant, not a
person; "passenger train" a train; "toilet seat" is a toilet, not a chair). This module keeps
the character span of every mention, so the data pipeline can label exactly those tokens.
The synonym list is `chair_synonyms.txt` (from the paper's public code, BSD 2-Clause).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import inflect

SYNONYMS_FILE = os.path.join(os.path.dirname(__file__), "chair_synonyms.txt")

# CHAIR's lists (the original also lists "hot dog" and "teddy bear" twice, and "stove top
# oven", three words, which pair merging never produces; same table).
_DOUBLE_WORDS = ["motor bike", "motor cycle", "air plane", "traffic light", "street light",
                 "traffic signal", "stop light", "fire hydrant", "stop sign", "parking meter",
                 "suit case", "sports ball", "baseball bat", "baseball glove", "tennis racket",
                 "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear",
                 "hair drier", "potted plant", "bow tie", "laptop computer", "stove top oven",
                 "home plate", "train track"]
_ANIMALS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
            "giraffe", "animal", "cub"]
_VEHICLES = ["jet", "train"]
# Words inflect would wrongly singularise ("glass" -> "glas" is CHAIR's own quirk too).
_KEEP = {"glass", "bus", "grass", "cross", "is", "this", "was", "has", "as", "its", "his",
         "us", "yes", "class", "dress", "species", "scissors", "sheep", "skis", "ski", "gas",
         "bos", "ous", "les", "mrs", "dos"}
_WORD = re.compile(r"[a-z]+")
# Words describing an object's look ("a red car"). With attribute labelling, a mention's
# grounding label also covers the attribute words right before it, and their article: a model
# names an object's colour before the object, and English makes it choose "an" before "an
# orange ring" even earlier, so that is where it can be told (and guided) not to.
ATTRIBUTE_WORDS = frozenset(
    "red green blue yellow purple orange cyan pink white black brown gray grey silver gold "
    "small large big little tall wooden metal".split())
ARTICLES = frozenset({"a", "an"})
_TRAILING_WORD = re.compile(r"([a-z]+)\s+$")


def attribute_start(text: str, start: int) -> int:
    """Where the noun phrase before position `start` begins: the run of attribute words right
    before it and the article before them (`start` itself when there is none): "a big red
    car" with start at "car" -> start of "a"."""
    lowered = text.lower()
    while (m := _TRAILING_WORD.search(lowered, 0, start)) and m.group(1) in ATTRIBUTE_WORDS:
        start = m.start(1)
    if (m := _TRAILING_WORD.search(lowered, 0, start)) and m.group(1) in ARTICLES:
        start = m.start(1)
    return start


def chair_double_words() -> dict[str, str]:
    """CHAIR's hard-coded two-word rules (the original's `double_word_dict`): phrase ->
    the word it counts as ("baby elephant" -> elephant, "passenger jet" -> jet)."""
    double = {d: d for d in _DOUBLE_WORDS}
    for animal in _ANIMALS:
        double[f"baby {animal}"] = animal
        double[f"adult {animal}"] = animal
    for vehicle in _VEHICLES:
        double[f"passenger {vehicle}"] = vehicle
    double["bow tie"] = "tie"
    double["toilet seat"] = "toilet"
    double["wine glas"] = "wine glass"
    return double


@dataclass(frozen=True)
class Mention:
    start: int      # character span in the original text
    end: int
    word: str       # the (singular) word or phrase as matched
    category: str   # the category it names


@functools.lru_cache(maxsize=None)
def _engine():
    return inflect.engine()


def singular(word: str) -> str:
    if word in _KEEP or len(word) <= 2:
        return word
    s = _engine().singular_noun(word)
    return s if s else word


class ObjectVocabulary:
    """synonym -> category, plus CHAIR's two-word rules."""

    def __init__(self, synonyms: dict[str, str], double_words: dict[str, str] | None = None):
        self.synonyms = synonyms
        self.categories = sorted(set(synonyms.values()))
        self.double_words = dict(double_words or {})

    @classmethod
    def coco(cls, path: str = SYNONYMS_FILE) -> "ObjectVocabulary":
        synonyms = {}
        with open(path) as f:
            for line in f:
                words = [w.strip() for w in line.strip().split(",") if w.strip()]
                if words:
                    for w in words:
                        synonyms.setdefault(w, words[0])
        return cls(synonyms, chair_double_words())

    @classmethod
    def from_categories(cls, names: list[str]) -> "ObjectVocabulary":
        """Each category is named by itself (the shapes world)."""
        return cls({n.lower(): n for n in names},
                   {n.lower(): n.lower() for n in names if " " in n})

    def mentions(self, text: str) -> list[Mention]:
        """Every object mention in `text`, left to right."""
        words = [(m.start(), m.end(), singular(m.group())) for m in _WORD.finditer(text.lower())]
        merged, i = [], 0
        while i < len(words):
            if i + 1 < len(words):
                pair = f"{words[i][2]} {words[i + 1][2]}"
                if pair in self.double_words:
                    merged.append((words[i][0], words[i + 1][1], self.double_words[pair]))
                    i += 2
                    continue
            merged.append(words[i])
            i += 1
        has_toilet = any(w == "toilet" for _, _, w in merged)
        out = []
        for start, end, w in merged:
            if has_toilet and w == "seat":  # "the seat of the toilet" is not a chair
                continue
            if w in self.synonyms:
                out.append(Mention(start, end, w, self.synonyms[w]))
        return out


def vocabulary_for(categories: list[str]) -> ObjectVocabulary:
    """CHAIR's synonyms for MSCOCO's categories, the names themselves otherwise."""
    coco = ObjectVocabulary.coco()
    if set(categories) <= set(coco.categories):
        return coco
    return ObjectVocabulary.from_categories(categories)


def token_ids(tokenizer, vocab: ObjectVocabulary, attributes: bool = False) -> list[int]:
    """Ids of every token that spells part of an object word (singular or plural, with and
    without a leading space), plus attribute words if asked: what grounding guidance and
    flagging look at. Subword tokenizers make this a superset (pieces shared with other
    words are included)."""
    ids = set()
    words = set(vocab.synonyms) | set(vocab.double_words)
    if attributes:
        ids.update(i for w in ATTRIBUTE_WORDS | ARTICLES for text in (w, " " + w)
                   for i in tokenizer(text, add_special_tokens=False)["input_ids"])
    for w in words:
        for form in {w, _engine().plural_noun(w) or w}:
            for text in (form, " " + form):
                ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(ids - set(tokenizer.all_special_ids))
