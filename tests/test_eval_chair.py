"""CHAIR, against hand-worked numbers on hand-made COCO-format folders, under both
matchers: "reference" (the original code's quirks) and "clean" (jaxground's own)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxground.data.coco import load_coco
from jaxground.data.objects import ObjectVocabulary
from jaxground.eval import chair, chair_reference

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


def _coco_folder(root, categories: dict, instances: dict, references: dict) -> str:
    """A COCO-format folder: categories {id: name}, instances {image: [category ids]},
    references {image: [captions]}."""
    (root / "annotations").mkdir()
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 64}
              for i in sorted(set(instances) | set(references))]
    cats = [{"id": k, "name": v} for k, v in categories.items()]
    anns = [{"id": n, "image_id": i, "category_id": c, "bbox": [0, 0, 8, 8]}
            for n, (i, c) in enumerate((i, c) for i, cs in instances.items() for c in cs)]
    caps = [{"id": n, "image_id": i, "caption": t}
            for n, (i, t) in enumerate((i, t) for i, ts in references.items() for t in ts)]
    (root / "annotations" / "instances.json").write_text(
        json.dumps({"images": images, "categories": cats, "annotations": anns}))
    (root / "annotations" / "captions.json").write_text(
        json.dumps({"images": images, "annotations": caps}))
    return str(root)


def _coco(tmp_path):
    return _coco_folder(tmp_path, CATEGORIES, INSTANCES, REFERENCES)


# matcher -> (recall, mean_length). clean: annotated categories covered / annotated,
# (2 + 1 + 1 + 1 + 1) / (2 + 1 + 1 + 1 + 2); whitespace words (11 + 8 + 12 + 12 + 5) / 5.
# reference: ground-truth categories mentioned / ground truth (which includes reference-
# caption objects: motorcycle in image 2), (2 + 2 + 1 + 1 + 1) / (2 + 2 + 1 + 1 + 2); tokens
# after merging, "." included, "baby elephant" one: (12 + 8 + 11 + 13 + 6) / 5.
RECALL_LENGTH = {"clean": (6 / 7, 48 / 5), "reference": (7 / 8, 50 / 5)}


def _check(result, matcher):
    assert result["matcher"] == matcher
    # mentions per caption: 3 + 2 + 3 + 3 + 1 = 12; hallucinated: 1 + 0 + 1 + 2 + 0 = 4
    assert result["num_mentions"] == 12 and result["num_hallucinated"] == 4
    assert result["chair_i"] == pytest.approx(4 / 12)
    # captions with a hallucination: 1, 3, 4 of 5
    assert result["chair_s"] == pytest.approx(3 / 5)
    recall, mean_length = RECALL_LENGTH[matcher]
    assert result["recall"] == pytest.approx(recall)
    assert result["mean_length"] == pytest.approx(mean_length)
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
    _check(chair.score(CAPTIONS, _coco(tmp_path)), "reference")   # the default
    _check(chair.score(CAPTIONS, str(tmp_path), matcher="clean"), "clean")


@pytest.mark.parametrize("matcher", chair.MATCHERS)
def test_chair_from_index_and_reference_objects(tmp_path, matcher):
    index = load_coco(_coco(tmp_path))
    assert index.present[2] == {"fire hydrant"}   # motorcycle only from the reference caption
    _check(chair.score_from_index(CAPTIONS, index, ObjectVocabulary.coco(), matcher), matcher)


@pytest.mark.parametrize("matcher", chair.MATCHERS)
def test_chair_edge_cases(tmp_path, matcher):
    index = load_coco(_coco(tmp_path))
    out = chair.score_from_index([{"image_id": 3, "caption": "Grass and sky."}], index,
                                 matcher=matcher)
    assert (out["chair_s"], out["chair_i"], out["recall"]) == (0.0, 0.0, 0.0)
    assert out["per_caption"][0]["chair_i"] == 0.0
    empty = chair.score_from_index([], index, matcher=matcher)
    assert empty["chair_s"] == 0.0 and empty["num_captions"] == 0
    with pytest.raises(KeyError, match="999"):
        chair.score_from_index([{"image_id": 999, "caption": "A dog."}], index,
                               matcher=matcher)


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


# ---------------------------------------------------------------------------------------
# The two matchers on the quirks of the original code (LisaAnne/Hallucination
# utils/chair.py), each value worked by hand from its rules: nltk tokens of the lowercased
# caption, pattern's singularize, double words merged left to right, "seat" dropped next to
# "toilet", the synonyms split on ", " without stripping. Reference recall = categories
# mentioned that are in the ground truth (annotations + reference captions) / |ground
# truth|; reference length = tokens after merging, punctuation included. Clean recall =
# annotated categories mentioned / annotated; clean length = whitespace words.

QUIRK_IMAGES = {  # image -> (annotated categories, reference captions)
    # reference: "bus" -> "bu" matches nothing, so gt = {person}; clean also finds the bus
    201: (["person"], ["A bus full of people."]),
    202: (["person", "tie"], ["A man in a suit."]),
    203: (["person"], ["A woman smiling."]),
    204: (["hot dog"], ["A hot dog with mustard."]),
    205: (["person"], ["A man outside."]),
    206: (["cup", "dining table"], ["Mugs on a desk."]),          # desk -> dining table
    207: (["cake"], ["A cake on a plate."]),
    208: (["dog"], ["Two dogs in a yard."]),
    209: (["wine glass", "dining table"], ["A glass of wine."]),  # "glas", no object
    210: (["elephant"], ["An elephant in the grass."]),
    211: (["toilet"], ["A white toilet in a bathroom."]),
    212: (["dining table"], ["A wooden table."]),
}

# (image, caption, {matcher: (mentioned, chair_s, chair_i, recall, mean_length)})
QUIRKS = {
    # reference: a bu behind two bus . -> only "buses" (-> "bus") is a mention, and the
    # bus is hallucinated (gt {person}); clean: two mentions, bus in gt from the reference
    "bus": (201, "A bus behind two buses.", {
        "reference": ([["bus", "bus"]], 1.0, 1.0, 0 / 1, 6),
        "clean": ([["bus", "bus"], ["bus", "bus"]], 0.0, 0.0, 0 / 1, 5)}),
    # reference: "ties" -> "ty", not a synonym; a man wearing two ty .
    "ties": (202, "A man wearing two ties.", {
        "reference": ([["man", "person"]], 0.0, 0.0, 1 / 2, 6),
        "clean": ([["man", "person"], ["tie", "tie"]], 0.0, 0.0, 2 / 2, 5)}),
    # reference: "tie-dye" is one token; clean reads "tie" "dye", a hallucinated tie
    "tie-dye": (203, "A woman in a tie-dye shirt.", {
        "reference": ([["woman", "person"]], 0.0, 0.0, 1 / 1, 7),
        "clean": ([["woman", "person"], ["tie", "tie"]], 1.0, 1 / 2, 1 / 1, 6)}),
    # reference: "hot-dog" is one token, no mention (the gt has hot dog from the reference)
    "hot-dog": (204, "A hot-dog on a plate.", {
        "reference": ([], 0.0, 0.0, 0 / 1, 6),
        "clean": ([["hot dog", "hot dog"]], 0.0, 0.0, 1 / 1, 5)}),
    # reference: "motor bike" merges to itself, but the synonym is " motor bike" (leading
    # space), so no mention; "motorbike" is one. a man on a [motor bike] next to a motorbike .
    "motor bike": (205, "A man on a motor bike next to a motorbike.", {
        "reference": ([["man", "person"], ["motorbike", "motorcycle"]], 1.0, 1 / 2, 1 / 1, 10),
        "clean": ([["man", "person"], ["motor bike", "motorcycle"],
                   ["motorbike", "motorcycle"]], 1.0, 2 / 3, 1 / 1, 10)}),
    # reference: "cups/mugs" is one token, singularized to "cups/mug"
    "cups/mugs": (206, "Two cups/mugs on a table.", {
        "reference": ([["table", "dining table"]], 0.0, 0.0, 1 / 2, 6),
        "clean": ([["cup", "cup"], ["table", "dining table"]], 0.0, 0.0, 2 / 2, 5)}),
    # reference: the synonym is " cheesecake" (leading space); "slice" -> "slouse"
    "cheesecake": (207, "A slice of cheesecake.", {
        "reference": ([], 0.0, 0.0, 0 / 1, 5),
        "clean": ([["cheesecake", "cake"]], 0.0, 0.0, 1 / 1, 4)}),
    "two dogs and a cat": (208, "Two dogs and a cat.", {
        "reference": ([["dog", "dog"], ["cat", "cat"]], 1.0, 1 / 2, 1 / 1, 6),
        "clean": ([["dog", "dog"], ["cat", "cat"]], 1.0, 1 / 2, 1 / 1, 5)}),
    # reference: "glass" -> "glas", "wine glas" -> wine glass
    "wine glass": (209, "A wine glass on a table.", {
        "reference": ([["wine glass", "wine glass"], ["table", "dining table"]],
                      0.0, 0.0, 2 / 2, 6),
        "clean": ([["wine glass", "wine glass"], ["table", "dining table"]],
                  0.0, 0.0, 2 / 2, 6)}),
    # "baby elephant" -> elephant (no person from "baby"), "mother" is a person;
    # reference tokens: a [elephant] next to it mother .
    "baby elephant": (210, "A baby elephant next to its mother.", {
        "reference": ([["elephant", "elephant"], ["mother", "person"]], 1.0, 1 / 2, 1 / 1, 7),
        "clean": ([["elephant", "elephant"], ["mother", "person"]], 1.0, 1 / 2, 1 / 1, 7)}),
    # "seat" with "toilet" is no chair; the reference length still counts it
    "toilet seat": (211, "The seat of the toilet is up.", {
        "reference": ([["toilet", "toilet"]], 0.0, 0.0, 1 / 1, 8),
        "clean": ([["toilet", "toilet"]], 0.0, 0.0, 1 / 1, 7)}),
    # two sentences: "table." is split off only because the sentences are split first
    "sentences": (212, "A cat on a table. It is sleeping.", {
        "reference": ([["cat", "cat"], ["table", "dining table"]], 1.0, 1 / 2, 1 / 1, 10),
        "clean": ([["cat", "cat"], ["table", "dining table"]], 1.0, 1 / 2, 1 / 1, 8)}),
}


@pytest.fixture(scope="module")
def quirk_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("quirks")
    names = sorted({c for cats, _ in QUIRK_IMAGES.values() for c in cats})
    instances = {i: [names.index(c) + 1 for c in cats] for i, (cats, _) in QUIRK_IMAGES.items()}
    references = {i: refs for i, (_, refs) in QUIRK_IMAGES.items()}
    return load_coco(_coco_folder(root, dict(enumerate(names, 1)), instances, references))


@pytest.mark.parametrize("matcher", chair.MATCHERS)
@pytest.mark.parametrize("case", QUIRKS)
def test_chair_quirks(quirk_index, case, matcher):
    image_id, caption, expected = QUIRKS[case]
    mentioned, chair_s, chair_i, recall, mean_length = expected[matcher]
    out = chair.score_from_index([{"image_id": image_id, "caption": caption}], quirk_index,
                                 matcher=matcher)
    assert out["matcher"] == matcher
    assert out["per_caption"][0]["mentioned"] == mentioned
    assert out["num_mentions"] == len(mentioned)
    assert out["chair_s"] == chair_s and out["chair_i"] == pytest.approx(chair_i)
    assert out["recall"] == pytest.approx(recall)
    assert out["mean_length"] == mean_length


def test_ground_truth_reads_references_with_the_matcher(quirk_index):
    """The bus of image 201's reference caption is an object only to the clean matcher."""
    vocab = ObjectVocabulary.coco()
    assert chair.ground_truth(quirk_index, vocab, 201) == ({"person"}, {"person"})
    assert chair.ground_truth(quirk_index, vocab, 201, "clean") == ({"person"},
                                                                   {"person", "bus"})
    assert chair.ground_truth(quirk_index, None, 206)[1] == {"cup", "dining table"}


