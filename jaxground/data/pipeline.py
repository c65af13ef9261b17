"""Deterministic, resumable grain pipeline from grounding records to padded batches.

source (groups of records sharing a pair_id) -> seeded shuffle -> repeat -> build one
positive/negative pair per group (seeded per global index) -> this JAX process's slice of
each global batch -> decode image + tokenize -> batch with padding to a fixed length ->
optional multiprocess prefetch. The iterator's state (`get_state` / `set_state`) is small
JSON-able data, saved with training checkpoints; resuming replays the exact batch sequence.

A pair that cannot be used (a corrupt or missing image, a prompt too long; logged and
counted) keeps its place as a masked placeholder: nothing in it is learned or scored. So
every global index stays where it is, and the global batches are the same for any number
of processes, and every process runs the same number of batches of a one-epoch pass (a
filter would shift one process's batches and leave the others waiting in a collective).

A group always yields two rows, paired: [positive, negative] for captions (a faithful
caption and one of its hallucinated twins) and [yes, no] for POPE-style questions about
the same image. Row 2i pairs with row 2i+1 in every batch (`pair_index`), as the margin
loss needs.

LLaVA instruction-tuning conversations (jaxground/data/conversations.py) may be mixed in,
`conversation_weight : grounding_weight` examples (grain's deterministic interleave of the
two repeated streams, before the process split: resume stays exact). A conversation
example has the same shape: [the conversation, a copy outside the LM loss] on its image (a
zero image for a text-only one, whose rows hold no image tokens), no grounding labels.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os

import grain
import numpy as np

from jaxground.data.conversations import Conversations, encode_conversation
from jaxground.data.processor import IGNORE, BadImageError, Processor
from jaxground.data.prompts import SHORT_ANSWER_SUFFIX

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    groups_per_batch: int = 8        # a batch has 2x this many rows
    max_length: int = 128            # every batch is padded to this length (no recompiles)
    seed: int = 0
    num_epochs: int | None = None    # None: repeat forever
    workers: int = 0                 # grain worker processes (0: in-process)
    on_bad_image: str = "skip"       # "skip" (log + count) | "error"
    on_too_long: str = "drop"        # "drop" | "error"
    caption_prompt: str = "Describe the image."
    question_suffix: str = SHORT_ANSWER_SUFFIX
    grounding_weight: float = 1.0    # examples drawn from the grounding pairs ...
    conversation_weight: float = 0.0  # ... and from the conversations, in this ratio

    def __post_init__(self):
        if self.on_bad_image not in ("skip", "error"):
            raise ValueError(f"data.on_bad_image {self.on_bad_image!r}: use 'skip' or 'error'")
        if self.on_too_long not in ("drop", "error"):
            raise ValueError(f"data.on_too_long {self.on_too_long!r}: use 'drop' or 'error'")
        if min(self.weights) < 0 or not max(self.weights):
            raise ValueError(f"data.mixture: weights {self.weights} (grounding, conversations) "
                             "must be >= 0, one of them > 0")

    @property
    def weights(self) -> tuple[float, float]:
        return self.grounding_weight, self.conversation_weight


def make_groups(records: list[dict]) -> list[dict]:
    """Records -> groups that can yield a (positive, negative) pair, in a stable order."""
    by_pair: dict[str, list[dict]] = collections.defaultdict(list)
    for r in records:
        by_pair[r["pair_id"]].append(r)
    groups = []
    for pair_id in sorted(by_pair):
        rs = by_pair[pair_id]
        pos = [r for r in rs if r["label"] == "positive"]
        neg = [r for r in rs if r["label"] == "negative"]
        if pos and neg:
            groups.append({"pair_id": pair_id, "kind": rs[0]["kind"], "positives": pos,
                           "negatives": neg})
    return groups


class BadImageCounter:
    """Skipped examples in this process (with grain workers, each worker logs its own)."""

    def __init__(self):
        self.count = 0
        self.paths: list[str] = []


class ExampleBuilder:
    """What the builders share: the image (or its skip) and the masked placeholder."""

    def __init__(self, processor: Processor, image_root: str, cfg: PipelineConfig,
                 counter: BadImageCounter):
        self.processor, self.image_root, self.cfg, self.counter = (processor, image_root, cfg,
                                                                   counter)

    def pixels(self, path: str, where: str) -> np.ndarray | None:
        """[C, H, W] of the image at `path`; None (logged, counted) when it cannot be read
        and `on_bad_image` is "skip"."""
        try:
            return self.processor.pixel_values([path])[0]
        except BadImageError as e:
            if self.cfg.on_bad_image == "error":
                raise
            self.counter.count += 1
            self.counter.paths.append(path)
            log.warning("skipping example %s: %s", where, e)
            return None

    def placeholder(self) -> dict:
        """A skipped example's stand-in: the caption prompt alone (its labels all ignored,
        no grounding labels) on a blank image, in neither row's LM loss."""
        if not hasattr(self, "_placeholder"):
            from PIL import Image

            row = self.processor.encode(self.cfg.caption_prompt, on_too_long="error")
            blank = self.processor.pixel_values([Image.new("RGB", (32, 32))])[0]
            self._placeholder = {"rows": [row, row], "pixel_values": blank,
                                 "lm_rows": [False, False]}
        return self._placeholder


