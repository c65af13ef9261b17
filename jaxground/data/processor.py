"""Image + prompt -> model inputs: pixel_values, token ids, LM labels, grounding labels.

Images go through transformers' `CLIPImageProcessor` (PIL backend: no torchvision), after
LLaVA-1.5's optional pad-to-square with its fill colour (`expand2square` with
`int(255 * mean)` per channel). A prompt is one string, `<image>` included, tokenised in one
call (as HF's LlavaProcessor and LLaVA's training do with a whole conversation): tokenising
pieces separately lets tokenizers that prepend "▁" to every call insert stray tokens.
The single `<image>` token is then expanded to exactly `image_seq_length` image-token ids.
Only the assistant's answer (and its end-of-sequence token) carries LM labels; grounding
labels come from character spans through the fast tokenizer's offsets.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IGNORE = -100
IMAGE_TOKEN = "<image>"
# LLaVA's conv_vicuna_v1 (llava/conversation.py), the format LLaVA-1.5 was tuned and is
# evaluated in. ("human" is conv_vicuna_v0's / conv_llava_v1's wording, not this one's.)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")


@dataclasses.dataclass(frozen=True)
class Template:
    """prompt = before_image + <image> + "\\n" + question + after_question; then the answer
    is appended after `answer_sep` and closed by the tokenizer's EOS."""

    before_image: str
    after_question: str
    answer_sep: str = " "
    user_cue: str = "USER: "  # starts each later user turn of a multi-turn conversation


TEMPLATES = {
    # The llava-hf chat format: "USER: <image>\n{q} ASSISTANT:"
    "hf": Template("USER: ", " ASSISTANT:"),
    # LLaVA's conv_vicuna_v1: "{system} USER: <image>\n{q} ASSISTANT:", answers end in </s>.
    "vicuna_v1": Template(VICUNA_SYSTEM + " USER: ", " ASSISTANT:"),
}


class BadImageError(ValueError):
    """An image file that is missing or cannot be decoded; the message names the path."""


def to_rgb(image: Image.Image) -> Image.Image:
    """RGBA, LA, palette (with transparency), grayscale, CMYK ... -> RGB."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def open_image(path: str) -> Image.Image:
    """Reads and fully decodes an image (truncated or corrupt files fail here, not later)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        image = Image.open(io.BytesIO(data))
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        image.load()
    except FileNotFoundError as e:
        raise BadImageError(f"image file {path} does not exist") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"image file {path} cannot be decoded: {e}") from e
    return to_rgb(image)


