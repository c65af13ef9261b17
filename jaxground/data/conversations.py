"""LLaVA's instruction-tuning conversations (`llava_v1_5_mix665k.json`'s format) -> rows.

A file is a JSON list of records
    {"id": ..., "image": "coco/train2017/x.jpg" (optional, relative to an image root),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ..."},
                       {"from": "gpt", "value": "..."}, ...]}
`read_conversations` checks every record once (a mistake names the file and the record) and
keeps (human, gpt) turn pairs; `encode_conversation` turns one into a training row.

What LLaVA does (llava/train/train.py `preprocess_multimodal` + `preprocess_v1`,
llava/conversation.py `conv_vicuna_v1`), reproduced here:
- A first turn from "gpt" is dropped; the rest must alternate human, gpt.
- `<image>` is taken out of its turn and put in front: `"<image>\\n" + value.replace(
  "<image>", "").strip()`, so "What is this?\\n<image>" trains as "<image>\\nWhat is this?".
- The text is "{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
  (`Processor.chat_text` with the Vicuna system prompt, whatever the run's template).
- Labels: each answer's tokens and the `</s>` closing it; the system prompt, "USER:", the
  questions, the image and "ASSISTANT:" are IGNORE. LLaVA counts tokens of pieces tokenised
  one by one (`len(tokenizer(instruction)) - 2`: BOS and the trailing "▁" of "ASSISTANT: ");
  with a Llama tokenizer that is exactly the tokens ending after "ASSISTANT:" up to the
  `</s>`, which is what the fast tokenizer's character offsets give here.
- A text whose rounds do not split as LLaVA splits them (a value holding " ASSISTANT: " or
  "</s>") is a "tokenization mismatch" there: its labels are all IGNORE ("(ignored)").
- A record without an image has no image tokens (the pipeline gives it a zero image, as
  LLaVA gives a multimodal model `torch.zeros(3, H, W)`).
Not reproduced: LLaVA tokenises "USER: " and "\\n..." on either side of `<image>` separately
(`tokenizer_image_token`); the processor tokenises one whole string, as everywhere else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from jaxground.data.processor import IGNORE, IMAGE_TOKEN, VICUNA_SYSTEM, Processor

log = logging.getLogger(__name__)

ROLES = ("human", "gpt")


class ConversationFormatError(ValueError):
    """A conversations file or record that is not in LLaVA's format; names the file and
    the record."""


@dataclasses.dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[tuple[str, str], ...]  # (human, gpt) pairs, `<image>` taken out
    image: str | None                   # path relative to the image root; None: text only


@dataclasses.dataclass(frozen=True)
class Conversations:
    """A read file: its records and where their images are."""

    file: str
    image_root: str
    records: tuple[Conversation, ...]

    def where(self, conv: Conversation) -> str:
        return f"{self.file}: record {conv.id!r}"


def _turns(where: str, messages, has_image: bool) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise ConversationFormatError(f"{where}: 'conversations' must be a non-empty list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("from") not in ROLES or not isinstance(
                m.get("value"), str):
            raise ConversationFormatError(
                f"{where}: turn {k} must be {{'from': 'human' | 'gpt', 'value': str}}, "
                f"got {str(m)[:120]}")
    if messages[0]["from"] == "gpt":  # LLaVA: "Skip the first one if it is not from human"
        messages = messages[1:]
    roles = [m["from"] for m in messages]
    if not roles or len(roles) % 2 or roles != list(ROLES) * (len(roles) // 2):
        raise ConversationFormatError(
            f"{where}: turns must alternate human, gpt and end with gpt; got {roles}")
    values = [m["value"] for m in messages]
    if not all(v.strip() for v in values):
        raise ConversationFormatError(f"{where}: turn {[v.strip() for v in values].index('')} "
                                      "has an empty value")
    with_image = [k for k, v in enumerate(values) if IMAGE_TOKEN in v]
    if has_image and with_image != [0]:
        raise ConversationFormatError(
            f"{where}: has an image, so {IMAGE_TOKEN} must be in its first human turn and "
            f"nowhere else; found in turns {with_image}")
    if not has_image and with_image:
        raise ConversationFormatError(
            f"{where}: has no 'image' but {IMAGE_TOKEN} in turns {with_image}")
    if has_image:  # preprocess_multimodal: <image> to the front ("<image>\n" added later)
        values[0] = values[0].replace(IMAGE_TOKEN, "").strip()
    return tuple(zip(values[0::2], values[1::2]))


def read_conversations(path: str, image_root: str = "") -> Conversations:
    """A LLaVA-format .json -> its conversations; `image_root` "" = the file's folder.
    Image files are opened later, by the pipeline (missing ones per `on_bad_image`)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise ConversationFormatError(f"conversations file {path} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversationFormatError(f"conversations file {path} is not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise ConversationFormatError(f"{path}: expected a JSON list of records, got "
                                      f"{type(data).__name__}")
    records = []
    for i, r in enumerate(data):
        rid = str(r.get("id", f"#{i}")) if isinstance(r, dict) else f"#{i}"
        where = f"{path}: record {rid!r}"
        if not isinstance(r, dict) or "conversations" not in r:
            raise ConversationFormatError(f"{where}: no 'conversations'")
        image = r.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            raise ConversationFormatError(f"{where}: 'image' must be a relative path, got "
                                          f"{image!r}")
        records.append(Conversation(rid, _turns(where, r["conversations"], image is not None),
                                    image))
    if not records:
        raise ConversationFormatError(f"{path}: no records")
    root = image_root or os.path.dirname(os.path.abspath(path))
    return Conversations(path, root, tuple(records))


def conversation_text(processor: Processor, turns, image: bool) -> tuple[str, list]:
    """conv_vicuna_v1's whole text and the character span [start, end) each answer trains
    on: from the end of its "ASSISTANT:" through its closing EOS."""
    t, eos = processor.template, processor.tokenizer.eos_token or ""
    spans = []
    for k, (_, answer) in enumerate(turns):
        cue_end = len(processor.chat_text(list(turns[:k + 1]), VICUNA_SYSTEM, image))
        spans.append((cue_end, cue_end + len(t.answer_sep) + len(answer) + len(eos)))
    text = (processor.chat_text(list(turns), VICUNA_SYSTEM, image) + t.answer_sep + turns[-1][1]
            + eos)
    return text, spans


def llava_splits(text: str, processor: Processor) -> bool:
    """Whether `preprocess_v1` finds the rounds of `text` (split on sep2, each round on
    " ASSISTANT: " into exactly two parts); where it does not, it ignores the whole row."""
    t, eos = processor.template, processor.tokenizer.eos_token or ""
    rounds = text.split(eos) if eos else [text]
    return rounds[-1] == "" and all(r and len(r.split(t.after_question + t.answer_sep)) == 2
                                    for r in rounds[:-1])


def encode_conversation(processor: Processor, conv: Conversation, on_too_long: str = "error",
                        where: str = "") -> dict | None:
    """input_ids, labels (the answers and their EOS), grounding_labels (all -1), [T] int
    lists; None when no answer token fits `processor.max_length` and `on_too_long` is
    "drop". Truncation cuts the end, as LLaVA's model does with `tokenizer_model_max_length`.
    `where` names the record in messages (default: its id)."""
    where = where or f"conversation {conv.id!r}"
    image = conv.image is not None
    text, spans = conversation_text(processor, conv.turns, image)
    ids, offsets = processor._tokenize(text, images=int(image))
    labels = [x if any(e > a and s < b and e > s for a, b in spans) else IGNORE
              for x, (s, e) in zip(ids, offsets)]
    if not llava_splits(text, processor):
        log.warning("%s: LLaVA's preprocess_v1 would not find its rounds (tokenization "
                    "mismatch): all its labels are ignored", where)
        labels = [IGNORE] * len(ids)
    first = next((i for i, x in enumerate(labels) if x != IGNORE), len(ids))
    if len(ids) > processor.max_length:
        if first >= processor.max_length:
            if on_too_long == "drop":
                return None
            raise ValueError(f"{where}: its first answer starts at token {first}, beyond "
                             f"max_length={processor.max_length}")
        ids, labels = ids[:processor.max_length], labels[:processor.max_length]
    return {"input_ids": ids, "labels": labels, "grounding_labels": [-1] * len(ids)}
