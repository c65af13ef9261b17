"""Image + prompt -> model inputs: pixel_values, token ids, LM labels, grounding labels.

Images go through transformers' `CLIPImageProcessor` (PIL backend: no torchvision), after
LLaVA-1.5's optional pad-to-square with the mean colour. Prompts follow LLaVA's way of
tokenising: the text around `<image>` is tokenised in chunks and the image placeholder is
expanded to exactly `image_seq_length` image-token ids, so text can never merge into it.
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
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's "
                 "questions.")


@dataclasses.dataclass(frozen=True)
class Template:
    """prompt = before_image + <image> + "\\n" + question + after_question; then the answer
    is appended after `answer_sep` and closed by the tokenizer's EOS."""

    before_image: str
    after_question: str
    answer_sep: str = " "


TEMPLATES = {
    # The llava-hf chat format: "USER: <image>\n{q} ASSISTANT:"
    "hf": Template("USER: ", " ASSISTANT:"),
    # LLaVA's original conv_vicuna_v1: system prompt, " " and "</s>" separators.
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
                mean = tuple(int(round(255 * m)) for m in self.image_processor.image_mean)
                im = expand_to_square(im, mean)
            prepared.append(im)
        out = self.image_processor(images=prepared, return_tensors="np")["pixel_values"]
        return np.asarray(out, np.float32)

    # ---- text -----------------------------------------------------------------------------
    def _tokens(self, text: str):
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), list(enc["offset_mapping"])

    @staticmethod
    def _labels_from_spans(offsets, spans, n: int) -> list[int]:
        """Per-token grounding label: a token overlapping span [a, b) gets its label."""
        labels = [-1] * n
        for a, b, label, *_ in spans or ():
            for i, (s, e) in enumerate(offsets):
                if s < b and e > a and e > s:
                    labels[i] = int(label)
        return labels

    def encode(self, question: str, answer: str | None = None, question_spans=None,
               answer_spans=None, on_too_long: str = "error") -> dict | None:
        """One example. Spans are [start, end, label, ...] over `question` / `answer`.

        Returns input_ids, labels (LM; answer + EOS only), grounding_labels (1/0/-1), all
        [T] int32 lists, or None when too long and `on_too_long == "drop"`.
        Truncation only ever removes answer tokens from the end, never image tokens or the
        prompt: a prompt that does not fit is an error (or a drop).
        """
        t = self.template
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        before, _ = self._tokens(t.before_image)
        q_ids, q_offsets = self._tokens("\n" + question)
        q_offsets = [(s - 1, e - 1) for s, e in q_offsets]  # spans index `question` itself
        after, _ = self._tokens(t.after_question)
        prompt = (bos + before + [self.image_token_id] * self.image_seq_length + q_ids + after)
        g_prompt = ([-1] * (len(bos) + len(before) + self.image_seq_length)
                    + self._labels_from_spans(q_offsets, question_spans, len(q_ids))
                    + [-1] * len(after))
        ids, labels, g = list(prompt), [IGNORE] * len(prompt), list(g_prompt)
        if answer is not None:
            a_ids, a_offsets = self._tokens(t.answer_sep + answer)
            shift = len(t.answer_sep)
            a_offsets = [(s - shift, e - shift) for s, e in a_offsets]
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            ids += a_ids + eos
            labels += a_ids + eos
            g += self._labels_from_spans(a_offsets, answer_spans, len(a_ids)) + [-1] * len(eos)
        if len(ids) > self.max_length:
            if len(prompt) >= self.max_length:
                if on_too_long == "drop":
                    return None
                raise ValueError(f"prompt of {len(prompt)} tokens ({self.image_seq_length} image "
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
