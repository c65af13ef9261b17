"""POPE scoring, against hand-worked numbers."""

import json

import pytest

from jaxground.eval import pope


@pytest.mark.parametrize("text,expected", [
    ("Yes, there is a dog.", "yes"),
    ("No.", "no"),
    ("There is not.", "no"),
    ("I don't know", "yes"),            # "don't" is not "not"
    ("Yes. There is no dog.", "yes"),   # only the first sentence counts
    ("There are no, none", "no"),       # commas are removed before splitting
    ("no", "no"),
    ("NO", "yes"),                      # LLaVA's check is case sensitive
    ("Nope", "yes"),
    ("Yes", "yes"),
])
def test_parse_answer_is_llavas(text, expected):
    assert pope.parse_answer(text) == expected


def _questions():
    return [{"question_id": "q1", "label": "yes"},
            {"question_id": "q2", "label": "no"},
            {"question_id": "q3", "label": "no"},
            {"question_id": "q4", "label": "yes"},
            {"question_id": "q5", "label": "yes"},   # never answered
            {"question_id": "q6", "label": "no"}]


def test_score_joins_by_id_and_counts_missing_and_unexpected():
    answers = [  # out of order, q5 missing, q99 unknown
        {"question_id": "q3", "text": "There is not."},        # no,  label no  -> TN
        {"question_id": "q99", "text": "Yes"},                 # unexpected, not scored
        {"question_id": "q1", "text": "Yes, there is a dog."}, # yes, label yes -> TP
        {"question_id": "q6", "text": "I don't know"},         # yes, label no  -> FP
        {"question_id": "q2", "text": "No."},                  # no,  label no  -> TN
        {"question_id": "q4", "text": "There is no dog."},     # no,  label yes -> FN
    ]                                                          # q5 missing, yes -> FN
    m = pope.score(_questions(), answers)
    # TP = 1 (q1), TN = 2 (q2, q3), FP = 1 (q6), FN = 2 (q4, q5); total 6
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["total"]) == (1, 1, 2, 2, 6)
    assert m["accuracy"] == pytest.approx(3 / 6)       # (TP + TN) / total
    assert m["precision"] == pytest.approx(1 / 2)      # TP / (TP + FP)
    assert m["recall"] == pytest.approx(1 / 3)         # TP / (TP + FN)
    # F1 = 2 * 1/2 * 1/3 / (1/2 + 1/3) = (1/3) / (5/6) = 2/5
    assert m["f1"] == pytest.approx(2 / 5)
    # yes ratio over the 5 real answers: q1 and q6 are yes -> 2/5
    assert m["yes_ratio"] == pytest.approx(2 / 5)
    assert m["answered"] == 5
    assert m["missing"] == ["q5"]
    assert m["unexpected"] == ["q99"]


def test_missing_no_question_counts_as_false_positive():
    m = pope.score([{"question_id": 1, "label": "no"}, {"question_id": 2, "label": "yes"}],
                   [{"question_id": 2, "text": "Yes"}])
    # q2 -> TP; q1 missing with label no -> FP. precision 1/2, recall 1/1, F1 = 2/3
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 0, 0)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == 1.0 and m["missing"] == [1]


def test_label_keys_and_id_types():
    questions = [  # jaxground's records: answer yes/no, label positive/negative
        {"question_id": "7_random_dog", "answer": "yes", "label": "positive"},
        {"question_id": "7_random_cat", "answer": "no", "label": "negative"},
        {"question_id": 3, "label": "positive"},     # label alone also understood
    ]
    answers = [{"question_id": "7_random_cat", "text": "No"},
               {"question_id": "7_random_dog", "text": "Yes"},
               {"question_id": "3", "text": "No"}]   # "3" is question 3
    m = pope.score(questions, answers)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 0, 1, 1)
    assert m["missing"] == [] and m["unexpected"] == []


def test_duplicates_and_bad_labels_are_errors():
    with pytest.raises(ValueError, match="duplicate"):
        pope.score([{"question_id": 1, "label": "yes"}] * 2, [])
    with pytest.raises(ValueError, match="duplicate"):
        pope.score([{"question_id": 1, "label": "yes"}], [{"question_id": 1, "text": "x"}] * 2)
    with pytest.raises(ValueError, match="label"):
        pope.score([{"question_id": 1, "label": "maybe"}], [])


