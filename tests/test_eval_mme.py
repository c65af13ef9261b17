"""MME reading, LLaVA prompt, MME's answer parser and scoring, on a hand-made 2-subtask
MME folder (both layouts) whose scores are worked out by hand below."""

import json
import os
import random

import pytest
from PIL import Image

from jaxground.eval import mme

YN = " Please answer yes or no."


def _png(path, color):
    Image.new("RGB", (4, 4), color).save(path)


def _txt(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{q}\t{a}\n" for q, a in lines))


@pytest.fixture
def mme_root(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    # existence: images/ + questions_answers_YN/ layout, 3 images.
    ex = root / "existence"
    (ex / "images").mkdir(parents=True)
    (ex / "questions_answers_YN").mkdir()
    for name, color, obj in [("a", "red", "cat"), ("b", "green", "dog"), ("c", "blue", "car")]:
        _png(ex / "images" / f"{name}.png", color)
        _txt(ex / "questions_answers_YN" / f"{name}.txt",
             [(f"Is there a {obj} in this image?{YN}", "Yes"),
              (f"Is there a giraffe in this image?{YN}", "No")])
    # commonsense_reasoning: images and .txt side by side, 2 images (one .jpg), the No
    # question first in x.txt; a CRLF file with a trailing blank line in y.txt.
    cr = root / "commonsense_reasoning"
    cr.mkdir()
    _png(cr / "x.png", "white")
    Image.new("RGB", (4, 4), "black").save(cr / "y.jpg")
    _txt(cr / "x.txt", [(f"Should I wear a coat here?{YN}", "No"),
                        (f"Is it sunny?{YN}", "Yes")])
    with open(cr / "y.txt", "w", encoding="utf-8", newline="") as f:
        f.write(f"Is it night?{YN}\tYes\r\nIs it noon?{YN}\tNo\r\n\r\n")
    # Not a subtask folder (no .txt): skipped.
    (root / "eval_tool").mkdir()
    (root / "eval_tool" / "calculation.py").write_text("")
    return root


# Answers, worked out by hand (MME's parser in brackets; ok = matches the ground truth):
#   existence/a.png/0  gt Yes  "Yes."             [yes] ok
#   existence/a.png/1  gt No   "No, there is not" [no]  ok   -> a: both right
#   existence/b.png/0  gt Yes  "yes"              [yes] ok
#   existence/b.png/1  gt No   "yes"              [yes] wrong
#   existence/c.png/0  gt Yes  "I think so"       [other] wrong
#   existence/c.png/1  gt No   "Nope"             [no]  ok
#   existence: acc = 4/6 = 66.67, acc+ = 1/3 (only a) = 33.33, score = 100.00, 1 other
#   commonsense_reasoning/x.png/0  gt No   "No"     [no]  ok
#   commonsense_reasoning/x.png/1  gt Yes  " YES "  [yes] ok      -> x: both right
#   commonsense_reasoning/y.jpg/0  gt Yes  (no answer)    wrong, listed as missing
#   commonsense_reasoning/y.jpg/1  gt No   "no."    [no]  ok
#   commonsense_reasoning: acc = 3/4 = 75, acc+ = 1/2 = 50, score = 125
#   perception = 100, cognition = 125, total = 225
ANSWERS = [
    {"question_id": "existence/a.png/0", "text": "Yes."},
    {"question_id": "existence/a.png/1", "text": "No, there is not"},
    {"question_id": "existence/b.png/0", "text": "yes"},
    {"question_id": "existence/b.png/1", "text": "yes"},
    {"question_id": "existence/c.png/0", "text": "I think so"},
    {"question_id": "existence/c.png/1", "text": "Nope"},
    {"question_id": "commonsense_reasoning/x.png/0", "text": "No"},
    {"question_id": "commonsense_reasoning/x.png/1", "text": " YES "},
    {"question_id": "commonsense_reasoning/y.jpg/1", "text": "no."},
    {"question_id": "existence/zzz.png/0", "text": "Yes"},  # no such question
]


def _check(result):
    ex, cr = result["subtasks"]["existence"], result["subtasks"]["commonsense_reasoning"]
    assert set(result["subtasks"]) == {"existence", "commonsense_reasoning"}
    assert ex["acc"] == pytest.approx(400 / 6)
    assert ex["acc_plus"] == pytest.approx(100 / 3)
    assert ex["score"] == pytest.approx(100.0)
    assert (ex["n_questions"], ex["n_images"], ex["n_correct"], ex["n_images_correct"],
            ex["n_other"]) == (6, 3, 4, 1, 1)
    assert cr["acc"] == pytest.approx(75.0)
    assert cr["acc_plus"] == pytest.approx(50.0)
    assert cr["score"] == pytest.approx(125.0)
    assert (cr["n_questions"], cr["n_images"], cr["n_correct"], cr["n_images_correct"],
            cr["n_other"]) == (4, 2, 3, 1, 0)
    assert result["perception"] == pytest.approx(100.0)
    assert result["cognition"] == pytest.approx(125.0)
    assert result["total"] == pytest.approx(225.0)
    assert result["perception_subtasks"] == ["existence"]
    assert result["cognition_subtasks"] == ["commonsense_reasoning"]
    assert result["missing"] == ["commonsense_reasoning/y.jpg/0"]
    assert result["unexpected"] == ["existence/zzz.png/0"]


def test_read_mme(mme_root):
    recs = mme.read_mme(str(mme_root))
    assert [r["question_id"] for r in recs] == [
        "commonsense_reasoning/x.png/0", "commonsense_reasoning/x.png/1",
        "commonsense_reasoning/y.jpg/0", "commonsense_reasoning/y.jpg/1",
        "existence/a.png/0", "existence/a.png/1", "existence/b.png/0",
        "existence/b.png/1", "existence/c.png/0", "existence/c.png/1"]
    by_id = {r["question_id"]: r for r in recs}
    a0 = by_id["existence/a.png/0"]
    assert a0["subtask"] == "existence"
    assert a0["image"] == os.path.join(str(mme_root), "existence", "images", "a.png")
    assert a0["image_file"] == os.path.join("existence", "images", "a.png")
    assert a0["question"] == "Is there a cat in this image? Please answer yes or no."
    assert a0["answer"] == "Yes"
    assert by_id["existence/a.png/1"]["answer"] == "No"
    x0, y0 = by_id["commonsense_reasoning/x.png/0"], by_id["commonsense_reasoning/y.jpg/0"]
    assert (x0["question"], x0["answer"]) == ("Should I wear a coat here?" + YN, "No")
    assert x0["image"] == os.path.join(str(mme_root), "commonsense_reasoning", "x.png")
    assert (y0["question"], y0["answer"]) == ("Is it night?" + YN, "Yes")
    assert by_id["commonsense_reasoning/y.jpg/1"]["answer"] == "No"
    assert all(os.path.isfile(r["image"]) for r in recs)
    assert mme.read_mme(str(mme_root)) == recs  # stable
    assert {r["subtask"] for r in mme.read_mme(str(mme_root), subtasks={"existence"})} \
        == {"existence"}


def test_read_mme_errors(tmp_path):
    sub = tmp_path / "count"
    sub.mkdir()
    _png(sub / "p.png", "red")
    _txt(sub / "p.txt", [("How many?", "Yes"), ("Two?", "No"), ("Three?", "No")])
    with pytest.raises(ValueError, match="2 questions"):
        mme.read_mme(str(tmp_path))
    _txt(sub / "p.txt", [("How many?", "Yes"), ("Two?", "Maybe")])
    with pytest.raises(ValueError, match="Yes or No"):
        mme.read_mme(str(tmp_path))
    os.remove(sub / "p.png")
    _txt(sub / "p.txt", [("How many?", "Yes"), ("Two?", "No")])
    with pytest.raises(FileNotFoundError):
        mme.read_mme(str(tmp_path))


def test_prompt():
    # LLaVA-1.5 (llava_mme.jsonl / lmms-eval): drop "Please answer yes or no.", add the suffix.
    assert mme.prompt("Is there a cat in this image? Please answer yes or no.") == (
        "Is there a cat in this image?\nAnswer the question using a single word or phrase.")
    assert mme.prompt("Is it red?") == (
        "Is it red?\nAnswer the question using a single word or phrase.")


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("No", "no"), ("yes", "yes"), ("Yes.", "yes"), ("  NO.  ", "no"),
    ("No, there is not", "no"), ("Yes, there is a cat.", "yes"), ("Nope", "no"),
    ("not sure", "no"), ("I think so", "other"), ("There is a cat", "other"),
    ("The answer is yes", "other"),  # "yes" is not in the first 4 characters
    ("I don't know", "other"), ("know", "no"), ("Unknown", "other"), ("", "other"),
    ("y.e.s", "yes"),  # '.' removed before matching
    ("ayes", "yes"), ("anon", "no"),
    ("noyes", "no"),  # only the first 4 characters ("noye") are looked at
])
def test_parse_answer(text, expected):
    assert mme.parse_answer(text) == expected


