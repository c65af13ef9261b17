"""Data: shapes world, negatives and their labels, token labels, processor, pipeline resume."""

import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxground.data import shapes
from jaxground.data.coco import build_records, load_coco
from jaxground.data.pipeline import BadImageCounter, PipelineConfig, build_dataset
from jaxground.data.processor import Processor, clip_image_processor, load_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shapes"))
    shapes.write_world(d, 500, seed=5)
    return d


def test_same_seed_same_bytes(tmp_path):
    shapes.write_world(str(tmp_path / "a"), 40, seed=9)
    shapes.write_world(str(tmp_path / "b"), 40, seed=9)
    cmp = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    files = sorted(os.listdir(tmp_path / "a" / "images"))
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a" / "images",
                                               tmp_path / "b" / "images", files, shallow=False)
    assert len(match) == 40 and not mismatch and not errors
    for name in ("annotations/instances.json", "annotations/captions.json", "tokenizer.json"):
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name
    assert not cmp.diff_files
    shapes.write_world(str(tmp_path / "c"), 40, seed=10)
    assert not filecmp.cmp(tmp_path / "a" / "annotations/captions.json",
                           tmp_path / "c" / "annotations/captions.json", shallow=False)


def test_boxes_inside_images_and_captions_faithful(world):
    index = load_coco(world)
    inst = json.load(open(os.path.join(world, "annotations", "instances.json")))
    for a in inst["annotations"]:
        x, y, w, h = a["bbox"]
        im = index.images[a["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]
    for image_id, caps in index.captions.items():
        for cap in caps:
            named = {w for w in cap.replace(",", " ").split() if w in shapes.SHAPES}
            assert named and named <= index.present[image_id], (cap, index.present[image_id])
    # The co-occurrence bias the demo relies on is really there.
    pairs = sum(1 for objs in index.present.values() if {"circle", "square"} <= objs)
    circles = sum(1 for objs in index.present.values() if "circle" in objs)
    assert pairs / circles > 0.7


def assert_labels_match_annotations(records, index):
    for r in records:
        present = index.present[r["image_id"]]
        for start, end, label, category in r["spans"]:
            assert (category in present) == bool(label), (r["text"], r["text"][start:end])
        if r["label"] == "negative" and r["kind"] == "caption":
            assert any(lab == 0 for *_, lab, _ in r["spans"]), r  # it does hallucinate


def test_shapes_negatives_are_labelled_by_the_annotations(world):
    records = build_records(world)
    index = load_coco(world)
    assert_labels_match_annotations(records, index)
    kinds = {(r["kind"], r["strategy"], r["edit"]) for r in records}
    for s in ("random", "popular", "adversarial"):
        assert ("caption", s, "replace") in kinds and ("caption", s, "insert") in kinds
        assert ("question", s, "none") in kinds


def coco_folder(root):
    """5 images, COCO category names, captions with synonyms, plurals and two-word names."""
    cats = [(1, "person"), (4, "motorcycle"), (18, "dog"), (11, "fire hydrant"),
            (22, "elephant"), (62, "chair"), (70, "toilet")]
    objects = {1: [1, 4], 2: [18, 11], 3: [22], 4: [1, 18], 5: [70]}
    captions = {1: "A man riding a motor bike down the street.",
                2: "Two dogs sit next to a fire hydrant.",
                3: "A baby elephant walks through tall grass.",
                4: "A woman plays with her dogs in the park.",
                5: "The seat of the toilet is up."}
    os.makedirs(os.path.join(root, "annotations"))
    os.makedirs(os.path.join(root, "val2014"))
    images, anns, caps = [], [], []
    for i in range(1, 6):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (40, 30), (i * 40, 100, 100)).save(os.path.join(root, "val2014", name))
        images.append({"id": i, "file_name": name, "width": 40, "height": 30})
        for c in objects[i]:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c,
                         "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0})
        caps.append({"id": i, "image_id": i, "caption": captions[i]})
    categories = [{"id": i, "name": n, "supercategory": "x"} for i, n in cats]
    json.dump({"images": images, "annotations": anns, "categories": categories},
              open(os.path.join(root, "annotations", "instances_val2014.json"), "w"))
    json.dump({"images": images, "annotations": caps},
              open(os.path.join(root, "annotations", "captions_val2014.json"), "w"))
    return root


def test_coco_synonyms_and_negatives(tmp_path):
    root = coco_folder(str(tmp_path / "coco"))
    records = build_records(root, split="val2014", kinds=("caption",))
    index = load_coco(root, "val2014")
    assert_labels_match_annotations(records, index)
    pos = {r["image_id"]: r for r in records if r["label"] == "positive"}
    spans = lambda r: [(r["text"][s:e], lab, c) for s, e, lab, c in r["spans"]]
    assert spans(pos[1]) == [("man", 1, "person"), ("motor bike", 1, "motorcycle")]
    assert spans(pos[2]) == [("dogs", 1, "dog"), ("fire hydrant", 1, "fire hydrant")]
    assert spans(pos[3]) == [("baby elephant", 1, "elephant")]  # not a person
    assert spans(pos[5]) == [("toilet", 1, "toilet")]            # the seat is not a chair
    assert os.path.exists(os.path.join(root, records[0]["image"]))
    # Replacing a plural keeps it plural; an inserted object is named with its article.
    neg = [r for r in records if r["image_id"] == 2 and r["edit"] == "replace"]
    assert all(r["text"].startswith("Two ") and r["text"].split()[1].endswith("s")
               or "fire hydrant" not in r["text"] for r in neg)


def bpe_processor(texts, image_size=32, seq=4, max_length=512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    return Processor(fast, clip_image_processor(image_size), seq,
                     fast.convert_tokens_to_ids("<image>"), max_length=max_length)


def labelled_words(processor, enc):
    """Runs of consecutive tokens with the same label, decoded."""
    out, run, label = [], [], None
    for tid, lab in list(zip(enc["input_ids"], enc["grounding_labels"])) + [(None, -1)]:
        if lab != label or lab == -1:
            if run and label in (0, 1):
                out.append((processor.tokenizer.decode(run).strip(), label))
            run = []
        if lab in (0, 1):
            run.append(tid)
        label = lab
    return out


def test_token_labels_decode_to_the_labelled_words(tmp_path, world):
    root = coco_folder(str(tmp_path / "coco"))
    records = build_records(root, split="val2014", kinds=("caption",))
    proc = bpe_processor([r["text"] for r in records])
    shape_proc = Processor(load_tokenizer(world), clip_image_processor(64), 4, 4,
                           max_length=64)
    for p, recs in ((proc, records), (shape_proc, build_records(world)[:400])):
        for r in recs:
            enc = (p.encode(r["text"], None, question_spans=r["spans"]) if r["kind"] == "question"
                   else p.encode("Describe the image.", r["text"], answer_spans=r["spans"]))
            want = [(r["text"][s:e], lab) for s, e, lab, _ in r["spans"]]
            got = labelled_words(p, enc)
            assert [(w.lower(), l) for w, l in got] == [(w.lower(), l) for w, l in want], r["text"]


def test_only_answer_tokens_get_lm_labels(world):
    p = Processor(load_tokenizer(world), clip_image_processor(64), 4, 4, max_length=64)
    enc = p.encode("Describe the image.", "a red circle .")
    tok = p.tokenizer
    answer = [tok.convert_ids_to_tokens(i) for i, l in zip(enc["input_ids"], enc["labels"])
              if l != -100]
    assert answer == ["a", "red", "circle", ".", "</s>"]
    assert enc["input_ids"].count(4) == 4  # <image> expanded to image_seq_length


def test_truncation_never_cuts_image_tokens(world):
    p = Processor(load_tokenizer(world), clip_image_processor(64), 20, 4, max_length=34)
    long = " ".join(["a red circle"] * 10)
    enc = p.encode("Describe the image.", long)  # prompt: 29 tokens, 20 of them image
    assert len(enc["input_ids"]) == 34 and enc["input_ids"].count(4) == 20
    assert enc["labels"][29:] == enc["input_ids"][29:]  # only the answer was cut
    p.max_length = 28
    with pytest.raises(ValueError, match="prompt of 29 tokens .* does not fit max_length=28"):
        p.encode("Describe the image.", long)
    assert p.encode("Describe the image.", long, on_too_long="drop") is None


def test_pixel_values_equal_clip_image_processor(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.RandomState(0)
    im = Image.fromarray(rng.randint(0, 255, (45, 70, 3), np.uint8))
    hf = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    p = Processor(load_tokenizer_stub(), hf, 4, 4)
    np.testing.assert_array_equal(p.pixel_values([im]),
                                  hf(images=[im], return_tensors="np")["pixel_values"])
    # Pad to square: a 45x70 image becomes 70x70 with the mean colour above and below.
    p.pad_to_square = True
    padded = p.pixel_values([im])[0]
    mean_pixel = hf(images=[Image.new("RGB", (32, 32), tuple(int(round(255 * m))
                                                              for m in hf.image_mean))],
                    return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(padded[:, 0, :], mean_pixel[:, 0, :], atol=0.02)
    assert not np.allclose(padded[:, 16, :], mean_pixel[:, 16, :], atol=0.02)


def load_tokenizer_stub():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>")


def _image_in_mode(mode):
    """(an image in `mode` whose extra content matters, the RGB array it must become).

    Alpha (RGBA, LA, a palette's per-entry transparency) varies over 0..255 and is dropped,
    not composited: what PIL's convert("RGB") gives and LLaVA's loader
    (`Image.open(f).convert("RGB")`) feeds CLIP. Grey is repeated in R, G and B; a palette
    index becomes its palette colour; CMYK is PIL's own conversion."""
    rng = np.random.RandomState(1)
    h, w = 20, 30
    rgb = rng.randint(0, 256, (h, w, 3), np.uint8)
    alpha = rng.randint(0, 256, (h, w), np.uint8)
    grey = rgb[..., 0]
    if mode == "RGBA":
        return Image.frombytes(mode, (w, h), np.dstack([rgb, alpha]).tobytes()), rgb
    if mode == "LA":
        return (Image.frombytes(mode, (w, h), np.dstack([grey, alpha]).tobytes()),
                np.repeat(grey[..., None], 3, axis=-1))
    if mode == "L":
        return Image.frombytes(mode, (w, h), grey.tobytes()), np.repeat(grey[..., None], 3, -1)
    if mode == "P":
        palette = rng.randint(0, 256, (256, 3), np.uint8)
        index = rng.randint(0, 256, (h, w), np.uint8)
        im = Image.frombytes(mode, (w, h), index.tobytes())
        im.putpalette(palette.tobytes())
        im.info["transparency"] = bytes(rng.randint(0, 256, 256, np.uint8))  # per entry
        return im, palette[index]
    cmyk = rng.randint(0, 256, (h, w, 4), np.uint8)
    im = Image.frombytes(mode, (w, h), cmyk.tobytes())
    return im, np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK", "P", "LA"])
def test_image_modes_become_rgb(tmp_path, mode):
    """Pixel values of an image in any mode, in memory and read from a file, are the CLIP
    processor's on its RGB conversion (see `_image_in_mode`); a palette with transparency
    is converted through RGBA, without PIL's warning about it."""
    import warnings

    hf = clip_image_processor(32)
    p = Processor(load_tokenizer_stub(), hf, 4, 4)
    im, rgb = _image_in_mode(mode)
    assert im.mode == mode
    expected = hf(images=[Image.frombytes("RGB", im.size, np.ascontiguousarray(rgb).tobytes())],
                  return_tensors="np")["pixel_values"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(p.pixel_values([im]), expected)
    assert not [w for w in caught if "Transparency" in str(w.message)]
    path = str(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"))  # PNG keeps alpha, tRNS
    im.save(path)
    if mode == "CMYK":  # JPEG is lossy: the file's own pixels, converted by PIL
        with Image.open(path) as f:
            assert f.mode == "CMYK"
            expected = hf(images=[f.convert("RGB")], return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(p.pixel_values([path]), expected)


def pipeline_for(world, records, cfg, counter=None, image_root=None):
    p = Processor(load_tokenizer(world), clip_image_processor(64), 4, 4, max_length=cfg.max_length)
    return build_dataset(records, p, image_root or world, cfg, 0, 1, counter)


def test_pipeline_resume_is_exact(world):
    records = build_records(world)[:1500]
    cfg = PipelineConfig(groups_per_batch=4, max_length=48, seed=3)
    it = iter(pipeline_for(world, records, cfg))
    straight = [next(it) for _ in range(12)]
    it = iter(pipeline_for(world, records, cfg))
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives serialisation
    fresh = iter(pipeline_for(world, records, cfg))
    fresh.set_state(state)
    for want in straight[7:12]:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # Rows pair up: a positive and its negative of the same group share one image, which
    # the batch holds once (rows 2i and 2i+1 -> image i).
    b = straight[0]
    assert b["input_ids"].shape[0] == 8 and b["pixel_values"].shape[0] == 4
    assert len({b["pixel_values"][i].tobytes() for i in range(4)}) == 4
    assert b["is_positive"].tolist() == [True, False] * 4


def world_with_bad_images(world, records, tmp_path):
    """A copy of `world` (symlinks) whose second image is a truncated JPEG and whose third
    is missing; returns (dir, image names)."""
    images = sorted({r["image"] for r in records})
    jpeg = str(tmp_path / "x.jpg")
    Image.open(os.path.join(world, images[0])).save(jpeg, "JPEG")
    with open(jpeg, "rb") as f:
        good = f.read()
    bad_dir = tmp_path / "w"
    os.makedirs(bad_dir / "images")
    for name in images:
        os.symlink(os.path.join(world, name), bad_dir / name)
    os.remove(bad_dir / images[1])
    (bad_dir / images[1]).write_bytes(good[:len(good) // 2])  # a truncated, corrupt JPEG
    os.remove(bad_dir / images[2])                # missing
    return bad_dir, images


def is_masked(batch, row):
    return (not batch["lm_rows"][row] and (batch["labels"][row] == -100).all()
            and (batch["grounding_labels"][row] == -1).all())


def test_corrupt_and_missing_images_are_skipped_and_counted(world, tmp_path):
    records = [r for r in build_records(world, kinds=("caption",)) if r["image_id"] <= 6]
    bad_dir, images = world_with_bad_images(world, records, tmp_path)
    counter = BadImageCounter()
    cfg = PipelineConfig(groups_per_batch=1, max_length=48, num_epochs=1)
    batches = list(pipeline_for(world, records, cfg, counter, str(bad_dir)))
    groups = {r["pair_id"] for r in records}
    assert counter.count == 2 * len(groups) // 6
    assert any(images[1] in p for p in counter.paths) and any(images[2] in p for p in counter.paths)
    # A skipped pair keeps its place, masked: nothing in it is learned or scored.
    assert len(batches) == len(groups)
    masked = [b for b in batches if is_masked(b, 0) and is_masked(b, 1)]
    assert len(masked) == counter.count
    good = [b for b in batches if b["lm_rows"][0]]
    assert len(good) == len(groups) - counter.count
    assert all((b["grounding_labels"] >= 0).any() for b in good)
    with pytest.raises(Exception, match="does not exist|cannot be decoded"):
        list(pipeline_for(world, records,
                          PipelineConfig(groups_per_batch=1, max_length=48, num_epochs=1,
                                         on_bad_image="error"), image_root=str(bad_dir)))


def test_process_shards_make_the_one_process_batches_even_with_skipped_images(world,
                                                                                tmp_path):
    """Each of P processes takes its slice of every global batch; skipped pairs are masked
    in place, so the slices put together are the one-process batches, and every process
    has the same number of batches in an epoch."""
    records = [r for r in build_records(world, kinds=("caption",)) if r["image_id"] <= 6]
    bad_dir, _ = world_with_bad_images(world, records, tmp_path)
    proc = Processor(load_tokenizer(world), clip_image_processor(64), 4, 4, max_length=48)
    cfg = PipelineConfig(groups_per_batch=4, max_length=48, num_epochs=1)
    one = list(build_dataset(records, proc, str(bad_dir), cfg, 0, 1))
    assert any(is_masked(b, r) for b in one for r in range(8))
    for count in (2, 4):
        shards = [list(build_dataset(records, proc, str(bad_dir), cfg, i, count))
                  for i in range(count)]
        assert {len(s) for s in shards} == {len(one)}
        for n, want in enumerate(one):
            for k in want:
                got = np.concatenate([s[n][k] for s in shards])
                np.testing.assert_array_equal(got, want[k], err_msg=f"{count} {n} {k}")


def test_worker_processes_resume_exactly(world):
    """With grain workers each worker batches its own shard, so batches differ from the
    in-process ones, but they are still deterministic and resumable."""
    records = build_records(world)[:600]
    cfg = PipelineConfig(groups_per_batch=4, max_length=48, seed=1, workers=2)
    it = iter(pipeline_for(world, records, cfg))
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    following = [next(it) for _ in range(2)]
    fresh = iter(pipeline_for(world, records, cfg))
    fresh.set_state(state)
    for want in following:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert not np.array_equal(first[0]["input_ids"], following[0]["input_ids"])


def test_two_processes_split_each_global_batch(world):
    records = build_records(world)[:600]
    cfg = PipelineConfig(groups_per_batch=4, max_length=48, seed=2)
    p = Processor(load_tokenizer(world), clip_image_processor(64), 4, 4, max_length=48)
    whole = iter(build_dataset(records, p, world, cfg, 0, 1))
    halves = [iter(build_dataset(records, p, world, cfg, i, 2)) for i in range(2)]
    for _ in range(3):
        want = next(whole)
        parts = [next(h) for h in halves]
        for k in ("input_ids", "labels", "grounding_labels", "pixel_values"):
            np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), want[k])


def test_caption_bias_names_absent_partners_and_labels_them_absent(tmp_path):
    """Biased captions name a co-occurring partner the image lacks; the annotations (and so
    the grounding labels) stay true; attribute labelling covers "a blue square" in positives."""
    cfg = shapes.WorldConfig(caption_bias=1.0, max_objects=3,
                             co_occur=(("circle", "square", 0.5),))
    shapes.write_world(str(tmp_path), 120, seed=3, cfg=cfg)
    index = load_coco(str(tmp_path))
    lonely = [i for i, objs in index.present.items() if "circle" in objs and "square" not in objs]
    assert lonely
    for i in lonely:
        assert all("blue square" in c for c in index.captions[i]), index.captions[i]
    records = build_records(str(tmp_path), ("random",), ("caption",), seed=0, attributes=True)
    assert_labels_match_annotations(records, index)
    positives = [r for r in records if r["label"] == "positive" and r["image_id"] in lonely]
    labelled = {(r["text"][s:e], lab) for r in positives for s, e, lab, _ in r["spans"]}
    assert ("a blue square", 0) in labelled and ("a red circle", 1) in labelled
    # Edits keep the replaced object's colour, which describes something present: unlabelled.
    for r in records:
        if r["edit"] == "replace":
            assert all(r["text"][s:e] in shapes.SHAPES for s, e, *_ in r["spans"]), r
    # Without a bias the world is the one older seeds made (no extra random draws).
    shapes.write_world(str(tmp_path / "a"), 30, seed=4)
    shapes.write_world(str(tmp_path / "b"), 30, seed=4, cfg=shapes.WorldConfig(caption_bias=0.0))
    assert filecmp.cmp(tmp_path / "a" / "annotations/captions.json",
                       tmp_path / "b" / "annotations/captions.json", shallow=False)


def test_attribute_start_and_guidance_tokens(world):
    from jaxground.data.objects import attribute_start, token_ids, vocabulary_for

    # The noun phrase: its article and attribute words ("an" commits to "orange" early).
    text = "A big red car and a dog near small cars and an orange ring"
    assert text[attribute_start(text, text.index("car")):text.index("car") + 3] == "A big red car"
    assert text[attribute_start(text, text.index("dog")):text.index("dog") + 3] == "a dog"
    assert text[attribute_start(text, text.index("cars")):text.index("cars") + 4] == "small cars"
    assert text[attribute_start(text, text.index("ring")):] == "an orange ring"
    assert attribute_start("the cat", 4) == 4  # "the" is not one of the articles labelled
    tok = load_tokenizer(world)
    vocab = vocabulary_for(list(shapes.SHAPES))
    plain, with_attrs = token_ids(tok, vocab), token_ids(tok, vocab, attributes=True)
    shape_ids = {tok.convert_tokens_to_ids(s) for s in shapes.SHAPES}
    colour_ids = {tok.convert_tokens_to_ids(c) for c in shapes.COLOURS}
    assert shape_ids <= set(plain) and not colour_ids & set(plain)
    assert shape_ids | colour_ids <= set(with_attrs)
    article_ids = {tok.convert_tokens_to_ids(a) for a in ("a", "an")}
    assert article_ids <= set(with_attrs) and not article_ids & set(plain)