def test_score_splits_mean_f1():
    questions = [
        {"question_id": "r1", "label": "yes", "strategy": "random"},
        {"question_id": "r2", "label": "no", "strategy": "random"},
        {"question_id": "a1", "label": "yes", "category": "adversarial"},
        {"question_id": "a2", "label": "no", "category": "adversarial"},
        {"question_id": "a3", "label": "yes", "category": "adversarial"},
        {"question_id": "a4", "label": "no", "category": "adversarial"},
    ]
    answers = [{"question_id": "a4", "text": "No"}, {"question_id": "r2", "text": "No"},
               {"question_id": "a1", "text": "Yes"}, {"question_id": "a2", "text": "Yes"},
               {"question_id": "a3", "text": "No"}, {"question_id": "r1", "text": "Yes"},
               {"question_id": "x", "text": "Yes"}]
    out = pope.score_splits(questions, answers)
    assert set(out) == {"random", "adversarial", "mean_f1", "unexpected", "parser"}
    assert out["parser"] == "llava" and out["random"]["parser"] == "llava"
    # random: TP 1, TN 1 -> P = R = F1 = 1, accuracy 1
    assert out["random"]["f1"] == 1.0 and out["random"]["accuracy"] == 1.0
    # adversarial: a1 TP, a2 FP, a3 FN, a4 TN -> P = 1/2, R = 1/2, F1 = 1/2
    adv = out["adversarial"]
    assert (adv["tp"], adv["fp"], adv["tn"], adv["fn"]) == (1, 1, 1, 1)
    assert adv["f1"] == pytest.approx(0.5) and adv["yes_ratio"] == pytest.approx(0.5)
    assert out["mean_f1"] == pytest.approx((1.0 + 0.5) / 2)   # 0.75
    assert out["unexpected"] == ["x"]


def test_read_pope_questions(tmp_path):
    official = tmp_path / "coco_pope_popular.json"   # JSON lines despite the name
    official.write_text(
        json.dumps({"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
                    "text": "Is there a snowboard in the image?", "label": "yes"}) + "\n"
        + json.dumps({"question_id": 2, "image": "COCO_val2014_000000310196.jpg",
                      "text": "Is there a dog in the image?", "label": "no"}) + "\n")
    qs = pope.read_pope_questions(str(official))
    assert [(q["question_id"], q["label"], q["category"]) for q in qs] == [
        (1, "yes", "popular"), (2, "no", "popular")]
    assert pope.prompt(qs[0]["text"]) == ("Is there a snowboard in the image?\n"
                                          "Answer the question using a single word or phrase.")

    ours = tmp_path / "records.jsonl"
    ours.write_text("\n".join(json.dumps(r) for r in [
        {"id": "1_0_pos", "kind": "caption", "text": "a dog", "label": "positive"},
        {"id": "q_1_random_dog", "question_id": "1_random_dog", "kind": "question",
         "text": "Is there a dog in the image?", "answer": "yes", "label": "positive",
         "strategy": "random"},
        {"id": "q_1_random_cat", "question_id": "1_random_cat", "kind": "question",
         "text": "Is there a cat in the image?", "answer": "no", "label": "negative",
         "strategy": "random"}]) + "\n")
    qs = pope.read_pope_questions(str(ours))
    assert [(q["question_id"], q["label"], q["strategy"]) for q in qs] == [
        ("1_random_dog", "yes", "random"), ("1_random_cat", "no", "random")]
    out = pope.score_splits(qs, [{"question_id": "1_random_dog", "text": "Yes"},
                                 {"question_id": "1_random_cat", "text": "No"}])
    assert out["random"]["accuracy"] == 1.0 and out["mean_f1"] == 1.0


# ---- prompt, parsers ----------------------------------------------------------------------
SUFFIX = "\nAnswer the question using a single word or phrase."


def test_prompt_appends_the_suffix_once():
    assert pope.prompt("Is there a dog in the image?") == "Is there a dog in the image?" + SUFFIX
    # LLaVA's llava_pope_test.jsonl already carries it: unchanged.
    assert pope.prompt("Is there a dog in the image?" + SUFFIX) == (
        "Is there a dog in the image?" + SUFFIX)
    assert pope.prompt("Is there a dog?", suffix="\nBe brief.") == "Is there a dog?\nBe brief."


