"""CHAIR's word matching exactly as the original code does it, quirks included.

Published CHAIR numbers (Rohrbach et al. 2018; OPERA, VCD, HALVA, ... reuse the code) come
from LisaAnne/Hallucination `utils/chair.py`, `CHAIR.caption_to_words`. To be comparable
with them this module reproduces that function step by step, with the same libraries:

1. tokens = `nltk.word_tokenize(caption.lower())`, so "hot-dog", "tie-dye" and "cups/mugs"
   stay single tokens (and match nothing);
2. each token goes through `pattern.en.singularize`, whose rules give "bus" -> "bu",
   "ties" -> "ty", "canoes" -> "cano", "glass" -> "glas": those words are never mentions
   ("buses" -> "bus" is one; "wine glass" -> "wine glas" is mapped back by rule 3);
3. two consecutive tokens found in the double-word table are merged, left to right
   ("fire hydrant", "baby elephant" -> elephant, "wine glas" -> wine glass, ...);
4. "seat" is dropped when "toilet" is in the caption ("the seat of the toilet");
5. the words found among the synonyms are the mentions; each maps to its line's first
   entry (the category, the "node word"). The synonym lines are split on ", " WITHOUT
   stripping, so the entries " motor bike" and " cheesecake" (the file has two spaces
   there) carry a leading space and never match.

`word_tokenize` splits sentences with NLTK's trained English Punkt model, a data download
we cannot rely on. Here sentences are split by an untrained `PunktSentenceTokenizer` (no
data), then each is tokenized by `NLTKWordTokenizer`, which is what `word_tokenize` runs per
sentence. The split matters: the word tokenizer only separates a "." at the very end of its
input, so "a table. There ..." would leave "table." unmatched. The one known difference:
the trained model knows abbreviations ("mr.", "st.", "dr.", ...) and does not end a
sentence after them; the untrained one does, and then splits the "." off ("mr", "."). Object
words are unaffected, except a word right after such an abbreviation cannot be merged with
the abbreviation into a double word (no COCO double word starts with an abbreviation), and
the token count (mean length) is one higher per such abbreviation.

`pattern.en`'s package __init__ tries to download WordNet, so only its inflect module is
loaded, by file path. Nothing here touches the network.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
from dataclasses import dataclass

from jaxground.data.objects import SYNONYMS_FILE, chair_double_words


@functools.lru_cache(maxsize=None)
def _pattern_inflect():
    """pattern.en's inflect module, loaded by file path: importing `pattern.en` itself runs
    its package __init__, which downloads WordNet (fails offline)."""
    import pattern

    path = os.path.join(os.path.dirname(pattern.__file__), "text", "en", "inflect.py")
    spec = importlib.util.spec_from_file_location("_pattern_en_inflect", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1 << 16)
def singularize(word: str) -> str:
    """`pattern.en.singularize`, the original's singularizer ("bus" -> "bu")."""
    return _pattern_inflect().singularize(word)


@functools.lru_cache(maxsize=None)
def _tokenizers():
    """(sentence splitter, word tokenizer). Untrained Punkt: needs no downloaded data."""
    from nltk.tokenize.destructive import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(), NLTKWordTokenizer()


def tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize(text)` without the trained Punkt model (see the module doc)."""
    sentences, words = _tokenizers()
    return [token for sentence in sentences.tokenize(text) for token in words.tokenize(sentence)]


@dataclass(frozen=True)
class CaptionWords:
    """What the original's `caption_to_words` returns (without the indices)."""
    words: list[str]        # the matched words, after merging ("motorbike", "wine glass")
    node_words: list[str]   # their categories, one per word (duplicates kept)
    raw_words: list[str]    # every token after double-word merging (punctuation included)


class ReferenceVocabulary:
    """The original's `mscoco_objects`, `inverse_synonym_dict` and `double_word_dict`."""

    def __init__(self, inverse_synonyms: dict[str, str], double_words: dict[str, str]):
        self.inverse_synonyms = dict(inverse_synonyms)
        self.objects = frozenset(self.inverse_synonyms)
        self.double_words = dict(double_words)
        self.categories = sorted(set(self.inverse_synonyms.values()))

    @classmethod
    def coco(cls, path: str = SYNONYMS_FILE) -> "ReferenceVocabulary":
        """The synonym file split as the original splits it (no per-entry strip; for a
        word on several lines the last line would win, as in the original)."""
        with open(path) as f:
            lines = [line.strip().split(", ") for line in f.readlines()]
        inverse = {}
        for synonyms in lines:
            for s in synonyms:
                inverse[s] = synonyms[0]
        return cls(inverse, chair_double_words())

    @classmethod
    def from_categories(cls, names: list[str]) -> "ReferenceVocabulary":
        """Each category names itself (the shapes world). A name is registered both as
        written and as the singularizer leaves it, since captions are singularized and
        pattern mangles some singular nouns ("cross" -> "cros"; "crosses" -> "cross").
        Two-word names go to the double-word table under every combination of those forms
        ("traffic cones" -> "traffic cone"). Longer names raise: the pair merging of the
        original could never match them."""
        inverse, double = {}, {}
        for name in names:
            tokens = tokenize(name.lower())
            if len(tokens) > 2:
                raise ValueError(f"category {name!r} has {len(tokens)} words; CHAIR's "
                                 "reference matcher merges at most two (use matcher='clean')")
            forms = [dict.fromkeys([t, singularize(t)]) for t in tokens]
            keys = [" ".join(combo) for combo in itertools.product(*forms)]
            if len(tokens) == 2:
                double.update({k: name.lower() for k in keys})
                keys = [name.lower()]
            inverse[name.lower()] = name
            for k in keys:
                inverse.setdefault(k, name)
        return cls(inverse, double)

    def node_word(self, category: str) -> str:
        """The node word of an annotated category name (the name itself for COCO)."""
        return self.inverse_synonyms.get(category, category)

    def _merge_double_words(self, words: list[str]) -> list[str]:
        merged, i = [], 0
        while i < len(words):
            pair = " ".join(words[i:i + 2])
            if pair in self.double_words:
                merged.append(self.double_words[pair])
                i += 2
            else:
                merged.append(words[i])
                i += 1
        return merged

    def caption_to_words(self, caption: str) -> CaptionWords:
        """The original's `caption_to_words`, step for step."""
        words = [singularize(w) for w in tokenize(caption.lower())]
        raw_words = self._merge_double_words(words)
        words = raw_words
        if "toilet" in words and "seat" in words:
            words = [w for w in words if w != "seat"]
        words = [w for w in words if w in self.objects]
        return CaptionWords(words, [self.inverse_synonyms[w] for w in words], raw_words)


@functools.lru_cache(maxsize=None)
def _coco_vocabulary() -> ReferenceVocabulary:
    return ReferenceVocabulary.coco()


@functools.lru_cache(maxsize=64)
def _vocabulary_for(categories: tuple[str, ...]) -> ReferenceVocabulary:
    coco = _coco_vocabulary()
    if set(categories) <= set(coco.categories):
        return coco
    return ReferenceVocabulary.from_categories(list(categories))


def vocabulary_for(categories) -> ReferenceVocabulary:
    """The original's synonym table for MSCOCO categories, the names themselves otherwise
    (the same choice as `jaxground.data.objects.vocabulary_for`). Cached per category set."""
    return _vocabulary_for(tuple(sorted(categories)))
