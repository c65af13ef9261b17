"""MME (Fu et al. 2023, "MME: A Comprehensive Evaluation Benchmark for Multimodal Large
Language Models") read from its release folders, asked as LLaVA-1.5 asks it
(llava_mme.jsonl, scripts/v1_5/eval/mme.sh) and scored as the official
eval_tool/calculation.py scores LLaVA's answers after LLaVA's convert_answer_to_mme.py, or as
lmms-eval scores it (tasks/mme/utils.py), with one deliberate change: answers are joined to
questions by question_id and prompt, never by line order.

Folder format (MME_Benchmark_release_version/): one folder per subtask. A subtask folder
holds either images/ + questions_answers_YN/ (artwork, celebrity, landmark, posters, scene)
or the images and their .txt files side by side (the others). Each .txt is named after its
image and has two lines "question<TAB>Yes|No" (one Yes, one No in the release). A line is
read as the converter reads it, `line.strip().split('\\t')`: the question is kept exactly
(the converter's ground-truth key); blank lines are skipped (the converter would fail).

Ids (LLaVA's llava_mme.jsonl): question_id = f"{subtask}/{image file name}", shared by the
two questions of an image; "key" = f"{question_id}#{k}" (k = 0, 1 in .txt order) is unique.

Prompt (LLaVA-1.5's llava_mme.jsonl, reproduced by lmms-eval's mme task): the question with
its "Please answer yes or no." removed, then "\\nAnswer the question using a single word or
phrase.".

Joining an answer {"question_id", "text", "prompt" | "question"} to its question, as
convert_answer_to_mme.py does: the image is (question_id.split('/')[0],
question_id.split('/')[-1].split('.')[0] + '.txt'); the prompt is normalised: "Answer the
question using a single word or phrase." removed and the result stripped; when it lacks
"Please answer yes or no." it gets " Please answer yes or no.", or "  Please answer yes or
no." (two spaces; some release questions have them) when the one-space form is not a
question of that image. A prompt equal to a record's own "prompt" or "question" matches it
directly. An answer with neither prompt nor question takes the questions of its
question_id in order (first such answer <-> first question of that id).

Parsers ("parser" argument):
- "official" (calculation.py): pred = text.lower() (no strip, '.' kept); "yes" / "no" when
  exactly that, else "yes" if the first 4 characters contain "yes", else "no" if they contain
  "no", else "other" (so "   Yes" is other and "Yes." is yes). (calculation.py reads the
  answer with the line's trailing newline, which never changes the result; an answer holding
  a tab or a newline breaks its file format, which is not reproduced.)
- "lmms_eval" (tasks/mme/utils.py): pred = text.lower().strip().replace(".", ""); exact
  yes / no; a single character: "y" -> yes, "n" -> no, else other; else the 4-character rule.

Scoring, per subtask: acc = 100 * correct questions / questions ("other" is wrong); acc_plus
= 100 * images with both questions correct / images; score = acc + acc_plus (at most 200;
lmms-eval's per-image mean is the same number). perception = sum of the scores of the 10
perception subtasks, cognition = sum over the 4 cognition subtasks (each over the subtasks
present; see "perception_subtasks" / "cognition_subtasks"), total = perception + cognition.
A question with no answer is wrong (its key listed under "missing"); answers whose
question_id names no image of the records are listed under "unexpected", not scored.

  python -m jaxground.eval.mme --root MME_Benchmark_release_version --answers A.jsonl \\
      [--parser official|lmms_eval] [--questions llava_mme.jsonl] [--write-answers L.jsonl]
  python -m jaxground.eval.mme --root MME_Benchmark_release_version --write-questions Q.jsonl
"""

from __future__ import annotations

import argparse
import json
import os

from jaxground.data.prompts import SHORT_ANSWER_SUFFIX
from jaxground.utils.jsonl import read_jsonl, read_numbered_jsonl, write_jsonl

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
PARSERS = ("official", "lmms_eval")

SHORT_ANSWER = SHORT_ANSWER_SUFFIX.lstrip("\n")   # what the converter drops
YES_NO_PROMPT = "Please answer yes or no."
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
QA_DIR, IMAGE_DIR = "questions_answers_YN", "images"


def prompt(question: str) -> str:
    """The prompt LLaVA-1.5 is asked for an MME question (see the module docstring)."""
    return question.replace(YES_NO_PROMPT, "").strip() + SHORT_ANSWER_SUFFIX