def test_score_by_hand(mme_root):
    _check(mme.score(mme.read_mme(str(mme_root)), ANSWERS))


def test_score_shuffled_answers(mme_root):
    recs = mme.read_mme(str(mme_root))
    for seed in range(3):
        shuffled = list(ANSWERS)
        random.Random(seed).shuffle(shuffled)
        assert shuffled != ANSWERS
        _check(mme.score(recs, shuffled))
    # Records in another order too, and integer-free ids round-trip through JSON.
    _check(mme.score(list(reversed(recs)), json.loads(json.dumps(ANSWERS[::-1]))))


def test_score_perfect_and_errors(mme_root):
    recs = mme.read_mme(str(mme_root))
    perfect = [{"question_id": r["question_id"], "text": r["answer"]} for r in recs]
    res = mme.score(recs, perfect)
    assert res["subtasks"]["existence"]["score"] == pytest.approx(200.0)
    assert res["total"] == pytest.approx(400.0)
    assert res["missing"] == [] and res["unexpected"] == []
    empty = mme.score(recs, [])
    assert empty["total"] == 0.0 and len(empty["missing"]) == len(recs)
    with pytest.raises(ValueError, match="duplicate"):
        mme.score(recs, perfect + perfect[:1])


def test_llava_questions_and_cli(mme_root, tmp_path, capsys):
    recs = mme.read_mme(str(mme_root))
    qs = mme.llava_questions(recs)
    assert qs[0] == {"question_id": "commonsense_reasoning/x.png/0",
                     "image": os.path.join("commonsense_reasoning", "x.png"),
                     "text": mme.prompt("Should I wear a coat here?" + YN),
                     "category": "commonsense_reasoning"}
    ans = tmp_path / "answers.jsonl"
    ans.write_text("".join(json.dumps(a) + "\n" for a in ANSWERS))
    out, qfile = tmp_path / "result.json", tmp_path / "q.jsonl"
    mme.main(["--root", str(mme_root), "--answers", str(ans), "--out", str(out),
              "--write-questions", str(qfile)])
    _check(json.loads(out.read_text()))
    assert [json.loads(line) for line in qfile.read_text().splitlines()] == qs
    assert "total 225.00" in capsys.readouterr().out