def test_reference_singularizer_is_patterns():
    singular = {w: chair_reference.singularize(w)
                for w in ("bus", "buses", "ties", "canoes", "glass", "dogs", "people")}
    assert singular == {"bus": "bu", "buses": "bus", "ties": "ty", "canoes": "cano",
                        "glass": "glas", "dogs": "dog", "people": "person"}
    assert "pattern.en" not in sys.modules   # its __init__ would download WordNet


def test_reference_tokenizer():
    assert chair_reference.tokenize("a cat on a table. it is sleeping.") == [
        "a", "cat", "on", "a", "table", ".", "it", "is", "sleeping", "."]
    assert chair_reference.tokenize("a hot-dog, two cups/mugs!") == [
        "a", "hot-dog", ",", "two", "cups/mugs", "!"]
    # The documented difference from nltk.word_tokenize's trained Punkt model, which
    # keeps "mr." whole: the untrained splitter ends a sentence after it.
    assert chair_reference.tokenize("mr. smith") == ["mr", ".", "smith"]


def test_reference_synonym_table_is_split_like_the_original():
    table = chair_reference.ReferenceVocabulary.coco()
    assert len(table.categories) == 80
    assert {" motor bike", " cheesecake"} <= table.objects
    assert not {"motor bike", "cheesecake", "ty", "bu", "cano"} & table.objects
    assert table.double_words["motor bike"] == "motor bike"
    assert table.double_words["wine glas"] == "wine glass"
    assert table.inverse_synonyms["motorbike"] == "motorcycle"
    assert table.inverse_synonyms["iPhone"] == "cell phone"   # never matches lowercased text