def parse_answer(text: str) -> str:
    """The official calculation.py's parse_pred_ans on text.lower() (no strip, '.' kept):
    "yes" | "no" if it is exactly that, else "yes" if its first 4 characters contain "yes",
    else "no" if they contain "no", else "other" ("Yes." and "Nope" read as yes / no, "y",
    "I think so" and "   Yes" as other)."""
    pred = str(text).lower()
    return pred if pred in ("yes", "no") else _first_four(pred)


def _first_four(pred: str) -> str:
    """Both tools' fallback: "yes" / "no" found in the first 4 characters, else "other"."""
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


parse_answer_official = parse_answer


def parse_answer_lmms_eval(text: str) -> str:
    """lmms-eval's parse_pred_ans: text.lower().strip() with every '.' removed; "yes" | "no"
    if exactly that; a single character: "y" -> yes, "n" -> no, else other; else the
    official 4-character rule ("y" is yes here, other under the official parser)."""
    pred = str(text).lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    return _first_four(pred)


_PARSE = {"official": parse_answer, "lmms_eval": parse_answer_lmms_eval}


def _check_parser(parser: str) -> None:
    if parser not in PARSERS:
        raise ValueError(f"unknown MME parser {parser!r}; expected one of {PARSERS}")


# ---- LLaVA's convert_answer_to_mme.py --------------------------------------------------------
def image_key(question_id) -> tuple[str, str]:
    """(category, .txt file name) of a question_id, as convert_answer_to_mme.py derives them:
    (id.split('/')[0], id.split('/')[-1].split('.')[0] + '.txt')."""
    qid = str(question_id)
    return qid.split("/")[0], qid.split("/")[-1].split(".")[0] + ".txt"


def converter_question(prompt_text: str, questions) -> str:
    """The ground-truth question convert_answer_to_mme.py looks up for a prompt, given the
    `questions` (ground-truth question texts) of the image: the short-answer instruction
    removed and stripped; " Please answer yes or no." appended when absent, or with two
    spaces when the one-space form is not among `questions`."""
    p = prompt_text
    if SHORT_ANSWER in p:
        p = p.replace(SHORT_ANSWER, "").strip()
    if YES_NO_PROMPT not in p:
        p = p + " " + YES_NO_PROMPT
        if p not in questions:
            p = p.replace(" " + YES_NO_PROMPT, "  " + YES_NO_PROMPT)
    return p


# ---- reading the release folder ---------------------------------------------------------------
def _layout(subtask_dir: str):
    """(qa_dir, image_dir) of a subtask folder, or None when it is not one."""
    qa, img = os.path.join(subtask_dir, QA_DIR), os.path.join(subtask_dir, IMAGE_DIR)
    if os.path.isdir(qa) or os.path.isdir(img):
        if not (os.path.isdir(qa) and os.path.isdir(img)):
            raise ValueError(f"{subtask_dir}: needs both {IMAGE_DIR}/ and {QA_DIR}/")
        return qa, img
    if any(f.endswith(".txt") for f in os.listdir(subtask_dir)):
        return subtask_dir, subtask_dir
    return None


def _image_index(image_dir: str) -> dict:
    out: dict[str, str] = {}
    for f in sorted(os.listdir(image_dir)):
        stem, ext = os.path.splitext(f)
        if ext.lower() not in IMAGE_EXTS:
            continue
        if stem in out:
            raise ValueError(f"{image_dir}: two images for {stem!r}: {out[stem]}, {f}")
        out[stem] = f
    return out


def _read_qa(path: str) -> list[tuple[str, str]]:
    """[(question, "Yes" | "No")]: each line as the converter reads it,
    `question, answer = line.strip().split('\\t')` (question kept exactly); the answer must
    be yes / no in any case, as calculation.py asserts."""
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected 'question<TAB>Yes|No' (one tab), "
                                 f"got {line!r}")
            question, answer = parts
            if answer.lower() not in ("yes", "no"):
                raise ValueError(f"{path}:{n}: answer must be Yes or No, got {answer!r}")
            out.append((question, "Yes" if answer.lower() == "yes" else "No"))
    return out


