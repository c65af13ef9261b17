"""Tiny Llama-style tokenizers trained locally with `tokenizers`, in the three flavours a
LLaVA checkpoint can come with:

- "legacy": transformers' LlamaTokenizer with legacy=True (Metaspace prepend "always":
  every piece of text between special tokens, and every separate encode call, gets a "▁");
- "non_legacy": legacy=False (prepend only at the start of the text);
- "bare": only a tokenizer.json in the layout llava-hf's Hub repos ship (normalizer
  Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer: each encode call and each piece
  between special tokens gets a "▁"), loaded by `load_tokenizer` as a plain
  PreTrainedTokenizerFast: " ASSISTANT:" alone becomes ['▁', '▁ASSISTANT:'].
All have <s>, </s>, <unk>, byte-fallback tokens and "<image>" as a special token.
"""

from __future__ import annotations

import os

from jaxground.data.processor import IMAGE_TOKEN, VICUNA_SYSTEM

FLAVOURS = ("legacy", "non_legacy", "bare")

CORPUS = [VICUNA_SYSTEM, "USER: ASSISTANT: Is there a dog in the image? Answer the question "
          "using a single word or phrase. Yes No", "Please describe this image in detail.",
          "A red square and a blue circle on a table. There is a cat next to two dogs.",
          "Describe the image. The image shows a man riding a horse near a bus."] * 3


def _vocab_and_merges(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Trained on words (sentencepiece does not merge across spaces either).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=True)
    tok.decoder = decoders.Metaspace()
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256,
                                  special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    import json

    state = json.loads(tok.to_str())["model"]
    return state["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                            for m in state["merges"]]


def llama_tokenizer(legacy: bool):
    from transformers import LlamaTokenizer

    vocab, merges = _vocab_and_merges()
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.padding_side = "left"
    return tok


def hub_style_tokenizer():
    """A `tokenizers.Tokenizer` laid out like llava-hf's tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab, merges = _vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>", IMAGE_TOKEN)])
    return tok


def make(flavour: str, tmp_dir: str):
    """A tokenizer of `flavour` (see the module docstring)."""
    from jaxground.data.processor import load_tokenizer

    if flavour == "legacy":
        return llama_tokenizer(True)
    if flavour == "non_legacy":
        return llama_tokenizer(False)
    if flavour == "bare":
        os.makedirs(tmp_dir, exist_ok=True)
        hub_style_tokenizer().save(os.path.join(tmp_dir, "tokenizer.json"))
        return load_tokenizer(tmp_dir)
    raise ValueError(flavour)
