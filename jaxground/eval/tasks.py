"""The evaluation tasks: which prompts each one asks, and how its answers are scored.

Every task turns its data into `Prompt`s (question + image + key) and a record per key;
generation results are merged into those records, giving the per-sample outputs that
`python -m jaxground.evaluate` writes to samples.jsonl, and `score_<task>(samples, ...)`
computes the metrics from those alone, so a run can be re-scored without the model.

A sample holds the record's fields plus "text" (the decoded answer / caption) and, per
token: "token_ids", "logprobs", "entropy", "grounding" (models with heads), and for
generated ones "scored" and "flagged"; or "error" when its image could not be read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

from jaxground.data.coco import STRATEGIES, load_coco, question_records
from jaxground.data.objects import ObjectVocabulary, vocabulary_for
from jaxground.data.prompts import SHORT_ANSWER_SUFFIX
from jaxground.eval import chair, grounding_auroc, mme, pope
from jaxground.inference.batching import Prompt

TASKS = ("pope", "chair", "mme", "grounding")


@dataclasses.dataclass
class TaskData:
    prompts: list[Prompt]
    records: dict                 # key -> record (what samples.jsonl keeps besides outputs)
    short_answers: bool           # yes/no questions (answer_tokens) vs captions


def _limit(items: list, limit: int) -> list:
    return items[:limit] if limit else items


# ---- reading data ------------------------------------------------------------------------
def pope_data(path: str, image_root: str | None = None, limit: int = 0, seed: int = 0,
              split: str | None = None, suffix: str = SHORT_ANSWER_SUFFIX) -> TaskData:
    """POPE questions from POPE files (a file, a comma-separated list or a folder of them:
    the official coco_pope_*.json, LLaVA's llava_pope_test.jsonl joined with them, or
    jaxground question records; images under `image_root`, default the first file's folder),
    or built from a COCO-format folder (random / popular / adversarial, seeded)."""
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "annotations")):
        index = load_coco(path, split)
        questions = list(question_records(index, vocabulary_for(index.categories), STRATEGIES,
                                          random.Random(seed)))
        root = path
    else:
        files = _files(path, (".json", ".jsonl"))
        questions = pope.load_questions(files)
        root = image_root or os.path.dirname(files[0])
    questions = _limit(questions, limit)
    records, prompts = {}, []
    for q in questions:
        key = str(q["question_id"])
        if key in records:
            raise ValueError(f"question_id {key!r} appears twice in {path}")
        asked = pope.prompt(q["text"], suffix)
        records[key] = {"question_id": q["question_id"], "question": q["text"],
                        "prompt": asked, "image": q["image"], "label": pope.question_label(q),
                        "split": pope.question_split(q), "object": q.get("object")}
        prompts.append(Prompt(asked, os.path.join(root, q["image"]), key))
    return TaskData(prompts, records, short_answers=True)


IMAGE_IDS_FILE = "image_ids.json"


def chair_image_ids(coco_dir: str, split: str | None, ids_file: str | None, n: int,
                    seed: int, write_to: str | None = None) -> list:
    """The images CHAIR captions: the ids listed in `ids_file` (a JSON list, JSON lines with
    "image_id" such as OPERA's caption logs, or one id per line), else `n` images drawn
    without replacement from the folder with `random.Random(seed)` (all of them when it
    has no more than `n`), sorted. The list is written to `write_to` so a run can be
    repeated on exactly the same images."""
    index = load_coco(coco_dir, split)
    if ids_file:
        ids = read_image_ids(ids_file)
        unknown = [i for i in ids if i not in index.images]
        if unknown:
            raise ValueError(f"{ids_file}: {len(unknown)} image id(s) are not in the COCO "
                             f"annotations of {coco_dir}: {unknown[:10]}")
        source = {"image_ids_file": os.path.abspath(ids_file)}
    else:
        ids = sorted(index.images)
        if n and n < len(ids):
            ids = sorted(random.Random(seed).sample(ids, n))
        source = {"seed": seed, "drawn": n}
    missing = [index.image_path(i) for i in ids
               if not os.path.exists(os.path.join(coco_dir, index.image_path(i)))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) of the CHAIR image list are "
                                f"missing under {coco_dir}: {missing[:10]}")
    if write_to:
        with open(write_to, "w") as f:
            json.dump({**source, "coco_dir": os.path.abspath(coco_dir), "image_ids": ids}, f)
    return ids


def read_image_ids(path: str) -> list:
    """Image ids from a JSON list (of ids or of records with "image_id"), a JSON object with
    "image_ids", JSON lines with "image_id", or one id per line; numeric ids become ints."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image id list {path} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        data = [json.loads(line) if line.startswith("{") else line for line in lines]
    if isinstance(data, dict):
        data = data.get("image_ids", [data])
    ids = [d["image_id"] if isinstance(d, dict) else d for d in data]
    out = [int(i) if isinstance(i, str) and i.isdigit() else i for i in ids]
    if not out:
        raise ValueError(f"{path} lists no image ids")
    return out


def caption_data(coco_dir: str, caption_prompt: str, limit: int = 0,
                 split: str | None = None, image_ids: list | None = None) -> TaskData:
    """One caption request per image of a COCO-format folder (all, or `image_ids`)."""
    index = load_coco(coco_dir, split)
    image_ids = _limit(sorted(index.images) if image_ids is None else list(image_ids), limit)
    records = {str(i): {"image_id": i, "image": index.image_path(i)} for i in image_ids}
    prompts = [Prompt(caption_prompt, os.path.join(coco_dir, index.image_path(i)), str(i))
               for i in image_ids]
    return TaskData(prompts, records, short_answers=False)


def given_caption_data(path: str, caption_prompt: str, image_root: str | None = None,
                       limit: int = 0) -> TaskData:
    """Caption records (jaxground's grounding records: "image", "text", "spans" [start, end,
    label, category], positives and their hallucinated edits) to score teacher forced.
    Images lie under `image_root` (default: the records file's folder)."""
    from jaxground.utils.jsonl import read_jsonl

    records = [r for r in read_jsonl(path) if r.get("kind", "caption") == "caption"]
    if not records:
        raise ValueError(f"{path} holds no caption records")
    missing = [k for k in ("image", "text", "spans") if k not in records[0]]
    if missing:
        raise ValueError(f"{path}: caption records need {missing} (first record: "
                         f"{sorted(records[0])})")
    root = image_root or os.path.dirname(os.path.abspath(path))
    out, prompts = {}, []
    for n, r in enumerate(_limit(records, limit)):
        key = str(r.get("id", n))
        out[key] = {"id": key, "image": r["image"], "image_id": r.get("image_id"),
                    "caption": r["text"], "label": r.get("label"),
                    "strategy": r.get("strategy"), "edit": r.get("edit"),
                    "present": sorted({s[3] for s in r["spans"] if s[2] == 1}),
                    "categories": sorted({s[3] for s in r["spans"]})}
        prompts.append(Prompt(caption_prompt, os.path.join(root, r["image"]), key,
                              answer=r["text"]))
    return TaskData(prompts, out, short_answers=False)


def mme_data(root: str, limit: int = 0) -> TaskData:
    """MME questions from its release folder; both questions of an image share LLaVA's
    question_id, so records are keyed by the unique "key"."""
    questions = _limit(mme.read_mme(root), limit)
    fields = ("question_id", "key", "subtask", "image", "image_file", "question", "prompt",
              "answer")
    records = {q["key"]: {k: q[k] for k in fields} for q in questions}
    prompts = [Prompt(q["prompt"], q["image"], q["key"]) for q in questions]
    return TaskData(prompts, records, short_answers=True)


def _files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(suffixes))
    else:
        files = [p for p in path.split(",") if p]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise FileNotFoundError(f"no question files at {path}" if not files
                                else f"question file(s) not found: {missing}")
    return files


# ---- scoring ---------------------------------------------------------------------------
def _answers(samples: list[dict]) -> list[dict]:
    """Answers of the samples that have one (failed images count as missing)."""
    return [{"question_id": s["question_id"], "prompt": s.get("prompt"), "text": s["text"]}
            for s in samples if "error" not in s]


def llava_answers(task: str, samples: list[dict]) -> list[dict]:
    """Answer records in LLaVA's format ({"question_id", "prompt", "text"}): what
    LLaVA's eval_pope.py / convert_answer_to_mme.py and our metric CLIs read (MME's with
    each image's two answers on adjacent lines, as its calculation.py pairs them)."""
    return mme.llava_answers(samples) if task == "mme" else _answers(samples)


def score_pope(samples: list[dict], parser: str = "llava") -> dict:
    questions = [{**s, "category": s["split"]} for s in samples]
    return pope.score_splits(questions, _answers(samples), parser=parser)


def score_mme(samples: list[dict], parser: str = "official") -> dict:
    return mme.score(samples, _answers(samples), parser=parser)


def score_chair(samples: list[dict], coco_dir: str, split: str | None = None,
                matcher: str = "reference") -> dict:
    captions = [{"image_id": s["image_id"], "caption": s["text"]} for s in samples
                if "error" not in s]
    result = chair.score_from_index(captions, load_coco(coco_dir, split), matcher=matcher)
    result["failed_images"] = [s["image_id"] for s in samples if "error" in s]
    return result


def mention_samples(samples: list[dict], tokenizer, vocab: ObjectVocabulary, truth) -> list:
    """Object mentions of each generated caption, labelled real / hallucinated against
    `truth(sample) -> set of categories`, with the per-token signals averaged over each
    mention: [{"text", "spans", "signals", "mentions"}] (a model without heads has no
    "grounding" signal; the baselines are still there)."""
    out = []
    names = {"grounding": "grounding", "logprobs": "logprob", "entropy": "entropy"}
    for s in samples:
        if "error" in s:
            continue
        text, spans = grounding_auroc.token_spans(tokenizer, s["token_ids"])
        signals = {name: s[k] for k, name in names.items() if k in s}
        mentions = grounding_auroc.mention_records(text, spans, vocab, truth(s), signals)
        out.append({"text": text, "spans": spans, "signals": signals, "mentions": mentions})
    return out


def flagging(mention_sets: list[dict], threshold: float) -> dict:
    """How well `grounding < threshold` flags hallucinated mentions (precision, recall)."""
    mentions = [m for s in mention_sets for m in s["mentions"]]
    flagged = [m for m in mentions if m["grounding"] < threshold]
    hallucinated = [m for m in mentions if m["hallucinated"]]
    hits = sum(m["hallucinated"] for m in flagged)
    ratio = lambda a, b: a / b if b else float("nan")
    return {"threshold": threshold, "flagged": len(flagged), "hallucinated": len(hallucinated),
            "precision": ratio(hits, len(flagged)), "recall": ratio(hits, len(hallucinated))}


def grounding_truth(data: str, samples: list[dict], split: str | None = None):
    """(vocabulary, truth(sample) -> categories in its image): CHAIR's ground truth for a
    COCO-format folder, the records' own labels for a file of given captions."""
    if os.path.isdir(data):
        index = load_coco(data, split)
        vocab = vocabulary_for(index.categories)
        # Token labels need character spans, which only the clean matcher gives: the
        # ground truth is read with the same matcher as the mentions it labels.
        return vocab, lambda s: chair.ground_truth(index, vocab, s["image_id"],
                                                   matcher="clean")[1]
    vocab = vocabulary_for(sorted({c for s in samples for c in s["categories"]}))
    return vocab, lambda s: set(s["present"])


def score_grounding(samples: list[dict], tokenizer, data: str, split: str | None = None,
                    flag_threshold: float = 0.0) -> dict:
    """Token / mention AUROC and AUPR of the grounding score against NLL and entropy, on
    the object mentions of generated captions labelled by CHAIR's ground truth (`data` a
    COCO-format folder), or of given captions labelled by their records (`data` a file)."""
    vocab, truth = grounding_truth(data, samples, split)
    sets = mention_samples(samples, tokenizer, vocab, truth)
    out = grounding_auroc.metrics(sets)
    if all("grounding" in s["signals"] for s in sets):
        out["flagging"] = flagging(sets, flag_threshold)
    return out