def llava_fill(image_mean) -> tuple[int, ...]:
    """LLaVA-1.5's pad colour, `tuple(int(x * 255) for x in image_processor.image_mean)`:
    truncated, not rounded ((122, 116, 104) for CLIP's mean, not (123, 117, 104))."""
    return tuple(int(x * 255) for x in image_mean)


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `expand2square`: pad the short side, centring the image."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_image_processor(image_size: int, path: str | None = None):
    """transformers' CLIP image processor (PIL backend), from `path` if it has a config."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if path and os.path.exists(os.path.join(path, "preprocessor_config.json")):
        return CLIPImageProcessorPil.from_pretrained(path, local_files_only=True)
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


class Processor:
    """Turns (image, question, answer, spans) into model inputs for one LLaVA config."""

    def __init__(self, tokenizer, image_processor, image_seq_length: int, image_token_id: int,
                 template: str = "hf", pad_to_square: bool = False, max_length: int = 2048):
        if template not in TEMPLATES:
            raise ValueError(f"template {template!r} is not one of {sorted(TEMPLATES)}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast tokenizer is needed (character offsets for labels)")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_seq_length = image_seq_length
        self.image_token_id = image_token_id
        self.template = TEMPLATES[template]
        self.pad_to_square = pad_to_square
        self.max_length = max_length

    # ---- images ----------------------------------------------------------------------------
    def pixel_values(self, images) -> np.ndarray:
        """PIL images or paths -> [N, 3, H, W] float32 (HF NCHW)."""
        prepared = []
        for im in images:
            im = open_image(im) if isinstance(im, (str, os.PathLike)) else to_rgb(im)
            if self.pad_to_square:
                im = expand_to_square(im, llava_fill(self.image_processor.image_mean))
            prepared.append(im)
        out = self.image_processor(images=prepared, return_tensors="np")["pixel_values"]
        return np.asarray(out, np.float32)

    # ---- text -----------------------------------------------------------------------------
    def prompt_text(self, question: str) -> str:
        """The whole prompt string, e.g. "USER: <image>\\n{question} ASSISTANT:"."""
        t = self.template
        return f"{t.before_image}{IMAGE_TOKEN}\n{question}{t.after_question}"

    def chat_text(self, turns: list[tuple[str, str]], system: str | None = None,
                  image: bool = True) -> str:
        """A multi-turn conversation in the template's format, ending with the assistant's
        cue: turns are (user, assistant) pairs, the last one's assistant text "" (to be
        generated). The image goes before the first question, as LLaVA puts it; earlier
        answers close with the tokenizer's EOS, as conv_vicuna_v1's sep2 and the llava-hf
        chat template do:
        "{system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:".
        `system` replaces the template's system prompt (vicuna_v1), or comes first (hf)."""
        t = self.template
        head = t.before_image
        if system is not None:
            user = head[len(VICUNA_SYSTEM) + 1:] if head.startswith(VICUNA_SYSTEM) else head
            head = f"{system} {user}" if system else user
        eos = self.tokenizer.eos_token or ""
        parts = []
        for k, (question, answer) in enumerate(turns):
            first = k == 0
            start = (head + (IMAGE_TOKEN + "\n" if image else "")) if first else t.user_cue
            parts.append(f"{start}{question}{t.after_question}")
            if k < len(turns) - 1:
                parts.append(f"{t.answer_sep}{answer}{eos}")
        return "".join(parts)

    def encode_chat(self, turns: list[tuple[str, str]], system: str | None = None,
                    image: bool = True) -> list[int]:
        """Token ids of `chat_text(...)`, image tokens expanded, BOS first."""
        ids, _ = self._tokenize(self.chat_text(turns, system, image), images=int(image))
        return ids

    @staticmethod
    def _labels_from_spans(offsets, spans, shift: int, n: int) -> list[int]:
        """Per-token grounding label: a token overlapping span [a, b) (+ shift) gets it."""
        labels = [-1] * n
        for a, b, label, *_ in spans or ():
            a, b = a + shift, b + shift
            for i, (s, e) in enumerate(offsets):
                if s < b and e > a and e > s:
                    labels[i] = int(label)
        return labels

    def _tokenize(self, text: str, images: int = 1) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of `text`, tokenised in one call, with its single
        `<image>` (none when `images` is 0) expanded to `image_seq_length` image tokens and
        the BOS in front."""
        tok = self.tokenizer
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        at = [i for i, x in enumerate(ids) if x == self.image_token_id]
        if len(at) != images:
            mapped = tok.convert_tokens_to_ids(IMAGE_TOKEN)
            raise ValueError(
                f"expected {('no', 'one')[images] if images < 2 else images} {IMAGE_TOKEN} "
                f"token (id {self.image_token_id}) in the tokenised "
                f"prompt, found {len(at)}: the tokenizer maps {IMAGE_TOKEN!r} to {mapped!r}"
                f"{'' if mapped == self.image_token_id else ' (add it as a special token with the model image_token_id)'}"
                f"; prompt {text[:200]!r}")
        for i in at:
            ids[i:i + 1] = [self.image_token_id] * self.image_seq_length
            offsets[i:i + 1] = [offsets[i]] * self.image_seq_length
        if tok.bos_token_id is not None:
            ids, offsets = [tok.bos_token_id] + ids, [(0, 0)] + offsets
        return ids, offsets

    def encode(self, question: str, answer: str | None = None, question_spans=None,
               answer_spans=None, on_too_long: str = "error") -> dict | None:
        """One example. Spans are [start, end, label, ...] over `question` / `answer`.

        Returns input_ids, labels (LM; answer + EOS only), grounding_labels (1/0/-1), all
        [T] int32 lists, or None when too long and `on_too_long == "drop"`. The prompt ids
        are those of the whole prompt string; with an answer, the whole conversation
        "prompt answer_sep answer" is tokenised at once and the answer is every token that
        ends after the prompt.
        Truncation only ever removes answer tokens from the end, never image tokens or the
        prompt: a prompt that does not fit is an error (or a drop).
        """
        t, tok = self.template, self.tokenizer
        prompt = self.prompt_text(question)
        text = prompt if answer is None else prompt + t.answer_sep + answer
        ids, offsets = self._tokenize(text)
        n_prompt = next((i for i, (_, e) in enumerate(offsets) if e > len(prompt)), len(ids))
        g = self._labels_from_spans(offsets, question_spans,
                                    len(t.before_image) + len(IMAGE_TOKEN) + 1, len(ids))
        if answer is not None:
            answer_g = self._labels_from_spans(offsets, answer_spans,
                                               len(prompt) + len(t.answer_sep), len(ids))
            g = g[:n_prompt] + answer_g[n_prompt:]
        image = [i for i, x in enumerate(ids) if x == self.image_token_id]
        for i in image:
            g[i] = -1
        labels = [IGNORE] * n_prompt + ids[n_prompt:]
        if answer is not None and tok.eos_token_id is not None:
            ids, labels, g = ids + [tok.eos_token_id], labels + [tok.eos_token_id], g + [-1]
        if len(ids) > self.max_length:
            if n_prompt >= self.max_length:
                if on_too_long == "drop":
                    return None
                raise ValueError(f"prompt of {n_prompt} tokens ({self.image_seq_length} image "
                                 f"tokens) does not fit max_length={self.max_length}; "
                                 "truncating would cut into the prompt or image tokens")
            ids, labels, g = (x[:self.max_length] for x in (ids, labels, g))
        return {"input_ids": ids, "labels": labels, "grounding_labels": g}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def make_processor(tokenizer, config, data_cfg, source: str | None = None,
                   max_length: int | None = None) -> Processor:
    """The processor for a model config (`LlavaConfig`) and a run's data settings (the
    training config's `data` section); `source` may hold a preprocessor_config.json."""
    return Processor(tokenizer, clip_image_processor(config.vision.image_size, source),
                     config.image_seq_length, config.image_token_id, data_cfg.template,
                     data_cfg.pad_to_square, max_length or data_cfg.max_length)


def load_tokenizer(path: str):
    """The fast tokenizer in `path`: an HF tokenizer dir, or a bare `tokenizer.json` (the
    shapes world's) wrapped with LLaVA's special tokens."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"no tokenizer in {path} (tokenizer_config.json or "
                                "tokenizer.json)")
    return PreTrainedTokenizerFast(tokenizer_file=file, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>"})