def read_mme(root: str, subtasks=None) -> list[dict]:
    """Question records {"question_id" (f"{subtask}/{image file name}", shared by the two
    questions of an image, as in LLaVA's llava_mme.jsonl), "key" (f"{question_id}#{k}",
    k = 0, 1 in .txt order; unique), "subtask", "image" (path), "image_file" (relative to
    root, what LLaVA's --image-folder takes), "question" (as in the .txt), "answer" ("Yes" |
    "No"), "prompt" (what the model is asked: prompt(question))}, in a stable order
    (subtasks, then .txt files, sorted by name; questions in file order). Folders that are
    neither layout are skipped; `subtasks` restricts the folders read."""
    records = []
    for subtask in sorted(os.listdir(root)):
        sub_dir = os.path.join(root, subtask)
        if not os.path.isdir(sub_dir) or (subtasks is not None and subtask not in subtasks):
            continue
        layout = _layout(sub_dir)
        if layout is None:
            continue
        qa_dir, image_dir = layout
        images = _image_index(image_dir)
        for txt in sorted(f for f in os.listdir(qa_dir) if f.endswith(".txt")):
            stem = txt[: -len(".txt")]
            if stem not in images:
                raise FileNotFoundError(f"{os.path.join(qa_dir, txt)}: no image {stem}.* "
                                        f"in {image_dir}")
            qas = _read_qa(os.path.join(qa_dir, txt))
            if len(qas) != 2:
                raise ValueError(f"{os.path.join(qa_dir, txt)}: MME has 2 questions per "
                                 f"image, found {len(qas)}")
            image = os.path.join(image_dir, images[stem])
            qid = f"{subtask}/{images[stem]}"
            for k, (question, answer) in enumerate(qas):
                records.append({"question_id": qid, "key": f"{qid}#{k}", "subtask": subtask,
                                "image": image, "image_file": os.path.relpath(image, root),
                                "question": question, "answer": answer,
                                "prompt": prompt(question)})
    return records


def read_llava_questions(path: str, root: str) -> list[dict]:
    """LLaVA's llava_mme.jsonl ({"question_id" shared per image, "image" relative to root,
    "text" = the prompt, "category"}) joined with the ground truth of the release folder at
    `root` by convert_answer_to_mme.py's rule: the same records as read_mme, in the file's
    order, with "prompt" = the file's "text" (what LLaVA asks). A line whose question the
    folder lacks, whose image is not the question's, or that repeats a question is an error
    naming the line."""
    groups = _groups(read_mme(root))
    out, seen = [], {}
    for where, line in read_numbered_jsonl(path):
        missing = [k for k in ("question_id", "text", "image") if k not in line]
        if missing:
            raise ValueError(f"{where}: expected LLaVA's fields question_id, image, text; "
                             f"missing {missing}")
        ikey = image_key(line["question_id"])
        recs = groups.get(ikey, [])
        found = _match(recs, line["text"])
        if found is None:
            gt = converter_question(line["text"], {r["question"] for r in recs})
            raise ValueError(f"{where}: question {gt!r} of {ikey[0]}/{ikey[1]} is not in "
                             f"{root}" + (f" (its questions: {[r['question'] for r in recs]})"
                                          if recs else " (no such image)"))
        r = recs[found]
        if os.path.normpath(line["image"]) != os.path.normpath(r["image_file"]):
            raise ValueError(f"{where}: image {line['image']!r}, but the question is about "
                             f"{r['image_file']!r} in {root}")
        if r["key"] in seen:
            raise ValueError(f"{where}: asks {r['key']} again (first at {seen[r['key']]})")
        seen[r["key"]] = where
        out.append({**r, "prompt": line["text"]})
    return out


