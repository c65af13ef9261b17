"""POPE (Li et al., EMNLP 2023, "Evaluating Object Hallucination in Large Vision-Language
Models") read and scored as LLaVA-1.5 reads and scores it (llava/eval/eval_pope.py,
scripts/v1_5/eval/pope.sh), or as lmms-eval scores it (tasks/pope/utils.py), with one
deliberate change: answers are joined to questions by question_id, never by position.

Question files (`load_questions` reads any mix of them):
- official POPE `coco_pope_{random,popular,adversarial}.json`: JSON lines with question_id,
  image, text, label (yes/no); no split field: the split is taken from the file name. Each
  file numbers its questions from 1.
- LLaVA's `llava_pope_test.jsonl`: question_id (unique over the file), image, text (the
  question with LLaVA's "\\nAnswer the question using a single word or phrase." already
  appended), category (the split), and no labels. LLaVA's eval_pope.py takes the labels from
  the lines of coco_pope_<category>.json, in order: the file's questions of a category,
  in file order, are the lines of that label file. `load_questions` joins them the same way
  and checks every pair.
- jaxground's question records (kind "question", "answer" yes/no, "label"
  positive/negative, "strategy" = the split); caption records in the same file are skipped.
The label is read from "label" (yes/no), else "answer" (yes/no), else "label"
positive/negative; the split from "strategy", else "category".

Answers: records {"question_id", "text"} (LLaVA's answer files; other fields ignored).

Parsers ("parser" argument):
- "llava" (default; eval_pope.py): first sentence (up to the first '.'), commas removed, split
  on single spaces; "no" if a word is exactly "No", "not" or "no", else "yes". Every answer
  is yes or no. A question with no answer is scored as wrong: a false negative when its
  label is yes, a false positive when it is no. "yes_ratio" is the fraction of the model's
  actual answers that parse as yes (missing answers excluded; with every question answered
  it equals LLaVA's yes ratio).
- "lmms_eval" (tasks/pope/utils.py): the prediction is text.lower().strip(); a question is
  right when the prediction equals its label exactly ("yes." and "yes, there is" are wrong).
  accuracy = right / questions; tp = label yes & prediction "yes", fp = label no &
  prediction "yes", fn = label yes & prediction "no", tn = label no & prediction "no" (any
  other prediction is in none of them, counted under "other"); precision = tp / (tp + fp),
  recall = tp / (tp + fn), f1 from those (0 when a denominator is 0). QUIRK, reproduced:
  lmms-eval's "yes_ratio" is the fraction of GROUND-TRUTH labels that are yes (over all
  questions), not of the model's answers. A question with no answer is wrong for accuracy
  and in none of tp/fp/tn/fn.
Either way, answers for ids that no question has are listed under "unexpected" and not
scored, and unanswered questions under "missing".

  python -m jaxground.eval.pope --questions llava_pope_test.jsonl coco_pope_random.json \\
      coco_pope_popular.json coco_pope_adversarial.json --answers A.jsonl [--parser lmms_eval]
"""

from __future__ import annotations

import argparse
import json
import os
import re

from jaxground.data.prompts import SHORT_ANSWER_SUFFIX
from jaxground.utils.jsonl import read_numbered_jsonl

SPLIT_KEYS = ("strategy", "category")
PARSERS = ("llava", "lmms_eval")
_SPLITS = ("random", "popular", "adversarial")
LABEL_FILE = "coco_pope_{}.json"   # LLaVA's eval_pope.py: category = file[10:-5]


def prompt(question_text: str, suffix: str = SHORT_ANSWER_SUFFIX) -> str:
    """The prompt LLaVA-1.5 asks for a POPE question: the text with `suffix` appended, unless
    it already ends with it (LLaVA's llava_pope_test.jsonl carries the suffix in "text"; the
    official coco_pope_*.json do not)."""
    return question_text if question_text.endswith(suffix) else question_text + suffix