@pytest.mark.parametrize("text,expected", [
    ("Yes.", "yes."), ("yes", "yes"), ("No, there is not", "no, there is not"),
    ("I don't know", "i don't know"), (" no ", "no"), ("NO\n", "no"),
])
def test_parse_answer_lmms_eval(text, expected):
    assert pope.parse_answer_lmms_eval(text) == expected


# Both parsers on the same answers, worked out by hand.
#   id  label  answer              llava                 lmms-eval (lower().strip(), exact)
#   q1  yes    "Yes."              yes  TP               "yes."  other, wrong
#   q2  yes    "yes"               yes  TP               "yes"   TP, right
#   q3  no     "No, there is not"  no   TN               other, wrong
#   q4  no     "I don't know"      yes  FP               other, wrong
#   q5  yes    " no "              no   FN ("no" word)   "no"    FN, wrong
#   q6  no     (no answer)         wrong -> FP           wrong, in no count
#   q7  no     "Yes"               yes  FP               "yes"   FP, wrong
#   q8  no     "no"                no   TN               "no"    TN, right
PARSER_QUESTIONS = [{"question_id": f"q{i}", "label": label} for i, label in enumerate(
    ["yes", "yes", "no", "no", "yes", "no", "no", "no"], 1)]
PARSER_ANSWERS = [{"question_id": "q1", "text": "Yes."}, {"question_id": "q2", "text": "yes"},
                  {"question_id": "q3", "text": "No, there is not"},
                  {"question_id": "q4", "text": "I don't know"},
                  {"question_id": "q5", "text": " no "}, {"question_id": "q7", "text": "Yes"},
                  {"question_id": "q8", "text": "no"}]


def test_llava_parser_by_hand():
    m = pope.score(PARSER_QUESTIONS, PARSER_ANSWERS)   # default: llava
    assert m["parser"] == "llava"
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["total"]) == (2, 3, 2, 1, 8)
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["precision"] == pytest.approx(2 / 5)
    assert m["recall"] == pytest.approx(2 / 3)
    # F1 = 2 * 2/5 * 2/3 / (2/5 + 2/3) = (8/15) / (16/15) = 1/2
    assert m["f1"] == pytest.approx(1 / 2)
    # yes ratio over the 7 answers: q1, q2, q4, q7 parse as yes
    assert m["yes_ratio"] == pytest.approx(4 / 7)
    assert (m["answered"], m["other"], m["missing"], m["unexpected"]) == (7, 0, ["q6"], [])


def test_lmms_eval_parser_by_hand():
    m = pope.score(PARSER_QUESTIONS, PARSER_ANSWERS, parser="lmms_eval")
    assert m["parser"] == "lmms_eval"
    # Only exact "yes" / "no" count: q2 TP, q7 FP, q8 TN, q5 FN; q1, q3, q4 are "other".
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["total"]) == (1, 1, 1, 1, 8)
    assert m["accuracy"] == pytest.approx(2 / 8)        # q2, q8 right of 8 questions
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(1 / 2)
    # lmms-eval's quirk: the yes ratio of the LABELS (q1, q2, q5 of 8), not of the answers.
    assert m["yes_ratio"] == pytest.approx(3 / 8)
    assert (m["answered"], m["other"], m["missing"]) == (7, 3, ["q6"])


def test_lmms_eval_zero_denominators_and_unknown_parser():
    m = pope.score([{"question_id": 1, "label": "no"}], [{"question_id": 1, "text": "No."}],
                   parser="lmms_eval")
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0, 0, 0,
                                                                                       0, 0)
    with pytest.raises(ValueError, match="llava.*lmms_eval"):
        pope.score(PARSER_QUESTIONS, PARSER_ANSWERS, parser="vqa")
    with pytest.raises(ValueError, match="llava.*lmms_eval"):
        pope.score_splits(PARSER_QUESTIONS, PARSER_ANSWERS, parser="official")


