"""CHAIR (Rohrbach et al., EMNLP 2018, "Object Hallucination in Image Captioning"), with the
semantics of the paper's public code (chair.py, `compute_chair`).

Ground truth of an image: the categories of its instance annotations UNION every object
that the image's reference captions mention (matched with the same matcher as the generated
captions), as the original does. Every matched word of a generated caption counts,
duplicates included ("a dog and another dog" is two mentions), exactly like the original's
list of words. A mention is hallucinated when its category is not in the image's ground
truth.

  CHAIR_s = captions with >= 1 hallucinated mention / captions
  CHAIR_i = hallucinated mentions / all mentions            (over the whole set of captions)

Two matchers find the mentions (`matcher=`):

  "reference" (default) - the original code's `caption_to_words`, quirks included
      (`jaxground.eval.chair_reference`: nltk tokens, pattern's singularize, so "bus" is
      never a mention, "hot-dog" is one token, " motor bike" never matches, ...). Use it
      for numbers comparable with published ones. Also reported, as Maxlinn's chair.py in
      OPERA's repository defines them:
        recall = sum over captions of |categories the caption mentions that are in its
                 image's ground truth| / sum over captions of |ground truth|; ground truth
                 includes the reference-caption objects
        mean_length = mean number of tokens after double-word merging, punctuation tokens
                 included. OPERA stores 0.01 * this as "Len" and prints it x100, i.e. prints
                 this plain mean, which is what is reported here.
  "clean" - `ObjectVocabulary.mentions` (jaxground.data.objects: [a-z]+ words, inflect's
      singular, stripped synonyms), the matcher whose character spans label the training
      data. Also reported:
        recall = sum over captions of |annotated categories mentioned| / sum of |annotated
                 categories|; annotated = instance annotations only, not reference captions
        mean_length = mean number of whitespace-separated words per caption

Also "per_caption": image_id, caption, mentioned / hallucinated as [word, category] pairs
(duplicates kept), gt_objects, chair_s (0/1), chair_i (that caption's ratio, 0 if it
mentions nothing); and "matcher".

  python -m jaxground.eval.chair --captions CAPS.json[l] --coco_dir DIR [--split val2014]
      [--matcher reference|clean]
"""

from __future__ import annotations

import argparse
import json

from jaxground.data.coco import CocoIndex, load_coco
from jaxground.data.objects import ObjectVocabulary, vocabulary_for
from jaxground.eval import chair_reference
from jaxground.eval.chair_reference import ReferenceVocabulary

MATCHERS = ("reference", "clean")


def _check_matcher(matcher: str) -> None:
    if matcher not in MATCHERS:
        raise ValueError(f"matcher {matcher!r} is not one of {list(MATCHERS)}")


def _vocabulary(index: CocoIndex, vocab, matcher: str):
    """The matcher's vocabulary: `vocab` itself when it is of the matcher's kind; under
    "reference" an ObjectVocabulary only says which category set (COCO or its own names) to
    build the original's table for; None means the index's categories."""
    _check_matcher(matcher)
    if matcher == "clean":
        if isinstance(vocab, ReferenceVocabulary):
            raise TypeError("matcher='clean' needs an ObjectVocabulary, not a "
                            "ReferenceVocabulary")
        return vocab or vocabulary_for(index.categories)
    if isinstance(vocab, ReferenceVocabulary):
        return vocab
    return chair_reference.vocabulary_for(vocab.categories if vocab else index.categories)


def _image_key(image_id, index: CocoIndex):
    if image_id in index.present or image_id in index.captions:
        return image_id
    if isinstance(image_id, str) and image_id.strip().isdigit():
        as_int = int(image_id)
        if as_int in index.present or as_int in index.captions:
            return as_int
    raise KeyError(f"image_id {image_id!r} is in neither the instance nor the caption "
                   f"annotations of {index.root}")


def _mentions(text: str, vocab, matcher: str) -> tuple[list[list[str]], int]:
    """([word, category] per mention, caption length in the matcher's units)."""
    if matcher == "clean":
        return [[m.word, m.category] for m in vocab.mentions(text)], len(text.split())
    found = vocab.caption_to_words(text)
    return [list(p) for p in zip(found.words, found.node_words)], len(found.raw_words)


