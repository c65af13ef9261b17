"""Evaluation protocols: LLaVA-1.5's prompt, image padding, answer length, whole-prompt
tokenisation, batch invariance and the protocol a converted checkpoint is evaluated under."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import hf_tiny
import tokenizers_tiny
from jaxground.data.processor import (IGNORE, TEMPLATES, Processor, clip_image_processor,
                                      llava_fill)
from jaxground.eval import protocols
from jaxground.eval.settings import EvalSettings
from jaxground.config import default_config, llava_1_5_config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's "
                "questions.")


def test_vicuna_v1_prompt_is_llavas_conv_vicuna_v1():
    p = Processor(tokenizers_tiny.llama_tokenizer(False), clip_image_processor(28), 4, 0,
                  template="vicuna_v1")
    assert p.prompt_text("What is this?") == (
        LLAVA_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:")
    assert TEMPLATES["vicuna_v1"].answer_sep == " "


def test_pad_fill_truncates_like_llava():
    assert llava_fill(CLIP_MEAN) == (122, 116, 104)
    image_processor = clip_image_processor(32)
    p = Processor(tokenizers_tiny.llama_tokenizer(False), image_processor, 4, 0,
                  pad_to_square=True)
    rng = np.random.RandomState(0)
    wide = Image.fromarray(rng.randint(0, 255, (20, 64, 3), np.uint8))  # pads above/below
    padded = p.pixel_values([wide])[0]

    def flat(colour):
        return p.image_processor(images=[Image.new("RGB", (32, 32), colour)],
                                 return_tensors="np")["pixel_values"][0]

    np.testing.assert_array_equal(padded[:, 0, :], flat((122, 116, 104))[:, 0, :])
    assert not np.array_equal(padded[:, 0, :], flat((123, 117, 104))[:, 0, :])


def resolve(cfg) -> protocols.Protocol:
    return EvalSettings.from_config_dict(cfg).resolved_protocol


def test_presets_and_overrides():
    llava = resolve(llava_1_5_config("llava-1.5-7b"))
    assert (llava.name, llava.template, llava.pad_to_square) == ("llava_1_5", "vicuna_v1", True)
    assert (llava.answer_tokens, llava.caption_tokens) == (128, 512)
    assert llava.caption_prompt == "Please describe this image in detail."
    assert (llava.pope_parser, llava.mme_parser) == ("llava", "official")
    assert llava_1_5_config("llava-1.5-13b").data.template == "vicuna_v1"
    cfg = default_config()
    cfg.eval.protocol = "lmms_eval"
    lmms = resolve(cfg)
    assert (lmms.answer_tokens, lmms.mme_answer_tokens) == (128, 16)
    assert (lmms.pope_parser, lmms.mme_parser) == ("lmms_eval", "lmms_eval")
    cfg.eval.max_new_tokens, cfg.eval.template = 64, "hf"
    assert (resolve(cfg).caption_tokens, resolve(cfg).template) == (64, "hf")
    # "training" follows the run's own data format.
    cfg = default_config()
    cfg.data.template, cfg.data.pad_to_square = "vicuna_v1", True
    trained = resolve(cfg)
    assert (trained.template, trained.pad_to_square, trained.caption_prompt) == (
        "vicuna_v1", True, "Describe the image.")
    cfg.eval.protocol = "llava15"
    with pytest.raises(protocols.ProtocolError, match="config.eval.protocol: 'llava15'"):
        resolve(cfg)
    cfg.eval.protocol, cfg.eval.pope_parser = "hf", "exact"
    with pytest.raises(protocols.ProtocolError, match="config.eval.pope_parser"):
        resolve(cfg)


@pytest.mark.parametrize("template", ["hf", "vicuna_v1"])
@pytest.mark.parametrize("flavour", tokenizers_tiny.FLAVOURS)
def test_prompt_ids_are_the_whole_prompts_ids(flavour, template, tmp_path):
    tok = tokenizers_tiny.make(flavour, str(tmp_path))
    image_id = tok.convert_tokens_to_ids("<image>")
    p = Processor(tok, clip_image_processor(28), 6, image_id, template=template)
    question = "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    expanded = p.prompt_text(question).replace("<image>", "<image>" * 6)
    whole = [tok.bos_token_id] + tok(expanded, add_special_tokens=False)["input_ids"]
    assert p.encode(question)["input_ids"] == whole
    if flavour != "bare":  # what HF's LlamaTokenizer / LlavaProcessor give
        assert tok(expanded)["input_ids"] == whole
    # With an answer: the same prompt ids, LM labels on the answer and EOS only.
    enc = p.encode(question, "Yes")
    assert enc["input_ids"][:len(whole)] == whole
    assert enc["labels"][:len(whole)] == [IGNORE] * len(whole)
    answer = [tok.convert_ids_to_tokens(i) for i, l in zip(enc["input_ids"], enc["labels"])
              if l != IGNORE]
    assert answer == ["▁Yes", "</s>"]


def test_piecewise_tokenisation_would_add_a_stray_token(tmp_path):
    """Why prompts are tokenised whole: a llava-hf style tokenizer.json prepends "▁" to every
    encode call, so " ASSISTANT:" on its own is two tokens where the whole prompt has one."""
    tok = tokenizers_tiny.make("bare", str(tmp_path))
    alone = tok.convert_ids_to_tokens(tok(" ASSISTANT:", add_special_tokens=False)["input_ids"])
    assert alone == ["▁", "▁ASSISTANT:"]
    p = Processor(tok, clip_image_processor(28), 2, tok.convert_tokens_to_ids("<image>"))
    pieces = tok.convert_ids_to_tokens(p.encode("Is it?")["input_ids"])
    assert pieces[-2:] == ["?", "▁ASSISTANT:"]


def test_prompt_without_the_image_token_is_a_clear_error():
    tok = tokenizers_tiny.llama_tokenizer(False)
    p = Processor(tok, clip_image_processor(28), 2, image_token_id=7)
    with pytest.raises(ValueError, match=r"expected one <image> token \(id 7\).*maps '<image>'"):
        p.encode("Is it?")


# ---- end to end on a tiny converted LLaVA ----------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random HF LLaVA converted with its (WordLevel) tokenizer, and POPE files."""
    from jaxground.checkpoints.hf_convert import hf_to_jaxground

    root = tmp_path_factory.mktemp("protocols")
    hf = hf_tiny.build_hf("mha", seed=3)
    hf_tiny.save_hf(hf, str(root / "hf"))
    hf_tiny.make_processor(hf).save_pretrained(str(root / "hf"))
    hf_to_jaxground(str(root / "hf"), str(root / "jg"))
    rng = np.random.RandomState(1)
    os.makedirs(root / "images")
    for i in range(3):
        Image.fromarray(rng.randint(0, 255, (30 + 7 * i, 50, 3), np.uint8)).save(
            root / "images" / f"im{i}.png")
    with open(root / "coco_pope_random.json", "w") as f:
        for qid, (image, word, label) in enumerate(
                [(0, "square", "yes"), (1, "circle", "no"), (2, "red", "yes"),
                 (0, "blue", "no"), (1, "image", "yes")], 1):
            f.write(json.dumps({"question_id": qid, "image": f"im{image}.png",
                                "text": f"is there a {word} in the image ?",
                                "label": label}) + "\n")
    return root


