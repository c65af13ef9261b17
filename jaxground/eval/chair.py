"""CHAIR (Rohrbach et al., EMNLP 2018, "Object Hallucination in Image Captioning"), with the
semantics of the paper's public code (chair.py, `compute_chair`).

Ground truth of an image: the categories of its instance annotations UNION every object
that the image's reference captions mention (matched with the same synonym rules as the
generated captions), as the original does.

Per generated caption, the object words are matched left to right (`ObjectVocabulary.mentions`:
singularised words, two-word phrases first, "baby elephant" -> elephant, "toilet seat" ->
toilet, ...). Every matched word counts, duplicates included ("a dog and another dog" is two
mentions), exactly like the original's `mscoco_words` list. A mention is hallucinated when
its category is not in the image's ground truth.

  CHAIR_s = captions with >= 1 hallucinated mention / captions
  CHAIR_i = hallucinated mentions / all mentions            (over the whole set of captions)

Also reported (not in the original):
  recall  = sum over captions of |annotated categories mentioned| / sum of |annotated
            categories|; annotated = instance annotations only, not reference captions
  mean_length = mean number of whitespace-separated words per caption
and "per_caption": image_id, caption, mentioned / hallucinated as [word, category] pairs
(duplicates kept), gt_objects, chair_s (0/1), chair_i (that caption's ratio, 0 if it
mentions nothing).

  python -m jaxground.eval.chair --captions CAPS.json[l] --coco_dir DIR [--split val2014]
"""

from __future__ import annotations

import argparse
import json

from jaxground.data.coco import CocoIndex, load_coco
from jaxground.data.objects import ObjectVocabulary, vocabulary_for


def _image_key(image_id, index: CocoIndex):
    if image_id in index.present or image_id in index.captions:
        return image_id
    if isinstance(image_id, str) and image_id.strip().isdigit():
        as_int = int(image_id)
        if as_int in index.present or as_int in index.captions:
            return as_int
    raise KeyError(f"image_id {image_id!r} is in neither the instance nor the caption "
                   f"annotations of {index.root}")


def ground_truth(index: CocoIndex, vocab: ObjectVocabulary, image_id) -> tuple[set, set]:
    """(annotated categories, annotated UNION reference-caption objects) of one image."""
    annotated = {vocab.synonyms.get(c, c) for c in index.present.get(image_id, set())}
    from_captions = {m.category for text in index.captions.get(image_id, [])
                     for m in vocab.mentions(text)}
    return annotated, annotated | from_captions


def score_from_index(captions: list[dict], index: CocoIndex,
                     vocab: ObjectVocabulary | None = None) -> dict:
    """CHAIR for captions [{"image_id", "caption"}, ...] against an in-memory CocoIndex."""
    vocab = vocab or vocabulary_for(index.categories)
    cache: dict = {}
    per_caption = []
    n_hall_caps = n_mentions = n_hall = covered = n_annotated = n_words = 0
    for c in captions:
        key = _image_key(c["image_id"], index)
        if key not in cache:
            cache[key] = ground_truth(index, vocab, key)
        annotated, gt = cache[key]
        text = c["caption"]
        mentioned = [[m.word, m.category] for m in vocab.mentions(text)]
        hallucinated = [[w, cat] for w, cat in mentioned if cat not in gt]
        n_mentions += len(mentioned)
        n_hall += len(hallucinated)
        n_hall_caps += bool(hallucinated)
        covered += len(annotated & {cat for _, cat in mentioned})
        n_annotated += len(annotated)
        n_words += len(text.split())
        per_caption.append({"image_id": c["image_id"], "caption": text,
                            "mentioned": mentioned, "hallucinated": hallucinated,
                            "gt_objects": sorted(gt), "chair_s": int(bool(hallucinated)),
                            "chair_i": len(hallucinated) / len(mentioned) if mentioned else 0.0})
    n = len(captions)
    return {"chair_s": n_hall_caps / n if n else 0.0,
            "chair_i": n_hall / n_mentions if n_mentions else 0.0,
            "recall": covered / n_annotated if n_annotated else 0.0,
            "mean_length": n_words / n if n else 0.0,
            "num_captions": n, "num_mentions": n_mentions, "num_hallucinated": n_hall,
            "num_hallucinated_captions": n_hall_caps,
            "per_caption": per_caption}


def score(captions: list[dict], coco_dir: str, split: str | None = None) -> dict:
    """CHAIR against the COCO-format folder `coco_dir` (annotations/instances[_split].json
    and captions[_split].json)."""
    return score_from_index(captions, load_coco(coco_dir, split))


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
    p.add_argument("--out", default=None, help="write the full result (per caption) as JSON")
    args = p.parse_args(argv)
    result = score(read_captions(args.captions), args.coco_dir, args.split)
    print(f"CHAIR_s {result['chair_s']:.4f}  CHAIR_i {result['chair_i']:.4f}  "
          f"recall {result['recall']:.4f}  length {result['mean_length']:.2f}  "
          f"({result['num_captions']} captions)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