def ground_truth(index: CocoIndex, vocab, image_id,
                 matcher: str = "reference") -> tuple[set, set]:
    """(annotated categories, annotated UNION reference-caption objects) of one image, the
    reference captions read by `matcher` (vocab: as for `score_from_index`)."""
    vocab = _vocabulary(index, vocab, matcher)
    present = index.present.get(image_id, set())
    if matcher == "clean":
        annotated = {vocab.synonyms.get(c, c) for c in present}
    else:
        annotated = {vocab.node_word(c) for c in present}
    from_captions = {category for text in index.captions.get(image_id, [])
                     for _, category in _mentions(text, vocab, matcher)[0]}
    return annotated, annotated | from_captions


def _recall_terms(mentioned: list[list[str]], annotated: set, gt: set,
                  matcher: str) -> tuple[int, int]:
    """(objects recalled, objects to recall) of one caption, per the matcher's definition."""
    categories = {category for _, category in mentioned}
    if matcher == "clean":
        return len(annotated & categories), len(annotated)
    return len(gt & categories), len(gt)


def score_from_index(captions: list[dict], index: CocoIndex, vocab=None,
                     matcher: str = "reference") -> dict:
    """CHAIR for captions [{"image_id", "caption"}, ...] against an in-memory CocoIndex.
    vocab: an ObjectVocabulary (for "reference" it only selects the category set) or a
    `chair_reference.ReferenceVocabulary` (reference only); None = the index's categories."""
    vocab = _vocabulary(index, vocab, matcher)
    cache: dict = {}
    per_caption = []
    n_hall_caps = n_mentions = n_hall = covered = n_to_recall = n_words = 0
    for c in captions:
        key = _image_key(c["image_id"], index)
        if key not in cache:
            cache[key] = ground_truth(index, vocab, key, matcher)
        annotated, gt = cache[key]
        text = c["caption"]
        mentioned, length = _mentions(text, vocab, matcher)
        hallucinated = [[w, cat] for w, cat in mentioned if cat not in gt]
        n_mentions += len(mentioned)
        n_hall += len(hallucinated)
        n_hall_caps += bool(hallucinated)
        recalled, to_recall = _recall_terms(mentioned, annotated, gt, matcher)
        covered += recalled
        n_to_recall += to_recall
        n_words += length
        per_caption.append({"image_id": c["image_id"], "caption": text,
                            "mentioned": mentioned, "hallucinated": hallucinated,
                            "gt_objects": sorted(gt), "chair_s": int(bool(hallucinated)),
                            "chair_i": len(hallucinated) / len(mentioned) if mentioned else 0.0})
    n = len(captions)
    return {"chair_s": n_hall_caps / n if n else 0.0,
            "chair_i": n_hall / n_mentions if n_mentions else 0.0,
            "recall": covered / n_to_recall if n_to_recall else 0.0,
            "mean_length": n_words / n if n else 0.0,
            "num_captions": n, "num_mentions": n_mentions, "num_hallucinated": n_hall,
            "num_hallucinated_captions": n_hall_caps, "matcher": matcher,
            "per_caption": per_caption}


def score(captions: list[dict], coco_dir: str, split: str | None = None,
          matcher: str = "reference") -> dict:
    """CHAIR against the COCO-format folder `coco_dir` (annotations/instances[_split].json
    and captions[_split].json)."""
    _check_matcher(matcher)  # before reading the annotations
    return score_from_index(captions, load_coco(coco_dir, split), matcher=matcher)


def read_captions(path: str) -> list[dict]:
    """A JSON list, a JSON object with a list under "captions"/"annotations", or JSON lines;
    each record needs "image_id" and "caption" (or "text", as answer files write it)."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # JSON lines
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = [data] if "image_id" in data else data.get("captions",
                                                          data.get("annotations", []))
    return [{"image_id": r["image_id"], "caption": r.get("caption", r.get("text", ""))}
            for r in data]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="CHAIR for generated captions.")
    p.add_argument("--captions", required=True)
    p.add_argument("--coco_dir", required=True)
    p.add_argument("--split", default=None, help="e.g. val2014")
    p.add_argument("--matcher", default="reference", choices=MATCHERS,
                   help="reference: the original code's matching, comparable with published "
                        "numbers (default); clean: jaxground's own matcher")
    p.add_argument("--out", default=None, help="write the full result (per caption) as JSON")
    args = p.parse_args(argv)
    result = score(read_captions(args.captions), args.coco_dir, args.split, args.matcher)
    print(f"CHAIR_s {result['chair_s']:.4f}  CHAIR_i {result['chair_i']:.4f}  "
          f"recall {result['recall']:.4f}  length {result['mean_length']:.2f}  "
          f"({result['num_captions']} captions, {args.matcher} matcher)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
