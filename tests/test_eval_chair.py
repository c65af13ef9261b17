"""CHAIR, against hand-worked numbers on a hand-made COCO-format folder."""

import json

import pytest

from jaxground.data.coco import load_coco
from jaxground.data.objects import ObjectVocabulary
from jaxground.eval import chair

CATEGORIES = {1: "person", 4: "motorcycle", 11: "fire hydrant", 18: "dog", 22: "elephant",
              62: "chair", 70: "toilet"}
INSTANCES = {1: [1, 18], 2: [11], 3: [22], 4: [70]}   # image -> annotated category ids
REFERENCES = {
    1: ["A man walking his dog on a leash."],                                 # person, dog
    2: ["A red fire hydrant on a street corner next to a motorcycle."],       # + motorcycle
    3: ["An elephant in the grass."],
    4: ["A white toilet in a bathroom."],
}
CAPTIONS = [
    # person (man), dog (dogs), chair -> chair hallucinated; 11 words
    {"image_id": 1, "caption": "A man and two dogs on a sidewalk with a chair."},
    # fire hydrant, motorcycle (motorbike): motorcycle is only in the reference caption,
    # so it is ground truth, not a hallucination; 8 words
    {"image_id": 2, "caption": "A fire hydrant next to a parked motorbike."},
    # baby elephant -> elephant (not person), adult elephant -> elephant, dog hallucinated;
    # 12 words
    {"image_id": 3, "caption": "A baby elephant walking next to an adult elephant and a dog."},
    # "seat" with a toilet is no chair; toilet, man -> person, woman -> person: two
    # hallucinated mentions of the same category, both counted; 12 words
    {"image_id": 4, "caption": "The seat of a toilet next to a man and a woman."},
    # dog only: no hallucination, person not recalled; 5 words
    {"image_id": "1", "caption": "A dog on the grass."},
]


def _coco(tmp_path):
    (tmp_path / "annotations").mkdir()
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 64}
              for i in INSTANCES]
    categories = [{"id": k, "name": v} for k, v in CATEGORIES.items()]
    anns = [{"id": n, "image_id": i, "category_id": c, "bbox": [0, 0, 8, 8]}
            for n, (i, c) in enumerate((i, c) for i, cs in INSTANCES.items() for c in cs)]
    caps = [{"id": n, "image_id": i, "caption": t}
            for n, (i, t) in enumerate((i, t) for i, ts in REFERENCES.items() for t in ts)]
    (tmp_path / "annotations" / "instances.json").write_text(
        json.dumps({"images": images, "categories": categories, "annotations": anns}))
    (tmp_path / "annotations" / "captions.json").write_text(
        json.dumps({"images": images, "annotations": caps}))
    return str(tmp_path)


def _check(result):
    # mentions per caption: 3 + 2 + 3 + 3 + 1 = 12; hallucinated: 1 + 0 + 1 + 2 + 0 = 4
    assert result["num_mentions"] == 12 and result["num_hallucinated"] == 4
    assert result["chair_i"] == pytest.approx(4 / 12)
    # captions with a hallucination: 1, 3, 4 of 5
    assert result["chair_s"] == pytest.approx(3 / 5)
    # annotated categories covered / annotated: (2 + 1 + 1 + 1 + 1) / (2 + 1 + 1 + 1 + 2)
    assert result["recall"] == pytest.approx(6 / 7)
    # words: (11 + 8 + 12 + 12 + 5) / 5
    assert result["mean_length"] == pytest.approx(48 / 5)
    per = result["per_caption"]
    assert [p["hallucinated"] for p in per] == [
        [["chair", "chair"]], [], [["dog", "dog"]],
        [["man", "person"], ["woman", "person"]], []]
    assert per[0]["mentioned"] == [["man", "person"], ["dog", "dog"], ["chair", "chair"]]
    assert per[1]["mentioned"] == [["fire hydrant", "fire hydrant"], ["motorbike", "motorcycle"]]
    assert per[1]["gt_objects"] == ["fire hydrant", "motorcycle"]
    assert per[2]["mentioned"] == [["elephant", "elephant"], ["elephant", "elephant"],
                                   ["dog", "dog"]]
    assert [p["chair_s"] for p in per] == [1, 0, 1, 1, 0]
    assert per[3]["chair_i"] == pytest.approx(2 / 3)
    assert per[4]["image_id"] == "1" and per[4]["gt_objects"] == ["dog", "person"]


def test_chair_from_folder(tmp_path):
    _check(chair.score(CAPTIONS, _coco(tmp_path)))


def test_chair_from_index_and_reference_objects(tmp_path):
    index = load_coco(_coco(tmp_path))
    assert index.present[2] == {"fire hydrant"}   # motorcycle only from the reference caption
    _check(chair.score_from_index(CAPTIONS, index, ObjectVocabulary.coco()))


def test_chair_edge_cases(tmp_path):
    index = load_coco(_coco(tmp_path))
    out = chair.score_from_index([{"image_id": 3, "caption": "Grass and sky."}], index)
    assert (out["chair_s"], out["chair_i"], out["recall"]) == (0.0, 0.0, 0.0)
    assert out["per_caption"][0]["chair_i"] == 0.0
    empty = chair.score_from_index([], index)
    assert empty["chair_s"] == 0.0 and empty["num_captions"] == 0
    with pytest.raises(KeyError, match="999"):
        chair.score_from_index([{"image_id": 999, "caption": "A dog."}], index)


def test_read_captions(tmp_path):
    lines = tmp_path / "caps.jsonl"
    lines.write_text('{"image_id": 1, "text": "A dog."}\n{"image_id": 2, "caption": "A cat."}\n')
    assert chair.read_captions(str(lines)) == [{"image_id": 1, "caption": "A dog."},
                                               {"image_id": 2, "caption": "A cat."}]
    single = tmp_path / "one.jsonl"
    single.write_text('{"image_id": 1, "caption": "A dog."}\n')
    assert chair.read_captions(str(single)) == [{"image_id": 1, "caption": "A dog."}]
    listed = tmp_path / "caps.json"
    listed.write_text(json.dumps(CAPTIONS))
    assert chair.read_captions(str(listed)) == CAPTIONS