# ---- joining and scoring ----------------------------------------------------------------------
def _groups(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Records by image_key(question_id), each with a unique "key" (its own, else
    f"{question_id}#{k}" by order within the id); a question repeated for an image is an
    error."""
    groups: dict[tuple[str, str], list[dict]] = {}
    keys: set[str] = set()
    for r in records:
        for field in ("question_id", "question", "answer", "subtask"):
            if field not in r:
                raise ValueError(f"MME record without {field!r}: {r!r}")
        g = groups.setdefault(image_key(r["question_id"]), [])
        if any(o["question"] == r["question"] for o in g):
            raise ValueError(f"duplicate question {r['question']!r} for question_id "
                             f"{r['question_id']!r}")
        key = r.get("key") or f"{r['question_id']}#{len(g)}"
        if key in keys:
            raise ValueError(f"duplicate question key {key!r}")
        keys.add(key)
        g.append({**r, "key": key})
    return groups


def _match(recs: list[dict], text: str) -> int | None:
    """Index in `recs` (the questions of one image) of the question a prompt asks."""
    for i, r in enumerate(recs):
        if text in (r.get("prompt"), r["question"]):
            return i
    gt = converter_question(text, {r["question"] for r in recs})
    return next((i for i, r in enumerate(recs) if r["question"] == gt), None)


def join(records: list[dict], answers: list[dict]) -> tuple[list, list]:
    """([(record, answer or None)] in record order, answer ids of no image): each answer
    joined to its question (see the module docstring). Two answers for one question, an
    answer whose prompt asks none of its image's questions, or more answers without a prompt
    than the id has questions, are errors naming the question / answer."""
    groups = _groups(records)
    got: dict[str, dict] = {}
    by_order: dict[tuple[str, str], int] = {}
    unexpected = []
    for a in answers:
        if "question_id" not in a:
            raise ValueError(f"answer record without question_id: {a!r}")
        ikey = image_key(a["question_id"])
        recs = groups.get(ikey)
        if recs is None:
            unexpected.append(a["question_id"])
            continue
        asked = a.get("prompt") or a.get("question")
        if asked:
            i = _match(recs, asked)
            if i is None:
                raise ValueError(
                    f"answer for question_id {a['question_id']!r}: prompt {asked!r} "
                    f"(converter's question "
                    f"{converter_question(asked, {r['question'] for r in recs})!r}) is none "
                    f"of its questions {[r['question'] for r in recs]}")
        else:
            i = by_order.get(ikey, 0)
            by_order[ikey] = i + 1
            if i >= len(recs):
                raise ValueError(f"question_id {a['question_id']!r}: more answers without a "
                                 f"prompt than its {len(recs)} questions")
        k = recs[i]["key"]
        if k in got:
            raise ValueError(f"duplicate answer for question {k} "
                             f"({recs[i]['question']!r})")
        got[k] = a
    return [(r, got.get(r["key"])) for r in _in_record_order(records, groups)], unexpected


def _in_record_order(records: list[dict], groups: dict) -> list[dict]:
    """The grouped (keyed) records in the order of `records`."""
    taken: dict[tuple[str, str], int] = {}
    out = []
    for r in records:
        ikey = image_key(r["question_id"])
        i = taken.get(ikey, 0)
        taken[ikey] = i + 1
        out.append(groups[ikey][i])
    return out


def score(records: list[dict], answers: list[dict], parser: str = "official") -> dict:
    """{"subtasks": {subtask: {acc, acc_plus, score, n_questions, n_images, n_correct,
    n_images_correct, n_other}}, "perception", "cognition", "total",
    "perception_subtasks", "cognition_subtasks" (the ones summed), "missing" (keys of the
    questions with no answer, scored wrong), "unexpected" (answer ids of no image), "parser"
    ("official" | "lmms_eval")}. Records: read_mme's (question_id, question, answer,
    subtask; key and prompt when present). Answers: {"question_id", "text"} with "prompt"
    or "question", joined as the module docstring says."""
    _check_parser(parser)
    parse = _PARSE[parser]
    pairs, unexpected = join(records, answers)
    groups: dict[str, dict[tuple, list[bool]]] = {}
    stats: dict[str, dict] = {}
    missing = []
    for r, a in pairs:
        gt = str(r["answer"]).strip().lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"question {r['key']!r}: answer must be Yes or No, got "
                             f"{r['answer']!r}")
        s = stats.setdefault(r["subtask"], {"n_correct": 0, "n_other": 0, "n_questions": 0})
        if a is not None:
            pred = parse(a.get("text", ""))
            s["n_other"] += pred == "other"
        else:
            missing.append(r["key"])
            pred = None
        ok = pred == gt
        s["n_questions"] += 1
        s["n_correct"] += ok
        groups.setdefault(r["subtask"], {}).setdefault(image_key(r["question_id"]),
                                                       []).append(ok)
    out_tasks = {}
    for subtask in sorted(stats):
        s, images = stats[subtask], groups[subtask]
        # MME's acc+: an image counts when both its questions are right.
        both = sum(all(v) for v in images.values())
        acc = 100.0 * s["n_correct"] / s["n_questions"]
        acc_plus = 100.0 * both / len(images)
        out_tasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                              "n_questions": s["n_questions"], "n_images": len(images),
                              "n_correct": s["n_correct"], "n_images_correct": both,
                              "n_other": s["n_other"]}
    perception = [t for t in PERCEPTION if t in out_tasks]
    cognition = [t for t in COGNITION if t in out_tasks]
    p = float(sum(out_tasks[t]["score"] for t in perception))
    c = float(sum(out_tasks[t]["score"] for t in cognition))
    return {"subtasks": out_tasks, "perception": p, "cognition": c, "total": p + c,
            "perception_subtasks": perception, "cognition_subtasks": cognition,
            "missing": missing, "unexpected": unexpected, "parser": parser}


# ---- LLaVA's file formats ---------------------------------------------------------------------
def llava_questions(records: list[dict]) -> list[dict]:
    """Question records in llava_mme.jsonl's format for LLaVA's model_vqa_loader
    (--image-folder = the MME root): {"question_id" (shared per image), "image" (relative to
    the root), "text" (the prompt), "category"}. LLaVA's convert_answer_to_mme.py accepts
    the answers model_vqa_loader writes for them."""
    return [{"question_id": r["question_id"], "image": r["image_file"],
             "text": r.get("prompt") or prompt(r["question"]), "category": r["subtask"]}
            for r in records]


def llava_answers(samples: list[dict]) -> list[dict]:
    """Answer records {"question_id", "prompt", "text"} as LLaVA's model_vqa_loader writes
    them, which convert_answer_to_mme.py accepts. Samples have question_id, text and prompt
    (else question: its prompt(question) is used); samples with an "error" (no answer) are
    left out. The answers of an image are made adjacent (first-appearance order of the ids),
    since calculation.py pairs consecutive lines of a subtask as one image."""
    order: dict[str, list[dict]] = {}
    for s in samples:
        if "error" in s:
            continue
        asked = s.get("prompt") or (prompt(s["question"]) if s.get("question") else None)
        if asked is None or "text" not in s or "question_id" not in s:
            raise ValueError(f"MME sample needs question_id, text and prompt (or question): "
                             f"{s!r}")
        order.setdefault(str(s["question_id"]), []).append(
            {"question_id": s["question_id"], "prompt": asked, "text": s["text"]})
    return [a for group in order.values() for a in group]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="MME questions / scoring (official calculation "
                                            "or lmms-eval).")
    p.add_argument("--root", required=True, help="MME_Benchmark_release_version folder")
    p.add_argument("--questions", default=None,
                   help="LLaVA's llava_mme.jsonl (joined with the ground truth under --root); "
                        "default: every question under --root")
    p.add_argument("--answers", default=None,
                   help="answers .jsonl (question_id, text, and prompt or question)")
    p.add_argument("--parser", default="official", choices=PARSERS)
    p.add_argument("--write-questions", default=None, help="write LLaVA-style questions")
    p.add_argument("--write-answers", default=None,
                   help="write the joined answers in LLaVA's format (question_id, prompt, "
                        "text), for convert_answer_to_mme.py")
    p.add_argument("--out", default=None, help="write the full result as JSON")
    args = p.parse_args(argv)
    records = (read_llava_questions(args.questions, args.root) if args.questions
               else read_mme(args.root))
    if args.write_questions:
        write_jsonl(llava_questions(records), args.write_questions, sort_keys=False)
        print(f"wrote {len(records)} questions to {args.write_questions}")
    if args.write_answers and not args.answers:
        p.error("--write-answers needs --answers")
    if args.answers:
        answers = read_jsonl(args.answers)
        result = score(records, answers, parser=args.parser)
        for name, m in result["subtasks"].items():
            print(f"{name:24s} score {m['score']:7.2f}  acc {m['acc']:6.2f}  acc+ "
                  f"{m['acc_plus']:6.2f}  ({m['n_questions']} q, {m['n_other']} other)")
        print(f"parser {result['parser']}: perception {result['perception']:.2f}  cognition "
              f"{result['cognition']:.2f}  total {result['total']:.2f}; "
              f"{len(result['missing'])} missing, {len(result['unexpected'])} unexpected")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        if args.write_answers:
            pairs, _ = join(records, answers)
            joined = [{"question_id": r["question_id"],
                       "prompt": r.get("prompt") or prompt(r["question"]), "text": a["text"]}
                      for r, a in pairs if a is not None]
            write_jsonl(llava_answers(joined), args.write_answers, sort_keys=False)
            print(f"wrote {len(joined)} answers to {args.write_answers}")


if __name__ == "__main__":
    main()