def parse_answer(text: str) -> str:
    """LLaVA's parser, verbatim in behaviour: first sentence (up to the first '.'), commas
    removed, split on single spaces; "no" if any word is exactly "No", "not" or "no", else
    "yes" (so "I don't know" and "Nope" read as yes)."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_answer_lmms_eval(text: str) -> str:
    """lmms-eval's POPE prediction: text.lower().strip(), nothing else ("yes." stays "yes.",
    and only exactly "yes" / "no" ever count)."""
    return str(text).lower().strip()


def question_label(q: dict) -> str:
    """'yes' | 'no' for a question record (see the module docstring for the keys read)."""
    for key in ("label", "answer"):
        value = str(q.get(key, "")).strip().lower()
        if value in ("yes", "no"):
            return value
    value = str(q.get("label", "")).strip().lower()
    if value in ("positive", "negative"):
        return "yes" if value == "positive" else "no"
    raise ValueError(f"question {q.get('question_id')!r} has no yes/no label "
                     f"(label={q.get('label')!r}, answer={q.get('answer')!r})")


def question_split(q: dict, default: str = "all") -> str:
    for key in SPLIT_KEYS:
        if q.get(key):
            return str(q[key])
    return default


def _key(qid) -> str:
    # LLaVA writes question_id as int, other tools as str: 3 and "3" are the same question.
    return str(qid)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _check_parser(parser: str) -> None:
    if parser not in PARSERS:
        raise ValueError(f"unknown POPE parser {parser!r}; expected one of {PARSERS}")


def index_by_question_id(records, what: str) -> dict:
    """{str(question_id): record}; a record without an id or a repeated id is an error."""
    out = {}
    for r in records:
        if "question_id" not in r:
            raise ValueError(f"{what} record without question_id: {r!r}")
        k = _key(r["question_id"])
        if k in out:
            raise ValueError(f"duplicate {what} for question_id {r['question_id']!r}")
        out[k] = r
    return out


def _metrics_llava(questions: dict, answers: dict) -> dict:
    tp = fp = tn = fn = 0
    answered = yes = 0
    missing = []
    for k, q in questions.items():
        label = question_label(q)
        if k in answers:
            pred = parse_answer(answers[k].get("text", ""))
            answered += 1
            yes += pred == "yes"
        else:
            missing.append(q["question_id"])
            pred = "no" if label == "yes" else "yes"  # a missing answer is a wrong answer
        if pred == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    total = tp + fp + tn + fn
    return {"accuracy": _ratio(tp + tn, total), "precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "yes_ratio": _ratio(yes, answered),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "total": total, "answered": answered,
            "other": 0, "missing": missing}


def _metrics_lmms_eval(questions: dict, answers: dict) -> dict:
    tp = fp = tn = fn = 0
    answered = other = right = gt_yes = 0
    missing = []
    for k, q in questions.items():
        gt = question_label(q)
        gt_yes += gt == "yes"
        if k not in answers:
            missing.append(q["question_id"])
            continue                                   # wrong; in none of tp/fp/tn/fn
        pred = parse_answer_lmms_eval(answers[k].get("text", ""))
        answered += 1
        right += pred == gt
        if pred == "yes":
            tp, fp = (tp + 1, fp) if gt == "yes" else (tp, fp + 1)
        elif pred == "no":
            tn, fn = (tn + 1, fn) if gt == "no" else (tn, fn + 1)
        else:
            other += 1
    total = len(questions)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"accuracy": _ratio(right, total), "precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "yes_ratio": _ratio(gt_yes, total),        # lmms-eval: over the LABELS
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "total": total, "answered": answered,
            "other": other, "missing": missing}


def _metrics(questions: dict, answers: dict, parser: str) -> dict:
    out = (_metrics_llava if parser == "llava" else _metrics_lmms_eval)(questions, answers)
    out["parser"] = parser
    return out


def score(questions: list[dict], answers: list[dict], parser: str = "llava") -> dict:
    """accuracy, precision, recall, f1 (positive class: yes), yes_ratio, the counts
    tp/fp/tn/fn/total (questions)/answered/other (answers that are neither yes nor no after
    parsing: always 0 under "llava"), the ids "missing" (no answer) and "unexpected" (an
    answer for no question), and "parser" ("llava" | "lmms_eval", see the module docstring;
    under "lmms_eval" tp + fp + tn + fn can be less than total)."""
    _check_parser(parser)
    qs = index_by_question_id(questions, "question")
    ans = index_by_question_id(answers, "answer")
    out = _metrics(qs, ans, parser)
    out["unexpected"] = [a["question_id"] for k, a in ans.items() if k not in qs]
    return out


def score_splits(questions: list[dict], answers: list[dict], parser: str = "llava") -> dict:
    """{split: score(...) for that split's questions, "mean_f1": mean over the splits,
    "unexpected": answer ids no question of any split has, "parser"}. Questions without a
    split key fall in the split "all"."""
    _check_parser(parser)
    qs = index_by_question_id(questions, "question")
    ans = index_by_question_id(answers, "answer")
    groups: dict[str, dict] = {}
    for k, q in qs.items():
        groups.setdefault(question_split(q), {})[k] = q
    out: dict = {split: _metrics(group, ans, parser) for split, group in sorted(groups.items())}
    f1s = [m["f1"] for m in out.values()]
    out["mean_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    out["unexpected"] = [a["question_id"] for k, a in ans.items() if k not in qs]
    out["parser"] = parser
    return out


# ---- reading question files -------------------------------------------------------------
def _split_from_name(path: str) -> str | None:
    name = os.path.basename(path).lower()
    return next((s for s in _SPLITS if re.search(rf"(^|[^a-z]){s}([^a-z]|$)", name)), None)


def read_pope_questions(path: str) -> list[dict]:
    """Questions from an official POPE file (question_id, image, text, label) or a jaxground
    record file (its caption records are skipped). Each record gets "label" as yes/no; a
    record with no split key takes "category" from the file name when it names one
    (coco_pope_adversarial.json -> "adversarial")."""
    from_name = _split_from_name(path)
    out = []
    for where, r in read_numbered_jsonl(path):
        if r.get("kind", "question") != "question":
            continue
        q = dict(r)
        try:
            q["label"] = question_label(r)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if from_name and not any(q.get(k) for k in SPLIT_KEYS):
            q["category"] = from_name
        out.append(q)
    return out


def _has_label(r: dict) -> bool:
    return "label" in r or "answer" in r


def _questions_of(path: str) -> tuple[list[tuple[str, dict]], bool]:
    """(question records with where they are, whether they carry labels). A file mixing
    labelled and unlabelled questions is an error."""
    rows = [(w, r) for w, r in read_numbered_jsonl(path) if r.get("kind", "question") == "question"]
    if not rows:
        raise ValueError(f"{path} holds no POPE questions")
    labelled = [_has_label(r) for _, r in rows]
    if any(labelled) and not all(labelled):
        where = rows[labelled.index(False)][0]
        raise ValueError(f"{where}: question without a label in a file whose other questions "
                         f"have one (expected \"label\" yes/no on every line, or on none)")
    return rows, all(labelled)


def _label_category(path: str) -> str | None:
    """The category a label file serves, by LLaVA's eval_pope.py rule (coco_pope_<c>.json)."""
    name = os.path.basename(path)
    if name.startswith("coco_pope_") and name.endswith(".json"):
        return name[len("coco_pope_"):-len(".json")]
    return None