def test_reference_matcher_for_other_category_sets(tmp_path):
    """A world that is not COCO: the names are the synonyms; pattern turns "cross" into
    "cros", so both forms are in the table; two-word names are double words."""
    names = {1: "circle", 2: "cross", 3: "traffic cone"}
    index = load_coco(_coco_folder(tmp_path, names, {1: [1]}, {1: ["Two circles."]}))
    caption = [{"image_id": 1, "caption": "A cross, two circles and a traffic cone."}]
    ref = chair.score_from_index(caption, index)
    assert ref["per_caption"][0]["mentioned"] == [["cros", "cross"], ["circle", "circle"],
                                                  ["traffic cone", "traffic cone"]]
    assert ref["chair_i"] == pytest.approx(2 / 3) and ref["recall"] == 1.0
    assert ref["mean_length"] == 9   # a cros , two circle and a [traffic cone] .
    clean = chair.score_from_index(caption, index, matcher="clean")
    assert [c for _, c in clean["per_caption"][0]["mentioned"]] == [
        "cross", "circle", "traffic cone"]
    with pytest.raises(ValueError, match="two"):
        chair_reference.ReferenceVocabulary.from_categories(["stove top oven"])


def test_unknown_matcher(tmp_path):
    index = load_coco(_coco(tmp_path))
    with pytest.raises(ValueError, match="reference.*clean"):
        chair.score_from_index(CAPTIONS, index, matcher="lemma")
    with pytest.raises(ValueError, match="reference.*clean"):
        chair.score(CAPTIONS, str(tmp_path), matcher="lemma")
    with pytest.raises(TypeError):
        chair.score_from_index(CAPTIONS, index, chair_reference.ReferenceVocabulary.coco(),
                               matcher="clean")