# ---- LLaVA's llava_pope_test.jsonl joined with coco_pope_<split>.json -------------------
def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _llava_pope(tmp_path):
    """A tiny llava_pope_test.jsonl (no labels, LLaVA's unique ids, categories interleaved)
    and the two label files it needs (each numbered from 1, no category)."""
    def q(i, image, obj, cat):
        return {"question_id": i, "image": image,
                "text": f"Is there a {obj} in the image?" + SUFFIX, "category": cat}

    def lab(i, image, obj, label):
        return {"question_id": i, "image": image, "text": f"Is there a {obj} in the image?",
                "label": label}

    llava = _write_jsonl(tmp_path / "llava_pope_test.jsonl", [
        q(1, "i1.jpg", "dog", "random"), q(2, "i1.jpg", "cat", "random"),
        q(3, "i2.jpg", "car", "adversarial"), q(4, "i2.jpg", "bus", "adversarial"),
        q(5, "i1.jpg", "bird", "random"), q(6, "i2.jpg", "road", "adversarial")])
    random_ = _write_jsonl(tmp_path / "coco_pope_random.json", [
        lab(1, "i1.jpg", "dog", "yes"), lab(2, "i1.jpg", "cat", "no"),
        lab(3, "i1.jpg", "bird", "no")])
    adv = _write_jsonl(tmp_path / "coco_pope_adversarial.json", [
        lab(1, "i2.jpg", "car", "yes"), lab(2, "i2.jpg", "bus", "no"),
        lab(3, "i2.jpg", "road", "yes")])
    return llava, random_, adv


# LLaVA ids; random: 1 dog yes, 2 cat no, 5 bird no; adversarial: 3 car yes, 4 bus no, 6 road yes
JOIN_ANSWERS = [{"question_id": 6, "text": "No"},           # adversarial FN
                {"question_id": 1, "text": "Yes"},          # random TP
                {"question_id": 2, "text": "No"},           # random TN
                {"question_id": 5, "text": "Yes, a bird."},  # random FP
                {"question_id": 3, "text": "Yes"},          # adversarial TP
                {"question_id": 4, "text": "Yes"}]          # adversarial FP