def _join(path: str, rows: list[tuple[str, dict]], label_files: dict) -> tuple[list, set]:
    """LLaVA's join of an unlabelled question file with coco_pope_<category>.json: for each
    category, its questions in file order <-> the label file's lines in order."""
    by_cat: dict[str, list] = {}
    for n, (where, r) in enumerate(rows):
        cat = r.get("category")
        if not cat:
            raise ValueError(f"{where}: a question without labels needs a \"category\" "
                             f"(random | popular | adversarial) to find its labels in "
                             f"{LABEL_FILE.format('<category>')}")
        by_cat.setdefault(str(cat), []).append((n, where, r))
    joined: dict[int, dict] = {}
    used = set()
    for cat, items in by_cat.items():
        if cat not in label_files:
            raise ValueError(f"{path} has no labels: its {len(items)} {cat!r} questions need "
                             f"{LABEL_FILE.format(cat)}, which is not among the question "
                             f"files given")
        lpath, lrows = label_files[cat]
        used.add(lpath)
        for (n, qw, q), (lw, lab) in zip(items, lrows):
            if q.get("image") != lab.get("image") or not str(q.get("text", "")).startswith(
                    str(lab.get("text", ""))):
                raise ValueError(
                    f"{qw} and {lw} do not match (LLaVA pairs the {cat!r} questions of {path} "
                    f"with the lines of {lpath} in order): image {q.get('image')!r} vs "
                    f"{lab.get('image')!r}, text {q.get('text')!r} should start with "
                    f"{lab.get('text')!r}")
            rec = dict(q)
            try:
                rec["label"] = question_label(lab)
            except ValueError as e:
                raise ValueError(f"{lw}: {e}") from None
            rec["category"] = cat
            joined[n] = rec
        if len(items) != len(lrows):
            extra = (f"{items[len(lrows)][1]} has no label line" if len(items) > len(lrows)
                     else f"{lrows[len(items)][0]} has no question")
            raise ValueError(f"{path} has {len(items)} {cat!r} questions but {lpath} has "
                             f"{len(lrows)} label lines: {extra}")
    return [joined[n] for n in range(len(rows))], used