class PairBuilder(ExampleBuilder):
    """One group -> a two-row example; a masked placeholder when it cannot be used."""

    def _row(self, record: dict) -> dict | None:
        if record["kind"] == "question":
            answer = record["answer"].capitalize()
            return self.processor.encode(record["text"] + self.cfg.question_suffix, answer,
                                         question_spans=record["spans"],
                                         on_too_long=self.cfg.on_too_long)
        return self.processor.encode(self.cfg.caption_prompt, record["text"],
                                     answer_spans=record["spans"],
                                     on_too_long=self.cfg.on_too_long)

    def __call__(self, group: dict, rng: np.random.Generator) -> dict | None:
        pos = group["positives"][rng.integers(len(group["positives"]))]
        neg = group["negatives"][rng.integers(len(group["negatives"]))]
        pixels = self.pixels(os.path.join(self.image_root, pos["image"]), group["pair_id"])
        if pixels is None:
            return self.placeholder()
        rows = [self._row(pos), self._row(neg)]
        if any(r is None for r in rows):  # too long, on_too_long="drop"
            return self.placeholder()
        question = group["kind"] == "question"
        return {"rows": rows, "pixel_values": pixels,
                # Questions train the LM on both answers ("no" is faithful too); a
                # hallucinated caption never does.
                "lm_rows": [True, question]}


class ConversationBuilder(ExampleBuilder):
    """One conversation -> [it, a copy outside the LM loss] on its image (zeros when it
    has none, as LLaVA gives text-only examples); the placeholder when unusable."""

    def __init__(self, conversations: Conversations, processor: Processor, cfg: PipelineConfig,
                 counter: BadImageCounter):
        super().__init__(processor, conversations.image_root, cfg, counter)
        self.conversations = conversations

    def __call__(self, conv) -> dict:
        where = self.conversations.where(conv)
        if conv.image is None:
            pixels = np.zeros_like(self.placeholder()["pixel_values"])
        else:
            try:
                pixels = self.pixels(os.path.join(self.image_root, conv.image), where)
            except BadImageError as e:
                raise BadImageError(f"{where}: {e}") from e
            if pixels is None:
                return self.placeholder()
        row = encode_conversation(self.processor, conv, self.cfg.on_too_long, where)
        if row is None:
            return self.placeholder()
        return {"rows": [row, row], "pixel_values": pixels, "lm_rows": [True, False]}


