"""LLaVA instruction-tuning conversations: LLaVA's labels, the mixture with grounding pairs,
exact resume, rows without image beside rows with one, bad input, a short training run."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tokenizers_tiny
from jaxground.data import shapes
from jaxground.data.coco import build_records
from jaxground.data.conversations import (ConversationFormatError, encode_conversation,
                                          read_conversations)
from jaxground.data.pipeline import BadImageCounter, PipelineConfig, build_dataset
from jaxground.data.processor import (IGNORE, BadImageError, Processor, clip_image_processor,
                                      load_tokenizer)

MULTI_TURN = [  # <image> at the end of the first turn: LLaVA moves it to the front
    {"from": "human", "value": "Please describe this image in detail.\n<image>"},
    {"from": "gpt", "value": "A red square and a blue circle."},
    {"from": "human", "value": "Is there a dog in the image?"},
    {"from": "gpt", "value": "No"}]
RECORDS = [
    {"id": "end", "image": "a.png", "conversations": MULTI_TURN},
    {"id": "front", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nPlease describe this image in detail."},
        *MULTI_TURN[1:]]},
    {"id": 7, "conversations": [{"from": "human", "value": "Is there a cat?"},
                                {"from": "gpt", "value": "Yes"}]},
    {"id": "gpt_first", "conversations": [{"from": "gpt", "value": "Hello."},
                                          {"from": "human", "value": "Is there a cat?"},
                                          {"from": "gpt", "value": "Yes"}]},
]


def write(path, data):
    with open(path, "w") as f:
        json.dump(data, f) if not isinstance(data, str) else f.write(data)
    return str(path)


def find(seq, sub, start):
    """Index of the first occurrence of `sub` in `seq` at or after `start`."""
    return next(i for i in range(start, len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub)


@pytest.mark.parametrize("flavour", tokenizers_tiny.FLAVOURS)
def test_labels_are_exactly_the_answers_and_their_eos(tmp_path, flavour):
    tok = tokenizers_tiny.make(flavour, str(tmp_path / "tok"))
    image_id, eos = tok.convert_tokens_to_ids("<image>"), tok.eos_token_id
    p = Processor(tok, clip_image_processor(28), 3, image_id)
    convs = read_conversations(write(tmp_path / "c.json", RECORDS))
    rows = {c.id: encode_conversation(p, c) for c in convs.records}
    end, text = rows["end"], rows["7"]
    # `<image>` at the end of the turn trains exactly as at its front.
    assert end == rows["front"]
    assert end["input_ids"].count(image_id) == 3 and image_id not in text["input_ids"]
    assert end["grounding_labels"] == [-1] * len(end["input_ids"])
    # Hand-derived: each answer tokenised alone (a Llama tokenizer gives "▁A ..." either
    # way), then its EOS, found in order after its question; those tokens and no other.
    ids = end["input_ids"]
    answer = lambda s: tok(s, add_special_tokens=False)["input_ids"] + [eos]
    a1, a2 = answer("A red square and a blue circle."), answer("No")
    q2 = tok("Is there a dog", add_special_tokens=False)["input_ids"][1:]
    i1 = find(ids, a1, ids.index(image_id) + 3)
    i2 = find(ids, a2, find(ids, q2, i1 + len(a1)))
    want = {**{i1 + k: x for k, x in enumerate(a1)}, **{i2 + k: x for k, x in enumerate(a2)}}
    assert i2 + len(a2) == len(ids)
    assert {i: x for i, x in enumerate(end["labels"]) if x != IGNORE} == want
    # Text only: "... USER: Is there a cat? ASSISTANT: Yes</s>": the last two tokens.
    yes = answer("Yes")
    assert len(yes) == 2 and text["input_ids"][-2:] == yes
    assert text["labels"] == [IGNORE] * (len(text["input_ids"]) - 2) + yes
    assert text["input_ids"][0] == tok.bos_token_id
    # A first turn from gpt is dropped (LLaVA's preprocess_v1), the rest as usual.
    assert rows["gpt_first"] == text


def test_llava_ignores_rows_whose_rounds_it_cannot_split(tmp_path, caplog):
    """preprocess_v1 splits on "</s>" and " ASSISTANT: "; a value holding one of them is a
    "tokenization mismatch" there and the whole row is ignored."""
    tok = tokenizers_tiny.make("legacy", str(tmp_path))
    p = Processor(tok, clip_image_processor(28), 3, tok.convert_tokens_to_ids("<image>"))
    convs = read_conversations(write(tmp_path / "c.json", [
        {"id": "sep", "conversations": [{"from": "human", "value": "Say ASSISTANT: yes"},
                                        {"from": "gpt", "value": "Yes"}]},
        {"id": "eos", "conversations": [{"from": "human", "value": "Is there a cat?"},
                                        {"from": "gpt", "value": "Yes</s> No"}]}]))
    for conv in convs.records:
        assert set(encode_conversation(p, conv)["labels"]) == {IGNORE}
    assert "tokenization mismatch" in caplog.text
    # Too long: the end is cut while an answer token fits, else dropped or an error.
    multi = read_conversations(write(tmp_path / "d.json", RECORDS)).records[0]
    full = encode_conversation(p, multi)
    n = len(full["input_ids"])
    short = Processor(tok, clip_image_processor(28), 3, p.image_token_id, max_length=n - 1)
    assert encode_conversation(short, multi) == {k: v[:-1] for k, v in full.items()}
    first = next(i for i, x in enumerate(full["labels"]) if x != IGNORE)
    tiny = Processor(tok, clip_image_processor(28), 3, p.image_token_id, max_length=first)
    assert encode_conversation(tiny, multi, "drop") is None
    with pytest.raises(ValueError, match=f"'end'.*starts at token {first}, beyond "
                                         f"max_length={first}"):
        encode_conversation(tiny, multi)


# ---- the pipeline: mixture, resume ----------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    shapes.write_world(str(d), 40, seed=3)
    records = build_records(str(d))
    images = sorted({r["image"] for r in records})
    convs = []
    for i in range(12):  # images of the world (paths relative to it) and text-only ones
        turns = [{"from": "human", "value": f"<image>\nIs there a circle {i}?"},
                 {"from": "gpt", "value": "yes there is a red circle"},
                 {"from": "human", "value": "and a square?"}, {"from": "gpt", "value": "no"}]
        convs.append({"id": f"img{i}", "image": images[i], "conversations": turns}
                     if i % 3 else {"id": f"txt{i}", "conversations": [
                         {"from": "human", "value": "what is a circle?"},
                         {"from": "gpt", "value": "a shape"}]})
    return str(d), records, write(d / "conversations.json", convs)


def processor_for(world_dir, max_length=80):
    return Processor(load_tokenizer(world_dir), clip_image_processor(64), 4, 4,
                     max_length=max_length)


def mixed(world, cfg, counter=None, conversations=None, image_root=""):
    d, records, file = world
    convs = read_conversations(conversations or file, image_root or d)
    return build_dataset(records, processor_for(d, cfg.max_length), d, cfg, 0, 1, counter,
                         conversations=convs)


def conversation_rows(batch):
    """Rows trained on (LM labels) with no grounding label: conversations and their copies."""
    return (batch["labels"] != IGNORE).any(1) & (batch["grounding_labels"] == -1).all(1)


def test_one_to_three_mixture_and_the_batch_structure(world):
    cfg = PipelineConfig(groups_per_batch=4, max_length=80, seed=1, grounding_weight=3,
                         conversation_weight=1)
    it = iter(mixed(world, cfg))
    batches = [next(it) for _ in range(50)]  # 400 rows
    conv = np.concatenate([conversation_rows(b) for b in batches])
    assert conv.size == 400 and abs(conv.mean() - 0.25) <= 0.05, conv.mean()
    seen_text = seen_image = False
    for b in batches:
        rows = np.flatnonzero(conversation_rows(b))
        assert rows.size % 2 == 0 and (rows[0::2] % 2 == 0).all()  # whole examples
        for r in rows[0::2]:
            # [conversation (LM), its copy (no LM)] on one image; text only: no image tokens,
            # a zero image, as LLaVA gives text-only examples.
            assert b["lm_rows"][r] and not b["lm_rows"][r + 1]
            np.testing.assert_array_equal(b["input_ids"][r], b["input_ids"][r + 1])
            n_image = int((b["input_ids"][r] == 4).sum())
            assert n_image in (0, 4)
            if n_image == 0:
                seen_text = True
                assert not b["pixel_values"][r // 2].any()
            else:
                seen_image = True
                assert b["pixel_values"][r // 2].std() > 0
    assert seen_text and seen_image
    # Weights 1:0 are the grounding-only stream, unchanged.
    only = PipelineConfig(groups_per_batch=4, max_length=80, seed=1)
    d, records, _ = world
    plain = next(iter(build_dataset(records, processor_for(d), d, only, 0, 1)))
    np.testing.assert_array_equal(next(iter(mixed(world, only)))["input_ids"],
                                  plain["input_ids"])


def test_mixed_stream_resumes_exactly(world):
    cfg = PipelineConfig(groups_per_batch=4, max_length=80, seed=2, grounding_weight=1,
                         conversation_weight=1)
    it = iter(mixed(world, cfg))
    straight = [next(it) for _ in range(9)]
    it = iter(mixed(world, cfg))
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    fresh = iter(mixed(world, cfg))
    fresh.set_state(state)
    for want in straight[5:]:
        got = next(fresh)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert any(conversation_rows(b).any() for b in straight[5:])


# ---- the model: rows without image tokens beside rows with one -------------------------------
@pytest.mark.parametrize("head", ["similarity", "learned", "cross_attention"])
def test_text_only_rows_beside_image_rows(head):
    from jaxground.models import init_model
    from jaxground.models.config import GroundingConfig, tiny
    from jaxground.training.losses import LossConfig, total_loss

    base = tiny()  # two decoder layers, the second grounded: one compilation is quick
    cfg = base.replace(text=dataclasses.replace(base.text, num_layers=2),
                       grounding=GroundingConfig(type=head, layers=(1,), num_heads=4))
    model = init_model(cfg, seed=1)
    if head == "cross_attention":  # open the gate: the image summary reaches the stream
        gate = model.language_model.grounding_heads.gate
        gate[...] = jnp.full_like(gate[...], 0.7)
    p, t, img = cfg.image_seq_length, 24, cfg.image_token_id
    rng = np.random.RandomState(0)

    def row(n_image, n_text):  # left padded to t
        ids = [1] + [img] * n_image + list(rng.randint(2, 100, n_text))
        return [0] * (t - len(ids)) + ids, [0] * (t - len(ids)) + [1] * len(ids)

    image_rows = [row(p, 6), row(p, 4)]
    text_rows = [row(0, 9), row(0, 14)]
    # Image i serves rows 2i, 2i+1 (rows_per_image=2, as in training): [image, text] twice.
    ids, mask = map(np.array, zip(*[image_rows[0], text_rows[0], image_rows[1], text_rows[1]]))
    px = rng.randn(2, 3, 28, 28).astype(np.float32)
    labels = np.where(mask == 1, ids, IGNORE)
    labels[ids == img] = IGNORE
    batch = {"labels": jnp.asarray(labels),
             "grounding_labels": jnp.asarray(np.where(mask == 1, rng.randint(0, 2, ids.shape),
                                                      -1)),
             "lm_rows": jnp.array([True, True, True, False]),
             "is_positive": jnp.arange(4) % 2 == 0, "pair_index": jnp.array([1, 0, 3, 2])}
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):  # one compilation: the three forwards and the gradients of two losses
        m = lambda s: nnx.merge(graphdef, s)
        both = m(state).forward(ids, px, mask, rows_per_image=2)
        alone = m(state).forward(ids[0::2], px, mask[0::2])
        no_image = m(state).forward(ids[1::2], None, mask[1::2])
        def loss(s):  # LM + bce + margin grounding losses
            out = m(s).forward(ids, px, mask, rows_per_image=2)
            return sum(total_loss(out, batch, LossConfig(grounding_loss=g))[0]
                       for g in ("bce", "margin"))

        return both, alone, no_image, jax.value_and_grad(loss)(state)

    both, alone, no_image, grads = run(state)
    logits = np.asarray(both.logits)
    assert np.isfinite(logits).all() and np.isfinite(np.asarray(both.grounding)).all()
    # The per-row merge keeps every image row aligned with its own image ...
    np.testing.assert_allclose(logits[0::2], np.asarray(alone.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(both.grounding)[0::2],
                               np.asarray(alone.grounding), atol=1e-5)
    # ... and a text-only row gets nothing from any image, nor a grounding score.
    np.testing.assert_allclose(logits[1::2], np.asarray(no_image.logits), atol=1e-5)
    assert not np.asarray(both.grounding_mask)[1::2].any()
    assert (np.asarray(both.grounding)[1::2] == 0).all()
    # The losses and their gradients on such a batch stay finite.
    value, g = grads
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


# ---- bad input -------------------------------------------------------------------------------
BAD = [
    ("not json", "[{", "is not valid JSON"),
    ("not a list", {"id": 1}, "expected a JSON list"),
    ("no conversations", [{"id": "r1", "image": "a.png"}], "record 'r1': no 'conversations'"),
    ("not alternating", [{"id": "r2", "conversations": [MULTI_TURN[2], MULTI_TURN[2],
                                                        MULTI_TURN[3]]}],
     r"record 'r2': turns must alternate human, gpt"),
    ("ends with human", [{"id": "r3", "conversations": MULTI_TURN[2:] + MULTI_TURN[2:3]}],
     "record 'r3': turns must alternate human, gpt and end with gpt"),
    ("unknown role", [{"id": "r4", "conversations": [{"from": "user", "value": "hi"}]}],
     "record 'r4': turn 0 must be"),
    ("image but no <image>", [{"id": "r5", "image": "a.png", "conversations": MULTI_TURN[2:]}],
     "record 'r5': has an image, so <image> must be in its first human turn"),
    ("<image> without image", [{"id": "r6", "conversations": MULTI_TURN}],
     "record 'r6': has no 'image' but <image>"),
    ("empty value", [{"id": "r7", "conversations": [MULTI_TURN[2],
                                                    {"from": "gpt", "value": " "}]}],
     "record 'r7': turn 1 has an empty value"),
]


@pytest.mark.parametrize("name,data,message", BAD, ids=[b[0] for b in BAD])
def test_bad_files_name_the_file_and_record(tmp_path, name, data, message):
    path = write(tmp_path / "bad.json", data)
    with pytest.raises(ConversationFormatError, match=message) as e:
        read_conversations(path)
    assert path in str(e.value)


def test_missing_file_and_missing_images(tmp_path, world):
    with pytest.raises(ConversationFormatError, match="nowhere.json does not exist"):
        read_conversations(str(tmp_path / "nowhere.json"))
    records = [{"id": "lost", "image": "gone.png", "conversations": MULTI_TURN[:2]},
               {"id": 7, "conversations": MULTI_TURN[2:]}]
    file = write(tmp_path / "c.json", records)
    # As the pipeline treats grounding images: "error" names the file, the record, the
    # image; "skip" puts a masked placeholder in its place and counts it.
    cfg = PipelineConfig(groups_per_batch=2, max_length=80, conversation_weight=1,
                         grounding_weight=0, on_bad_image="error")
    with pytest.raises(BadImageError, match=f"{file}: record 'lost': image file .*gone.png "
                                            "does not exist"):
        list(zip(range(2), mixed(world, cfg, conversations=file, image_root=str(tmp_path))))
    counter = BadImageCounter()
    skip = PipelineConfig(groups_per_batch=2, max_length=80, conversation_weight=1,
                          grounding_weight=0, num_epochs=1)
    (batch,) = list(mixed(world, skip, counter, conversations=file, image_root=str(tmp_path)))
    assert counter.count == 1 and counter.paths[0].endswith("gone.png")
    trained = batch["lm_rows"] & (batch["labels"] != IGNORE).any(1)
    assert trained.sum() == 1  # the text-only one; the lost one is masked


def test_mixture_config_errors_name_the_field():
    from jaxground.training.config import ConfigValueError, DataSettings

    ok = DataSettings(conversations="c.json", mixture=" conversations=1 , grounding=3")
    assert ok.mixture_weights == {"conversations": 1.0, "grounding": 3.0}
    assert DataSettings().mixture_weights == {}
    for mixture, message in [("pictures=1", "'pictures=1'"), ("grounding=-1", ">= 0"),
                             ("grounding=x", ">= 0"), ("grounding=0,conversations=0", "all"),
                             ("grounding=1,grounding=2", "at most once")]:
        with pytest.raises(ConfigValueError, match=f"config.data.mixture: .*{message}"):
            DataSettings(conversations="c.json", mixture=mixture)
    with pytest.raises(ConfigValueError, match="config.data.mixture: .*data.conversations is "
                                               "empty"):
        DataSettings(mixture="conversations=1,grounding=3")
    # The run's weights (jaxground.training.setup.mixture): "" draws grounding pairs, or
    # the conversations when there are none; contrastive pretraining takes no conversations.
    from jaxground.training import setup
    from jaxground.training.config import TrainRun
    from jaxground.training.losses import LossConfig

    run = lambda **data: TrainRun(data=DataSettings(conversations="c.json", **data))
    pairs = setup.TrainData("d", [{"pair_id": "1"}], None, [], "d")
    assert setup.mixture(run(), pairs) == (1.0, 0.0)
    assert setup.mixture(run(), pairs._replace(records=[])) == (0.0, 1.0)
    assert setup.mixture(run(mixture="conversations=1,grounding=3"), pairs) == (3.0, 1.0)
    contrastive = dataclasses.replace(run(mixture="conversations=1"),
                                      loss=LossConfig(objective="contrastive"))
    with pytest.raises(ConfigValueError, match="config.data.mixture: .*contrastive"):
        setup.mixture(contrastive, pairs)


# ---- a short training run --------------------------------------------------------------------
def test_shapes_run_with_conversations_mixed_in_trains(tmp_path, world):
    from jaxground.config import shapes_config
    from jaxground.training.config import TrainRun
    from jaxground.training.trainer import Hook, train

    d, _, file = world
    c = shapes_config()
    c.data.dir, c.data.conversations, c.data.conversation_images = d, file, d
    c.data.mixture = "conversations=1,grounding=1"
    c.data.groups_per_batch, c.data.max_length = 2, 120
    c.train.steps, c.train.warmup_steps, c.train.eval_every = 2, 1, 0
    c.train.progress, c.train.checkpoint_every = False, 100
    seen = []
    out = train(TrainRun.from_config_dict(c), str(tmp_path / "run"),
                extra_hooks=[Hook(lambda info: seen.append(info.metrics))])
    assert out["step"] == 2 and len(seen) == 2
    for m in seen:
        assert m["finite"] and np.isfinite(m["loss"]) and m["lm_tokens"] > 0
