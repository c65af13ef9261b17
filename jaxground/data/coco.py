"""Grounding records from any COCO-format folder (real COCO 2014, or the shapes world).

For every caption: the positive record, plus negatives in which one present object is
replaced by an absent one, or an absent one is inserted. Every object mention carries its
character span and a label: 1 if its category is in the image's annotations, 0 if not.
Absent objects are drawn as POPE samples them: "random", "popular" (the most frequent
categories of the corpus), "adversarial" (the categories that co-occur most with what is
in the image). Also POPE-style yes/no questions for the same strategies.

  python -m jaxground.data.coco --coco_dir DIR --out FILE.jsonl [--strategy random,popular]

Record fields: id, pair_id, kind ("caption" | "question"), image (path relative to the
COCO dir), image_id, text, label ("positive" | "negative"), strategy, edit ("none" |
"replace" | "insert"), spans [[start, end, 1|0, category], ...]; questions add object and
answer ("yes" | "no").
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import random
from dataclasses import dataclass, field

from jaxground.data.objects import ObjectVocabulary, attribute_start, singular, vocabulary_for
from jaxground.utils.jsonl import write_jsonl

STRATEGIES = ("random", "popular", "adversarial")
_POPULAR_POOL = 3  # "popular" draws among the most frequent absent categories


@dataclass
class CocoIndex:
    root: str
    image_dir: str
    images: dict[int, dict]
    present: dict[int, set[str]]
    captions: dict[int, list[str]]
    categories: list[str]
    frequency: collections.Counter = field(default_factory=collections.Counter)
    cooccur: dict[str, collections.Counter] = field(default_factory=dict)

    def image_path(self, image_id: int) -> str:
        return os.path.relpath(os.path.join(self.image_dir, self.images[image_id]["file_name"]),
                               self.root)


def _find(root: str, pattern: str, split: str | None) -> str:
    want = f"{pattern}_{split}.json" if split else f"{pattern}*.json"
    hits = sorted(glob.glob(os.path.join(root, "annotations", want)))
    if not hits:
        raise FileNotFoundError(f"no annotations/{want} in {root} (a COCO-format folder has "
                                f"annotations/{pattern}[_<split>].json)")
    if len(hits) > 1:
        raise ValueError(f"several {pattern} files in {root}/annotations "
                         f"({[os.path.basename(h) for h in hits]}); pass --split")
    return hits[0]


def load_coco(root: str, split: str | None = None) -> CocoIndex:
    with open(_find(root, "instances", split)) as f:
        instances = json.load(f)
    with open(_find(root, "captions", split)) as f:
        captions_json = json.load(f)
    names = {c["id"]: c["name"] for c in instances["categories"]}
    images = {im["id"]: im for im in instances["images"]}
    present: dict[int, set[str]] = {i: set() for i in images}
    for a in instances["annotations"]:
        present[a["image_id"]].add(names[a["category_id"]])
    captions: dict[int, list[str]] = collections.defaultdict(list)
    for a in captions_json["annotations"]:
        captions[a["image_id"]].append(a["caption"].strip())
    image_dir = next((d for d in (os.path.join(root, "images"),
                                  os.path.join(root, split or "__none__"), root)
                      if os.path.isdir(d)), root)
    frequency = collections.Counter(c for objs in present.values() for c in objs)
    cooccur = {c: collections.Counter() for c in names.values()}
    for objs in present.values():
        for a in objs:
            cooccur[a].update(b for b in objs if b != a)
    return CocoIndex(root, image_dir, images, present, dict(captions),
                     sorted(names.values()), frequency, cooccur)


def absent_objects(index: CocoIndex, image_id: int, strategy: str, rng: random.Random,
                   k: int = 1) -> list[str]:
    """k categories absent from the image, chosen by `strategy`."""
    here = index.present[image_id]
    absent = [c for c in index.categories if c not in here]
    if not absent:
        return []
    if strategy == "random":
        return rng.sample(absent, min(k, len(absent)))
    if strategy == "popular":
        ranked = sorted(absent, key=lambda c: (-index.frequency[c], c))
    elif strategy == "adversarial":
        score = collections.Counter()
        for c in here:
            score.update(index.cooccur[c])
        ranked = sorted(absent, key=lambda c: (-score[c], -index.frequency[c], c))
    else:
        raise ValueError(f"strategy {strategy!r} is not one of {list(STRATEGIES)}")
    if k == 1:  # one negative per caption: some variety among the top few
        return [rng.choice(ranked[:_POPULAR_POOL])]
    return ranked[:k]


def labelled_spans(text: str, present: set[str], vocab: ObjectVocabulary,
                   attributes: bool = False) -> list[list]:
    """[start, end, 1 (present) | 0 (absent), category] per mention; with `attributes` the
    span starts at the attribute words before the mention ("red car")."""
    return [[attribute_start(text, m.start) if attributes else m.start, m.end,
             int(m.category in present), m.category] for m in vocab.mentions(text)]


def _article_fixed(text: str, start: int, word: str) -> tuple[str, int]:
    """Makes the article before position `start` agree with `word` ("a" <-> "an")."""
    before = text[:start]
    stripped = before.rstrip()
    for old in ("a", "an"):
        if stripped.lower().endswith(" " + old) or stripped.lower() == old:
            new = "an" if word[0] in "aeiou" else "a"
            if old != new:
                cut = len(stripped) - len(old)
                new = new.capitalize() if stripped[cut].isupper() else new
                fixed = stripped[:cut] + new + before[len(stripped):]
                return fixed + text[start:], len(fixed)
    return text, start


def replace_mention(text: str, mention, new_category: str) -> str:
    """The caption with one mention replaced by `new_category` (number and article kept)."""
    from jaxground.data.objects import _engine

    original = text[mention.start:mention.end].lower()
    plural = singular(original.split()[-1]) != original.split()[-1]
    word = _engine().plural(new_category) if plural else new_category
    replaced = text[:mention.start] + word + text[mention.end:]
    fixed, _ = _article_fixed(replaced, mention.start, word)
    return fixed


def insert_mention(text: str, new_category: str) -> str:
    """'a man on a bike.' -> 'a man on a bike and a dog.'"""
    body = text.rstrip()
    end = body.rstrip(" .!")
    article = "an" if new_category[0] in "aeiou" else "a"
    return f"{end} and {article} {new_category}{body[len(end):] or ''}"


def caption_records(index: CocoIndex, vocab: ObjectVocabulary, strategies, rng,
                    insert: bool = True, attributes: bool = False):
    """Each reference caption (positive) and its edits naming an absent object (negatives).
    Attribute words are labelled in positives only: an edit keeps the replaced object's
    attributes ("a red circle" -> "a red star"), which still describe something present."""
    for image_id in sorted(index.captions):
        present = index.present.get(image_id, set())
        for ci, text in enumerate(index.captions[image_id]):
            pair = f"{image_id}_{ci}"
            base = dict(image=index.image_path(image_id), image_id=image_id, kind="caption",
                        pair_id=pair)
            yield {**base, "id": f"{pair}_pos", "text": text, "label": "positive",
                   "strategy": "none", "edit": "none",
                   "spans": labelled_spans(text, present, vocab, attributes)}
            real = [m for m in vocab.mentions(text) if m.category in present]
            for strategy in strategies:
                absent = absent_objects(index, image_id, strategy, rng)
                if not absent:
                    continue
                edits = []
                if real:
                    edits.append(("replace", replace_mention(text, rng.choice(real), absent[0])))
                if insert:
                    edits.append(("insert", insert_mention(text, absent[0])))
                for edit, new in edits:
                    yield {**base, "id": f"{pair}_{strategy}_{edit}", "text": new,
                           "label": "negative", "strategy": strategy, "edit": edit,
                           "spans": labelled_spans(new, present, vocab)}


def question_records(index: CocoIndex, vocab: ObjectVocabulary, strategies, rng,
                     per_image: int = 3):
    """POPE: per image, `per_image` present objects (yes) and as many absent ones (no)."""
    for image_id in sorted(index.present):
        present = index.present[image_id]
        yes = rng.sample(sorted(present), min(per_image, len(present)))
        for strategy in strategies:
            no = absent_objects(index, image_id, strategy, rng, k=len(yes))
            for obj, answer in [(o, "yes") for o in yes] + [(o, "no") for o in no]:
                article = "an" if obj[0] in "aeiou" else "a"
                text = f"Is there {article} {obj} in the image?"
                yield {"id": f"q_{image_id}_{strategy}_{obj.replace(' ', '_')}",
                       "question_id": f"{image_id}_{strategy}_{obj.replace(' ', '_')}",
                       "pair_id": f"q_{image_id}_{strategy}", "kind": "question",
                       "image": index.image_path(image_id), "image_id": image_id,
                       "text": text, "object": obj, "answer": answer,
                       "label": "positive" if answer == "yes" else "negative",
                       "strategy": strategy, "edit": "none",
                       "spans": labelled_spans(text, present, vocab)}


def build_records(coco_dir: str, strategies=STRATEGIES, kinds=("caption", "question"),
                  split: str | None = None, seed: int = 0, insert: bool = True,
                  attributes: bool = False) -> list[dict]:
    index = load_coco(coco_dir, split)
    vocab = vocabulary_for(index.categories)
    rng = random.Random(seed)
    records = []
    if "caption" in kinds:
        records.extend(caption_records(index, vocab, strategies, rng, insert, attributes))
    if "question" in kinds:
        records.extend(question_records(index, vocab, strategies, rng))
    return records


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Grounding records from a COCO-format folder.")
    p.add_argument("--coco_dir", required=True)
    p.add_argument("--out", required=True, help="output .jsonl")
    p.add_argument("--strategy", default=",".join(STRATEGIES),
                   help=f"comma-separated subset of {','.join(STRATEGIES)}")
    p.add_argument("--kinds", default="caption,question")
    p.add_argument("--split", default=None, help="e.g. train2014 (instances_train2014.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-insert", action="store_true", help="only replacement negatives")
    p.add_argument("--label-attributes", action="store_true",
                   help="labels also cover attribute words before a mention ('red car')")
    args = p.parse_args(argv)
    strategies = tuple(s for s in args.strategy.split(",") if s)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        p.error(f"--strategy {bad}: choose from {list(STRATEGIES)}")
    records = build_records(args.coco_dir, strategies, tuple(args.kinds.split(",")),
                            args.split, args.seed, not args.no_insert, args.label_attributes)
    write_jsonl(records, args.out)
    counts = collections.Counter((r["kind"], r["label"]) for r in records)
    print(f"wrote {len(records)} records to {args.out}: {dict(counts)}")


if __name__ == "__main__":
    main()