def collate(examples: list[dict], max_length: int, pad_id: int,
            first_row: int = 0) -> dict[str, np.ndarray]:
    """Padded arrays of one process's rows; `first_row` is where they start in the global
    batch (`pair_index` indexes the global batch, as the loss sees it)."""
    rows = [r for ex in examples for r in ex["rows"]]
    n = len(rows)
    out = {"input_ids": np.full((n, max_length), pad_id, np.int32),
           "attention_mask": np.zeros((n, max_length), np.int32),
           "labels": np.full((n, max_length), IGNORE, np.int32),
           "grounding_labels": np.full((n, max_length), -1, np.int32)}
    for i, r in enumerate(rows):
        t = len(r["input_ids"])
        out["input_ids"][i, :t] = r["input_ids"]
        out["attention_mask"][i, :t] = 1
        out["labels"][i, :t] = r["labels"]
        out["grounding_labels"][i, :t] = r["grounding_labels"]
    # One image per example: its rows share it (`rows_per_image` in the model's forward).
    out["pixel_values"] = np.stack([ex["pixel_values"] for ex in examples])
    out["lm_rows"] = np.array([f for ex in examples for f in ex["lm_rows"]])
    out["is_positive"] = np.arange(n) % 2 == 0
    out["pair_index"] = (first_row + (np.arange(n) ^ 1)).astype(np.int32)
    return out


class ProcessShard(grain.MapDataset):
    """This process's share of a global example order, batch by batch.

    Global batch b is elements [b*G, (b+1)*G) of the parent; process p of P takes the p-th
    contiguous slice of each, G/P elements. The global batch is then the same whatever the
    number of processes, so a 2-process run sees exactly the batches of a 1-process run.
    """

    def __init__(self, parent: grain.MapDataset, index: int, count: int, global_batch: int):
        super().__init__(parent)
        if global_batch % count:
            raise ValueError(f"data.groups_per_batch={global_batch} is not divisible by "
                             f"the {count} JAX processes")
        self._index, self._count, self._local = index, count, global_batch // count

    def __len__(self) -> int:
        return len(self._parent) // self._count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        batch, offset = divmod(i, self._local)
        return self._parent[batch * self._local * self._count + self._index * self._local
                            + offset]


def build_dataset(records: list[dict], processor: Processor, image_root: str,
                  cfg: PipelineConfig, process_index: int | None = None,
                  process_count: int | None = None,
                  counter: BadImageCounter | None = None,
                  conversations: Conversations | None = None) -> grain.IterDataset:
    """The batch stream for this JAX process (`cfg.groups_per_batch` is global); `iter()`
    it, or keep the iterator to checkpoint its state. `conversations` are mixed in at
    `cfg.conversation_weight` (to the grounding pairs' `cfg.grounding_weight`)."""
    if process_index is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    counter = counter or BadImageCounter()
    streams = []
    if cfg.grounding_weight > 0:
        groups = make_groups(records)
        if not groups:
            raise ValueError("no record groups with both a positive and a negative example")
        ds = grain.MapDataset.source(groups).shuffle(seed=cfg.seed).repeat(cfg.num_epochs)
        # Pairs are drawn per global index (before sharding): the same for any process count.
        streams.append(ds.random_map(PairBuilder(processor, image_root, cfg, counter),
                                     seed=cfg.seed + 1))
    if cfg.conversation_weight > 0:
        if conversations is None:
            raise ValueError("data.mixture gives conversations a weight but no conversations "
                             "were given (data.conversations)")
        ds = grain.MapDataset.source(list(conversations.records)).shuffle(seed=cfg.seed + 2)
        streams.append(ds.repeat(cfg.num_epochs).map(
            ConversationBuilder(conversations, processor, cfg, counter)))
    weights = [w for w in cfg.weights if w > 0]
    # An interleave fixed by the weights (grain's MixedMapDataset): random access, so the
    # iterator's state stays one index.
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)
    ds = ProcessShard(ds, process_index, process_count, cfg.groups_per_batch)
    it = ds.to_iter_dataset()
    pad_id = processor.tokenizer.pad_token_id or 0
    local = cfg.groups_per_batch // process_count
    first_row = 2 * local * process_index
    it = it.batch(local, drop_remainder=True,
                  batch_fn=lambda exs: collate(exs, cfg.max_length, pad_id, first_row))
    if cfg.workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl
            flags.FLAGS.mark_as_parsed()  # app (a notebook, a script) nothing parsed them
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
    return it