def test_converted_dir_without_config_is_evaluated_as_llava_1_5(converted):
    from jaxground import evaluate

    out = str(converted / "eval_pope")
    results = evaluate.evaluate(str(converted / "jg"), "pope",
                                str(converted / "coco_pope_random.json"),
                                images=str(converted / "images"), out=out)
    assert results["protocol"]["name"] == "llava_1_5"
    assert results["protocol"]["template"] == "vicuna_v1"
    assert results["protocol"]["image_aspect_ratio"] == "pad"
    assert results["decode"]["max_new_tokens"] == 128 and results["decode"]["temperature"] == 0
    with open(os.path.join(out, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert samples[0]["prompt"] == ("is there a square in the image ?\nAnswer the question "
                                    "using a single word or phrase.")
    with open(os.path.join(out, "answers.jsonl")) as f:  # LLaVA's answer-file format
        answers = [json.loads(line) for line in f]
    assert [a["question_id"] for a in answers] == [1, 2, 3, 4, 5]
    assert set(answers[0]) == {"question_id", "prompt", "text"}
    # A random model rarely says EOS: answers run to the protocol's 128 tokens.
    assert max(len(s["token_ids"]) for s in samples) == 128


def _prompts(converted, n):
    from jaxground.inference.batching import Prompt

    words = ["square", "circle red", "blue square blue", "image", "a red circle ? what is",
             "the", "square square circle red blue", "what", "in the image"]
    return [Prompt(f"what is {words[i % len(words)]} ?", str(converted / "images" /
                                                          f"im{i % 3}.png"), i)
            for i in range(n)]


def test_batch_of_8_answers_equal_batch_of_1(converted):
    import jaxground
    from jaxground.data.processor import load_tokenizer
    from jaxground.inference.batching import DecodeSettings, generate_all
    from jaxground.checkpoints.converted import read_config

    path = str(converted / "jg")
    model, config = jaxground.load(path), read_config(path)
    processor = Processor(load_tokenizer(path), clip_image_processor(28, path),
                          config.image_seq_length, config.image_token_id, "vicuna_v1", True)
    settings = DecodeSettings(max_new_tokens=24)
    prompts = _prompts(converted, 9)  # batch 8 + a short last batch filled with copies
    batched = {r["key"]: r for r in generate_all(model, processor, prompts, settings,
                                                 batch_size=8)}
    single = {r["key"]: r for r in generate_all(model, processor, prompts, settings,
                                                batch_size=1)}
    assert len({len(processor.encode(p.question)["input_ids"]) for p in prompts}) > 3
    assert {k: r["token_ids"] for k, r in batched.items()} == {
        k: r["token_ids"] for k, r in single.items()}
    # Not only the argmax: each token's log p agrees too (padding changes nothing).
    for k in single:
        np.testing.assert_allclose(batched[k]["logprobs"], single[k]["logprobs"], atol=1e-4)


def test_bad_protocol_and_image_list_name_the_field_and_file(converted, tmp_path):
    from jaxground import evaluate
    from jaxground.eval import tasks

    cfg = default_config()
    cfg.eval.protocol = "llava-1.5"
    with pytest.raises(protocols.ProtocolError, match="config.eval.protocol: 'llava-1.5'"):
        evaluate.evaluate(str(converted / "jg"), "pope",
                          str(converted / "coco_pope_random.json"), cfg=cfg, out=str(tmp_path))
    ids = tmp_path / "ids.txt"
    ids.write_text("1\n2\n")
    with pytest.raises(FileNotFoundError, match="image id list .*nowhere.txt"):
        tasks.read_image_ids(str(tmp_path / "nowhere.txt"))
    assert tasks.read_image_ids(str(ids)) == [1, 2]


def test_chair_images_are_drawn_seeded_or_listed(tmp_path):
    from jaxground.data.shapes import ensure_world
    from jaxground.eval import tasks

    world = str(tmp_path / "world")
    ensure_world(world, 12, seed=5)
    out = str(tmp_path / "image_ids.json")
    drawn = tasks.chair_image_ids(world, None, None, 5, seed=7, write_to=out)
    assert len(drawn) == 5 and drawn == sorted(drawn)
    assert drawn == tasks.chair_image_ids(world, None, None, 5, seed=7)  # seeded
    assert drawn != tasks.chair_image_ids(world, None, None, 5, seed=8)
    assert tasks.read_image_ids(out) == drawn  # the written list is a valid --image_ids file
    assert len(tasks.chair_image_ids(world, None, None, 500, seed=7)) == 12  # all of them
    # A given list (OPERA's caption logs are JSON lines with "image_id").
    listed = tmp_path / "opera.jsonl"
    listed.write_text("".join(json.dumps({"image_id": i, "caption": "x"}) + "\n"
                              for i in drawn[:3]))
    assert tasks.chair_image_ids(world, None, str(listed), 500, seed=0) == drawn[:3]
    # Ids the annotations do not have, and listed images missing on disk, are named.
    listed.write_text("[1, 999]")
    with pytest.raises(ValueError, match=r"opera.jsonl: 1 image id\(s\) are not in .*\[999\]"):
        tasks.chair_image_ids(world, None, str(listed), 500, seed=0)
    from jaxground.data.coco import load_coco

    index = load_coco(world)
    os.remove(os.path.join(world, index.image_path(drawn[0])))
    with pytest.raises(FileNotFoundError, match=index.image_path(drawn[0])):
        tasks.chair_image_ids(world, None, None, 0, seed=0)
