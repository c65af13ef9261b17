"""MME (Fu et al. 2023, "MME: A Comprehensive Evaluation Benchmark for Multimodal Large
Language Models") read from its release folders and scored as its official
eval_tool/calculation.py scores it, with one deliberate change: answers are joined to
questions by question_id, never by position or by line order.

Folder format (MME_Benchmark_release_version/): one folder per subtask. A subtask folder
holds either images/ + questions_answers_YN/ (artwork, celebrity, landmark, posters, scene)
or the images and their .txt files side by side (the others). Each .txt is named after its
image and has two lines "question<TAB>Yes|No" (one Yes, one No in the release).

Prompt (LLaVA-1.5's llava_mme.jsonl, reproduced by lmms-eval's mme task): the question with
its "Please answer yes or no." removed, then "\\nAnswer the question using a single word or
phrase." (LLaVA's convert_answer_to_mme.py puts " Please answer yes or no." back to find
the ground truth, which is why it is absent from the prompt).

Scoring, per subtask: acc = 100 * correct questions / questions; acc_plus = 100 * images
with both questions correct / images; score = acc + acc_plus (at most 200). perception =
sum of the scores of the 10 perception subtasks, cognition = sum over the 4 cognition
subtasks (each over the subtasks present; see "perception_subtasks" / "cognition_subtasks"),
total = perception + cognition. A question with no answer is wrong (listed under
"missing"); answers for ids no question has are listed under "unexpected", not scored.

  python -m jaxground.eval.mme --root MME_Benchmark_release_version --answers A.jsonl
  python -m jaxground.eval.mme --root MME_Benchmark_release_version --write-questions Q.jsonl
"""

from __future__ import annotations

import argparse
import json
import os

from jaxground.data.coco import read_jsonl
from jaxground.eval.pope import index_by_question_id

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION

PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
YES_NO_PROMPT = "Please answer yes or no."
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
QA_DIR, IMAGE_DIR = "questions_answers_YN", "images"


def prompt(question: str) -> str:
    """The prompt LLaVA-1.5 is asked for an MME question (see the module docstring)."""
    return question.replace(YES_NO_PROMPT, "").strip() + PROMPT_SUFFIX


def parse_answer(text: str) -> str:
    """MME's parse_pred_ans on the lowercased, stripped prediction with '.' removed:
    "yes" | "no" if it is exactly that, else "yes" if its first 4 characters contain "yes",
    else "no" if they contain "no", else "other" ("Nope" and "not" read as no, "I think so"
    as other)."""
    pred = str(text).lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


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
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if "\t" not in line:
                raise ValueError(f"{path}:{n}: expected 'question<TAB>Yes|No', got {line!r}")
            question, answer = (s.strip() for s in line.rsplit("\t", 1))
            if answer.lower() not in ("yes", "no"):
                raise ValueError(f"{path}:{n}: answer must be Yes or No, got {answer!r}")
            out.append((question, "Yes" if answer.lower() == "yes" else "No"))
    return out


def read_mme(root: str, subtasks=None) -> list[dict]:
    """Question records {"question_id", "subtask", "image" (path), "image_file" (relative
    to root, what LLaVA's --image-folder takes), "question", "answer" ("Yes" | "No")}, in
    a stable order (subtasks, then .txt files, sorted by name; questions in file order).
    question_id is f"{subtask}/{image file name}/{k}", k = 0, 1. Folders that are neither
    layout are skipped; `subtasks` restricts the folders read."""
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
            for k, (question, answer) in enumerate(qas):
                records.append({"question_id": f"{subtask}/{images[stem]}/{k}",
                                "subtask": subtask, "image": image,
                                "image_file": os.path.relpath(image, root),
                                "question": question, "answer": answer})
    return records


def score(records: list[dict], answers: list[dict]) -> dict:
    """{"subtasks": {subtask: {acc, acc_plus, score, n_questions, n_images, n_correct,
    n_images_correct, n_other}}, "perception", "cognition", "total",
    "perception_subtasks", "cognition_subtasks" (the ones summed), "missing" (question ids
    with no answer, scored wrong), "unexpected" (answer ids no question has)}.
    Answers are {"question_id", "text"} joined by question_id."""
    by_id = index_by_question_id(answers, "answer")
    seen: set[str] = set()
    groups: dict[str, dict[str, list[bool]]] = {}
    stats: dict[str, dict] = {}
    missing = []
    for r in records:
        k = str(r["question_id"])
        if k in seen:
            raise ValueError(f"duplicate question_id {r['question_id']!r}")
        seen.add(k)
        gt = str(r["answer"]).strip().lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"question {k!r}: answer must be Yes or No, got {r['answer']!r}")
        s = stats.setdefault(r["subtask"], {"n_correct": 0, "n_other": 0, "n_questions": 0})
        if k in by_id:
            pred = parse_answer(by_id[k].get("text", ""))
            s["n_other"] += pred == "other"
        else:
            missing.append(r["question_id"])
            pred = None
        ok = pred == gt
        s["n_questions"] += 1
        s["n_correct"] += ok
        groups.setdefault(r["subtask"], {}).setdefault(str(r["image"]), []).append(ok)
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
    p = sum(out_tasks[t]["score"] for t in perception)
    c = sum(out_tasks[t]["score"] for t in cognition)
    return {"subtasks": out_tasks, "perception": p, "cognition": c, "total": p + c,
            "perception_subtasks": perception, "cognition_subtasks": cognition,
            "missing": missing,
            "unexpected": [a["question_id"] for k, a in by_id.items() if k not in seen]}


def llava_questions(records: list[dict]) -> list[dict]:
    """Question records for LLaVA's model_vqa_loader (--image-folder = the MME root)."""
    return [{"question_id": r["question_id"], "image": r["image_file"],
             "text": prompt(r["question"]), "category": r["subtask"]} for r in records]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="MME questions / scoring (official calculation).")
    p.add_argument("--root", required=True, help="MME_Benchmark_release_version folder")
    p.add_argument("--answers", default=None, help="answers .jsonl (question_id, text)")
    p.add_argument("--write-questions", default=None, help="write LLaVA-style questions")
    p.add_argument("--out", default=None, help="write the full result as JSON")
    args = p.parse_args(argv)
    records = read_mme(args.root)
    if args.write_questions:
        with open(args.write_questions, "w") as f:
            for q in llava_questions(records):
                f.write(json.dumps(q, ensure_ascii=False) + "\n")
        print(f"wrote {len(records)} questions to {args.write_questions}")
    if args.answers:
        result = score(records, read_jsonl(args.answers))
        for name, m in result["subtasks"].items():
            print(f"{name:24s} score {m['score']:7.2f}  acc {m['acc']:6.2f}  acc+ "
                  f"{m['acc_plus']:6.2f}  ({m['n_questions']} q, {m['n_other']} other)")
        print(f"perception {result['perception']:.2f}  cognition {result['cognition']:.2f}"
              f"  total {result['total']:.2f}; {len(result['missing'])} missing, "
              f"{len(result['unexpected'])} unexpected")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