def _check_join_scores(out):
    # random: TP 1, FP 1, TN 1 -> acc 2/3, P 1/2, R 1, F1 = 2 * 1/2 / (3/2) = 2/3, yes 2/3
    r = out["random"]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (1, 1, 1, 0)
    assert r["accuracy"] == pytest.approx(2 / 3) and r["precision"] == pytest.approx(1 / 2)
    assert r["recall"] == 1.0 and r["f1"] == pytest.approx(2 / 3)
    assert r["yes_ratio"] == pytest.approx(2 / 3)
    # adversarial: TP 1, FP 1, FN 1 -> acc 1/3, P = R = F1 = 1/2, yes 2/3
    a = out["adversarial"]
    assert (a["tp"], a["fp"], a["tn"], a["fn"]) == (1, 1, 0, 1)
    assert a["accuracy"] == pytest.approx(1 / 3) and a["f1"] == pytest.approx(1 / 2)
    assert out["mean_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)   # 7/12
    assert out["unexpected"] == [] and r["missing"] == [] and a["missing"] == []


def test_load_questions_joins_llava_file_with_label_files(tmp_path):
    llava, random_, adv = _llava_pope(tmp_path)
    qs = pope.load_questions([adv, llava, random_])   # label files in any order
    assert [(q["question_id"], q["label"], q["category"]) for q in qs] == [
        (1, "yes", "random"), (2, "no", "random"), (3, "yes", "adversarial"),
        (4, "no", "adversarial"), (5, "no", "random"), (6, "yes", "adversarial")]
    assert qs[4]["text"] == "Is there a bird in the image?" + SUFFIX   # as in the file
    assert qs[4]["image"] == "i1.jpg"
    assert pope.prompt(qs[4]["text"]) == qs[4]["text"]                # suffix not doubled
    _check_join_scores(pope.score_splits(qs, JOIN_ANSWERS))


def test_pope_cli_with_llava_files(tmp_path, capsys):
    llava, random_, adv = _llava_pope(tmp_path)
    answers = _write_jsonl(tmp_path / "answers.jsonl", JOIN_ANSWERS)
    out = tmp_path / "result.json"
    pope.main(["--questions", llava, random_, adv, "--answers", answers, "--out", str(out)])
    result = json.loads(out.read_text())
    _check_join_scores(result)
    assert result["parser"] == "llava"
    assert "mean F1 0.5833" in capsys.readouterr().out
    pope.main(["--questions", llava, random_, adv, "--answers", answers, "--out", str(out),
               "--parser", "lmms_eval"])
    result = json.loads(out.read_text())
    # lmms-eval: "Yes, a bird." (5) is other; the rest are exact -> random TP 1, TN 1
    assert result["parser"] == "lmms_eval"
    assert (result["random"]["tp"], result["random"]["fp"], result["random"]["other"]) == (
        1, 0, 1)
    assert result["random"]["accuracy"] == pytest.approx(2 / 3)
    assert result["random"]["yes_ratio"] == pytest.approx(1 / 3)   # labels: dog of 3


def test_load_questions_unused_label_file_and_several_label_files(tmp_path):
    llava, random_, adv = _llava_pope(tmp_path)
    popular = _write_jsonl(tmp_path / "coco_pope_popular.json", [
        {"question_id": 1, "image": "i3.jpg", "text": "Is there a cup in the image?",
         "label": "yes"}])
    qs = pope.load_questions([llava, random_, adv, popular])
    # popular is read on its own beside LLaVA's ids: qualified by its split
    assert [q["question_id"] for q in qs] == [1, 2, 3, 4, 5, 6, "popular/1"]
    assert (qs[-1]["label"], qs[-1]["category"]) == ("yes", "popular")
    # label files alone: ids qualified when there are several, kept when there is one
    qs = pope.load_questions([random_, adv])
    assert [q["question_id"] for q in qs] == ["random/1", "random/2", "random/3",
                                              "adversarial/1", "adversarial/2",
                                              "adversarial/3"]
    assert [q["question_id"] for q in pope.load_questions([random_])] == [1, 2, 3]
    assert pope.load_questions(random_) == pope.load_questions([random_])


def _rewrite(path, n, **changes):
    lines = open(path).read().splitlines()
    r = json.loads(lines[n - 1])
    r.update(changes)
    lines[n - 1] = json.dumps(r)
    open(path, "w").write("\n".join(lines) + "\n")


def test_load_questions_mismatch_errors(tmp_path):
    llava, random_, adv = _llava_pope(tmp_path)
    _rewrite(random_, 2, image="i9.jpg")              # pairs with llava line 2
    with pytest.raises(ValueError, match=r"llava_pope_test.jsonl:2 and .*coco_pope_random"
                                         r".json:2 do not match.*i9.jpg"):
        pope.load_questions([llava, random_, adv])
    _rewrite(random_, 2, image="i1.jpg", text="Is there a horse in the image?")
    with pytest.raises(ValueError, match=r"llava_pope_test.jsonl:2 and .*coco_pope_random"
                                         r".json:2 .*horse"):
        pope.load_questions([llava, random_, adv])
    _rewrite(random_, 2, text="Is there a cat in the image?")
    pope.load_questions([llava, random_, adv])        # repaired
    # one label line short: llava line 5 (the third random question) has no label
    lines = open(random_).read().splitlines()
    open(random_, "w").write("\n".join(lines[:2]) + "\n")
    with pytest.raises(ValueError, match=r"3 'random' questions but .*coco_pope_random.json "
                                         r"has 2 label lines: .*llava_pope_test.jsonl:5"):
        pope.load_questions([llava, random_, adv])
    # one label line too many
    open(random_, "w").write("\n".join(lines + [lines[0]]) + "\n")
    with pytest.raises(ValueError, match=r"coco_pope_random.json:4 has no question"):
        pope.load_questions([llava, random_, adv])


def test_load_questions_without_label_files(tmp_path):
    llava, random_, adv = _llava_pope(tmp_path)
    with pytest.raises(ValueError, match=r"llava_pope_test.jsonl has no labels.*"
                                         r"coco_pope_random.json"):
        pope.load_questions([llava])
    with pytest.raises(ValueError, match=r"llava_pope_test.jsonl has no labels.*"
                                         r"coco_pope_adversarial.json"):
        pope.load_questions([llava, random_])
    nocat = _write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "i1.jpg",
                                                 "text": "Is there a dog?"}])
    with pytest.raises(ValueError, match=r"q.jsonl:1: .*category"):
        pope.load_questions([nocat, random_])
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [
        {"question_id": 1, "image": "i1.jpg", "text": "a?", "label": "yes"},
        {"question_id": 2, "image": "i1.jpg", "text": "b?"}])
    with pytest.raises(ValueError, match=r"mixed.jsonl:2"):
        pope.load_questions([mixed])
    with pytest.raises(ValueError, match="twice"):
        pope.load_questions([random_, random_])
    empty = tmp_path / "coco_pope_popular.json"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="coco_pope_popular.json holds no POPE questions"):
        pope.load_questions([random_, str(empty)])
