"""POPE (Li et al., EMNLP 2023, "Evaluating Object Hallucination in Large Vision-Language
Models") scored as LLaVA-1.5 scores it (llava/eval/eval_pope.py), with one deliberate change:
answers are joined to questions by question_id, never by position.

Questions: records with "question_id" and a label, "yes" | "no". The label is read from
"label" (the official POPE files), else "answer" (jaxground's question records, whose "label"
is "positive" | "negative", also understood). The split ("random" | "popular" |
"adversarial") is read from "strategy" (jaxground) or "category" (LLaVA's
llava_pope_test.jsonl).
Answers: records {"question_id", "text"} (LLaVA's answer files; other fields ignored).

A question with no answer is scored as wrong: it counts as a false negative when its label
is yes and as a false positive when it is no; it is listed under "missing". Answers for ids
that no question has are listed under "unexpected" and not scored. "yes_ratio" is the
fraction of the model's actual answers that parse as yes (missing answers excluded; with
every question answered it equals LLaVA's yes ratio).

  python -m jaxground.eval.pope --questions Q.jsonl [Q2.jsonl ...] --answers A.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re

from jaxground.data.coco import read_jsonl

# LLaVA-1.5's POPE questions end with this line (a newline, then the instruction).
PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
SPLIT_KEYS = ("strategy", "category")
_SPLITS = ("random", "popular", "adversarial")


def prompt(question_text: str) -> str:
    """The prompt LLaVA-1.5 asks for a POPE question."""
    return question_text + PROMPT_SUFFIX


def parse_answer(text: str) -> str:
    """LLaVA's parser, verbatim in behaviour: first sentence (up to the first '.'), commas
    removed, split on single spaces; "no" if any word is exactly "No", "not" or "no", else
    "yes" (so "I don't know" and "Nope" read as yes)."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


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


def _metrics(questions: dict, answers: dict) -> dict:
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
            "missing": missing}


def score(questions: list[dict], answers: list[dict]) -> dict:
    """accuracy, precision, recall, f1 (positive class: yes), yes_ratio, the counts
    tp/fp/tn/fn/total/answered, and the ids "missing" (no answer) and "unexpected" (an answer
    for no question)."""
    qs = index_by_question_id(questions, "question")
    ans = index_by_question_id(answers, "answer")
    out = _metrics(qs, ans)
    out["unexpected"] = [a["question_id"] for k, a in ans.items() if k not in qs]
    return out


def score_splits(questions: list[dict], answers: list[dict]) -> dict:
    """{split: score(...) for that split's questions, "mean_f1": mean over the splits,
    "unexpected": answer ids no question of any split has}. Questions without a split key
    fall in the split "all"."""
    qs = index_by_question_id(questions, "question")
    ans = index_by_question_id(answers, "answer")
    groups: dict[str, dict] = {}
    for k, q in qs.items():
        groups.setdefault(question_split(q), {})[k] = q
    out: dict = {split: _metrics(group, ans) for split, group in sorted(groups.items())}
    f1s = [m["f1"] for m in out.values()]
    out["mean_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    out["unexpected"] = [a["question_id"] for k, a in ans.items() if k not in qs]
    return out


def read_pope_questions(path: str) -> list[dict]:
    """Questions from an official POPE file (question_id, image, text, label) or a jaxground
    record file (its caption records are skipped). Each record gets "label" as yes/no; a
    record with no split key takes "category" from the file name when it names one
    (coco_pope_adversarial.json -> "adversarial")."""
    name = os.path.basename(path).lower()
    from_name = next((s for s in _SPLITS if re.search(rf"(^|[^a-z]){s}([^a-z]|$)", name)),
                     None)
    out = []
    for r in read_jsonl(path):
        if r.get("kind", "question") != "question":
            continue
        q = dict(r)
        q["label"] = question_label(r)
        if from_name and not any(q.get(k) for k in SPLIT_KEYS):
            q["category"] = from_name
        out.append(q)
    return out


def read_answers(path: str) -> list[dict]:
    return read_jsonl(path)


def _fmt(m: dict) -> str:
    return (f"acc {m['accuracy']:.4f}  precision {m['precision']:.4f}  recall "
            f"{m['recall']:.4f}  f1 {m['f1']:.4f}  yes {m['yes_ratio']:.4f}  "
            f"(tp {m['tp']} fp {m['fp']} tn {m['tn']} fn {m['fn']}, "
            f"{len(m['missing'])} missing)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Score POPE answers (LLaVA's parser).")
    p.add_argument("--questions", nargs="+", required=True, help="question .json/.jsonl files")
    p.add_argument("--answers", required=True, help="answers .jsonl (question_id, text)")
    p.add_argument("--out", default=None, help="write the full result as JSON")
    args = p.parse_args(argv)
    questions = [q for path in args.questions for q in read_pope_questions(path)]
    result = score_splits(questions, read_answers(args.answers))
    for split, m in result.items():
        if isinstance(m, dict):
            print(f"{split:12s} {_fmt(m)}")
    print(f"mean F1 {result['mean_f1']:.4f}; {len(result['unexpected'])} unexpected answers")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