def load_questions(paths) -> list[dict]:
    """Questions from any mix of official coco_pope_<split>.json files, LLaVA's
    llava_pope_test.jsonl (no labels: joined with the coco_pope_<category>.json among
    `paths`, as LLaVA's eval_pope.py pairs them; every pair's image must be the same and the
    unlabelled text must start with the labelled one) and jaxground question records.

    Each record keeps its file's fields and has question_id, image, text (as in the file),
    label ("yes" | "no") and category (the split). Label files used for a join give no
    records of their own. Ids: joined records keep LLaVA's (unique over its file); records
    of labelled files read on their own keep theirs when they are the only source, else
    become f"{split}/{question_id}" (the official files each number from 1). Order: the
    files' order, each in file order. Errors (ValueError) name the file and line."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"question file(s) given twice: {twice}")
    read = [(p, *_questions_of(p)) for p in paths]
    label_files: dict[str, tuple[str, list]] = {}
    for p, rows, labelled in read:
        cat = _label_category(p)
        if labelled and cat is not None:
            if cat in label_files and os.path.abspath(label_files[cat][0]) != os.path.abspath(p):
                raise ValueError(f"two label files for category {cat!r}: "
                                 f"{label_files[cat][0]} and {p}")
            label_files[cat] = (p, rows)
    joined: dict[str, list[dict]] = {}
    used: set[str] = set()
    for p, rows, labelled in read:
        if not labelled:
            joined[p], u = _join(p, rows, label_files)
            used |= u
    alone = [p for p, rows, labelled in read if labelled and p not in used]
    qualify = len(alone) > 1 or bool(alone and joined)
    out: list[dict] = []
    for p, rows, labelled in read:
        if p in joined:
            out += joined[p]
        elif p not in used:
            for q in read_pope_questions(p):
                q["category"] = question_split(q)
                if qualify:
                    q["question_id"] = f"{q['category']}/{q['question_id']}"
                out.append(q)
    index_by_question_id(out, f"question in {paths}")  # ids must be unique
    return out


def read_answers(path: str) -> list[dict]:
    return [r for _, r in read_numbered_jsonl(path)]


def _fmt(m: dict) -> str:
    return (f"acc {m['accuracy']:.4f}  precision {m['precision']:.4f}  recall "
            f"{m['recall']:.4f}  f1 {m['f1']:.4f}  yes {m['yes_ratio']:.4f}  "
            f"(tp {m['tp']} fp {m['fp']} tn {m['tn']} fn {m['fn']}, "
            f"{m['other']} other, {len(m['missing'])} missing)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Score POPE answers (LLaVA's or lmms-eval's "
                                            "parser).")
    p.add_argument("--questions", nargs="+", required=True,
                   help="question files: coco_pope_<split>.json, llava_pope_test.jsonl "
                        "(with the coco_pope_<split>.json it needs), jaxground records")
    p.add_argument("--answers", required=True, help="answers .jsonl (question_id, text)")
    p.add_argument("--parser", default="llava", choices=PARSERS)
    p.add_argument("--out", default=None, help="write the full result as JSON")
    args = p.parse_args(argv)
    result = score_splits(load_questions(args.questions), read_answers(args.answers),
                          parser=args.parser)
    for split, m in result.items():
        if isinstance(m, dict):
            print(f"{split:12s} {_fmt(m)}")
    print(f"parser {result['parser']}: mean F1 {result['mean_f1']:.4f}; "
          f"{len(result['unexpected'])} unexpected answers")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
