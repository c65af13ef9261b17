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
    assert set(out) == {"random", "adversarial", "mean_f1", "unexpected"}
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