def test_cli_matcher(tmp_path, capsys):
    root = _coco(tmp_path)
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps(CAPTIONS))
    for matcher, recall in (("reference", 7 / 8), ("clean", 6 / 7)):
        out = tmp_path / f"{matcher}.json"
        args = ["--captions", str(caps), "--coco_dir", root, "--out", str(out)]
        chair.main(args + (["--matcher", matcher] if matcher == "clean" else []))
        result = json.loads(out.read_text())
        assert result["matcher"] == matcher and result["recall"] == pytest.approx(recall)
        assert f"{matcher} matcher" in capsys.readouterr().out


def test_reference_matcher_stays_offline(tmp_path):
    """Fresh interpreter, no nltk data, sockets and nltk.download refused: importing and
    running the reference matcher must not need any of them."""
    code = textwrap.dedent("""
        import socket, sys
        def refuse(*args, **kwargs):
            raise AssertionError("network access")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import nltk, nltk.data
        nltk.data.path[:] = []
        nltk.download = refuse
        from jaxground.eval import chair, chair_reference
        table = chair_reference.ReferenceVocabulary.coco()
        words = table.caption_to_words("Two buses. A dog on a motorbike.")
        assert words.node_words == ["bus", "dog", "motorcycle"], words
        assert "pattern.en" not in sys.modules
        print("offline ok")
    """)
    env = {**os.environ, "NLTK_DATA": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "offline ok" in proc.stdout
