"""The serving engine: requests decoded together in batches of a few fixed shapes.

    engine = Engine(model, processor, ServeShapes(...))
    engine.warm_up()              # compiles every shape now, so no request waits for one
    engine.start()
    job = engine.submit(request, sink)   # sink(event) gets TokenEvent..., then Finished

One thread owns the model. It takes the first waiting request, waits up to `window_s` for
others that can share its program (same image / no image, same guidance; it waits only
for as many as are likely to come: a lone client's requests start at once), pads the batch to the
smallest compiled batch size and the prompts to the smallest compiled length that hold them
(left padding; spare rows are copies of the first, stopped after one token), and runs
`jaxground.generate` once. Every row has its own temperature, top_p, seed and budget, so a
request's answer does not depend on its neighbours. Tokens reach each job while the loop
runs (generate's `on_token`), where they are detokenised, checked against stop strings and
handed to the job's sink; a job whose client went away, or whose stop string appeared, is
stopped inside the loop on the next step.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from typing import Callable

import numpy as np

from jaxground.data.processor import Processor
from jaxground.inference.batching import left_pad
from jaxground.inference.generate import StepTokens, generate
from jaxground.inference.score import patch_maps, score
from jaxground.serve.messages import MAX_TOP_LOGPROBS, ChatRequest, RequestError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServeShapes:
    """The compiled shapes: batch sizes, prompt lengths (tokens, image included) and the
    answer length every program decodes up to."""

    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    prompt_lengths: tuple[int, ...] = ()   # () = default_lengths(...)
    max_tokens: int = 512
    window_s: float = 0.02                 # how long a batch may wait for company
    stream_every: int = 4                  # steps the decode loop hands over at a time
                                           # (each hand-over is a round trip to Python)

    def length_for(self, n: int) -> int | None:
        return next((t for t in self.prompt_lengths if t >= n), None)

    def batch_for(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n)


def default_lengths(image_tokens: int, context: int, max_tokens: int) -> tuple[int, ...]:
    """Prompt lengths to compile when none are given: the image and a question of up to 64
    tokens (LLaVA-1.5's prompts: 576 image tokens + ~35 of system prompt + the question fit
    640), a conversation of up to 512 more, and everything the context leaves."""
    longest = context - max_tokens
    return tuple(sorted({min(n, longest) for n in (image_tokens + 64, image_tokens + 512,
                                                   longest)}))


@dataclasses.dataclass
class TokenEvent:
    """One generated token: its text (the answer's new visible text; "" while held back),
    id, log p and alternatives, grounding logit (None: not scored) and flag."""

    text: str
    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, int, float]]
    grounding: float | None
    flagged: bool
    object_word: bool   # one of the object words flagging looks at (the ones the grounding
                        # loss trains: other words' scores carry little meaning)


@dataclasses.dataclass
class Finished:
    """The job's end: why ("stop" or "length"; "cancelled" when the client left), the
    remaining text, token counts and, when asked, each answer token's patch evidence.
    A job that does not stream gets its tokens here (`tokens`), not one event each: every
    event wakes the receiving thread, which then competes with the decode loop."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    patches: list[list[float] | None] | None = None
    grid: int | None = None
    tokens: list[TokenEvent] | None = None


@dataclasses.dataclass
class Failed:
    message: str


class Job:
    """One request in flight. `sink` is called from the engine's thread."""

    def __init__(self, request: ChatRequest, ids: list[int], pixels, seed: int,
                 sink: Callable[[object], None], engine: "Engine"):
        self.request, self.ids, self.pixels, self.seed = request, ids, pixels, seed
        self.sink, self.engine = sink, engine
        self.cancelled = threading.Event()
        self.token_ids: list[int] = []   # generated, EOS included
        self.decoded = ""                # decode(token_ids) so far
        self._window = (0, 0)            # token_ids[a:b] was decoded last (see _new_text)
        self.sent = ""                   # the visible text handed out so far
        self.cut: int | None = None      # where a stop string starts in `decoded`
        self.hit_eos = False
        self.events: list[TokenEvent] = []

    @property
    def has_image(self) -> bool:
        return self.pixels is not None

    @property
    def group(self) -> tuple:
        return (self.has_image, self.request.guidance)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def ended(self) -> bool:
        return self.hit_eos or self.cut is not None or self.cancelled.is_set()

    def take(self, step: StepTokens, row: int) -> None:
        """The row's token of this step: detokenise, look for stop strings, emit."""
        token_id = int(step.tokens[row])
        self.token_ids.append(token_id)
        if token_id in self.engine.eos_ids and not self.request.ignore_eos:
            self.hit_eos = True
            return
        before = self.decoded
        piece = self._new_text()
        self.decoded += piece
        stops = [i for i in (self.decoded.find(s) for s in self.request.stop) if i >= 0]
        if stops:
            self.cut = min(stops)
        visible = self._visible()
        text, self.sent = visible[len(self.sent):], visible
        g = None
        if step.grounding is not None and step.scored[row]:
            g = float(step.grounding[row])
        k = self.request.top_logprobs
        top = [(self.engine.piece(int(i)), int(i), float(p))
               for i, p in zip(step.top_ids[row, :k], step.top_logprobs[row, :k])]
        event = TokenEvent(text=text, token=piece, token_id=token_id,
                           logprob=float(step.logprobs[row]), top=top, grounding=g,
                           flagged=self.engine.flags(token_id, g, self.request),
                           object_word=bool(self.engine.flag_mask[token_id]))
        if self.cut is not None and len(before) >= self.cut:
            return  # the token lies inside the stop string: not part of the answer
        self.events.append(event)
        if self.request.stream:
            self.sink(event)

    def _new_text(self) -> str:
        """The text the newest token adds. Decoded from the previous token on, not from the
        start (a whole-answer decode per token is quadratic: 51 ms of a 512-token answer):
        decode(previous + new) minus decode(previous) keeps the word-boundary space that a
        decode from the new token alone would drop. Nothing while a character is still
        incomplete (byte-fallback pieces); it comes out with the token that completes it."""
        tok = self.engine.processor.tokenizer
        a, b = self._window
        known = tok.decode(self.token_ids[a:b], skip_special_tokens=True)
        text = tok.decode(self.token_ids[a:], skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(known):
            return ""
        self._window = (b, len(self.token_ids))
        return text[len(known):]

    def _visible(self, final: bool = False) -> str:
        """The text that may be shown: up to a stop string, and (until the end) without a
        tail that could still become a stop string or a half-decoded character."""
        text = self.decoded if self.cut is None else self.decoded[:self.cut]
        if final or self.cut is not None:
            return text
        hold = 0
        for s in self.request.stop:
            hold = max([hold] + [n for n in range(1, len(s)) if text.endswith(s[:n])])
        text = text[:len(text) - hold] if hold else text
        return text.rstrip("\ufffd")

    def finish(self, patches=None, grid=None) -> None:
        if self.cut is None:  # characters still incomplete at the end come out as they are
            self.decoded = self.engine.processor.tokenizer.decode(self.token_ids,
                                                                  skip_special_tokens=True)
        text = self._visible(final=True)
        rest, self.sent = text[len(self.sent):], text
        stopped = self.hit_eos or self.cut is not None
        reason = ("stop" if stopped else "cancelled" if self.cancelled.is_set()
                  else "length")
        streamed = self.request.stream
        self.sink(Finished(reason=reason, text=rest if streamed else text,
                           prompt_tokens=len(self.ids), completion_tokens=len(self.token_ids),
                           patches=patches, grid=grid, tokens=None if streamed else self.events))


class Engine:
    """Owns the model; batches and runs jobs on its own thread."""

    def __init__(self, model, processor: Processor, shapes: ServeShapes, *,
                 flag_tokens=None, flag_threshold: float = 0.0, guidance_tokens=None,
                 guidance_top_k: int = 5):
        self.model, self.processor = model, processor
        cfg = model.config
        context = cfg.text.max_position_embeddings
        lengths = shapes.prompt_lengths or default_lengths(cfg.image_seq_length, context,
                                                           shapes.max_tokens)
        if min(lengths) < 1 or max(lengths) + shapes.max_tokens > context:
            raise ValueError(f"prompt lengths {list(lengths)} + max_tokens "
                             f"{shapes.max_tokens} must fit the context of {context} tokens")
        self.shapes = dataclasses.replace(shapes, prompt_lengths=tuple(sorted(lengths)),
                                          batch_sizes=tuple(sorted(shapes.batch_sizes)))
        tok = processor.tokenizer
        self.eos_ids = {tok.eos_token_id} - {None}
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (
            tok.eos_token_id or 0)
        vocab = cfg.text.vocab_size
        self.flag_mask = np.ones(vocab, bool)
        if flag_tokens is not None:
            self.flag_mask[:] = False
            self.flag_mask[np.asarray(flag_tokens, int)] = True
        self.flag_threshold = flag_threshold
        self.guidance_tokens, self.guidance_top_k = guidance_tokens, guidance_top_k
        self.has_heads = bool(cfg.grounded_layers)
        self._pieces = [p.replace("\u2581", " ").replace("\u0120", " ")
                        for p in tok.convert_ids_to_tokens(list(range(len(tok))))]
        self._queue: queue.Queue[Job] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._expected = 1  # requests the next batch waits for (see _loop)
        self.stats = {"batches": 0, "completed": 0, "cancelled": 0, "active": 0,
                      "rows": 0, "busy_s": 0.0}

    # ---- per-token helpers ------------------------------------------------------------
    def piece(self, token_id: int) -> str:
        return self._pieces[token_id] if 0 <= token_id < len(self._pieces) else ""

    def flags(self, token_id: int, grounding: float | None, request: ChatRequest) -> bool:
        threshold = (self.flag_threshold if request.flag_threshold is None
                     else request.flag_threshold)
        return (grounding is not None and grounding < threshold
                and bool(self.flag_mask[token_id]))

    # ---- requests ---------------------------------------------------------------------
    def encode(self, request: ChatRequest) -> tuple[list[int], np.ndarray | None]:
        """Prompt ids and pixels; RequestError when the prompt does not fit."""
        ids = self.processor.encode_chat(request.turns, request.system,
                                         image=request.image is not None)
        if not 1 <= request.max_tokens <= self.shapes.max_tokens:
            raise RequestError(f"max_tokens must be in [1, {self.shapes.max_tokens}], got "
                               f"{request.max_tokens}", "max_tokens")
        longest = self.shapes.prompt_lengths[-1]
        if len(ids) > longest:
            raise RequestError(f"the prompt is {len(ids)} tokens (image included); this "
                               f"server takes at most {longest}", "messages",
                               "context_length_exceeded")
        if request.guidance is not None and (request.image is None or not self.has_heads):
            raise RequestError("grounding guidance needs an image and a model with grounding "
                               "heads", "guidance")
        pixels = (None if request.image is None
                  else self.processor.pixel_values([request.image])[0])
        return ids, pixels

    def submit(self, request: ChatRequest, sink: Callable[[object], None]) -> Job:
        ids, pixels = self.encode(request)
        seed = request.seed if request.seed is not None else random.getrandbits(31)
        job = Job(request, ids, pixels, seed % (1 << 31), sink, self)
        self._queue.put(job)
        return job

    # ---- the engine thread ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="jaxground-engine",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        pending: list[Job] = []
        while not self._stopping.is_set():
            if not pending:
                try:
                    pending.append(self._queue.get(timeout=0.1))
                except queue.Empty:
                    continue
            # Wait (up to the window) for as many requests as are likely to come: the last
            # batch's clients, who come back once answered, and those who queued meanwhile.
            # A lone client's requests start at once; closed-loop clients merge into one
            # batch instead of splitting into two that take turns.
            deadline = time.monotonic() + self.shapes.window_s
            biggest = self.shapes.batch_sizes[-1]
            while len(pending) < min(self._expected, biggest):
                left = deadline - time.monotonic()
                try:
                    pending.append(self._queue.get(timeout=max(left, 0)) if left > 0
                                   else self._queue.get_nowait())
                except queue.Empty:
                    break
            group = pending[0].group
            batch = [j for j in pending if j.group == group][:biggest]
            pending = [j for j in pending if j not in batch]
            try:
                self.run_batch(batch)
            except Exception as e:  # noqa: BLE001  (a bug must not take the server down)
                log.exception("batch failed")
                for job in batch:
                    job.sink(Failed(f"generation failed: {type(e).__name__}: {e}"))
            self._expected = len(batch) + len(pending) + self._queue.qsize()

    def run_batch(self, jobs: list[Job]) -> None:
        for gone in [j for j in jobs if j.cancelled.is_set()]:
            gone.finish()
            self.stats["cancelled"] += 1
        jobs = [j for j in jobs if not j.cancelled.is_set()]
        if not jobs:
            return
        self.stats["active"] = len(jobs)
        b = self.shapes.batch_for(len(jobs))
        t = self.shapes.length_for(max(len(j.ids) for j in jobs))
        fill = b - len(jobs)
        rows = [j.ids for j in jobs] + [jobs[0].ids] * fill
        ids, mask = left_pad(rows, self.pad_id, length=t)
        pixels = (None if not jobs[0].has_image
                  else np.stack([j.pixels for j in jobs] + [jobs[0].pixels] * fill))
        r = [j.request for j in jobs] + [jobs[0].request] * fill
        budget = [q.max_tokens for q in r[:len(jobs)]] + [1] * fill
        guidance = jobs[0].request.guidance

        def on_token(step: StepTokens):
            stop = np.zeros(b, bool)
            for row, job in enumerate(jobs):
                if step.live[row] and not job.ended:  # a stopped row runs to the hand-over
                    job.take(step, row)
                stop[row] = job.ended
            return stop

        t0 = time.perf_counter()
        self._generate(ids, mask, pixels, [q.temperature for q in r], [q.top_p for q in r],
                       [j.seed for j in jobs] + [0] * fill, budget,
                       [q.ignore_eos for q in r], guidance, on_token)
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        self.stats["busy_s"] += time.perf_counter() - t0
        for job in jobs:
            patches = grid = None
            if job.request.patches and job.has_image and self.has_heads and job.events:
                patches, grid = self.patches(job)
            job.finish(patches, grid)
            self.stats["cancelled" if job.cancelled.is_set() else "completed"] += 1
        self.stats["active"] = 0

    def _generate(self, ids, mask, pixels, temperature, top_p, seeds, budget, ignore_eos,
                  guidance, on_token):
        return generate(
            self.model, ids, pixels, attention_mask=mask, max_new_tokens=self.shapes.max_tokens,
            temperature=np.asarray(temperature, np.float32),
            top_p=np.asarray(top_p, np.float32), seed=np.asarray(seeds),
            row_max_new_tokens=np.asarray(budget), row_ignore_eos=np.asarray(ignore_eos),
            eos_token_id=sorted(self.eos_ids) or None, pad_token_id=self.pad_id,
            guidance=guidance, guidance_top_k=self.guidance_top_k,
            guidance_tokens=self.guidance_tokens if guidance is not None else None,
            on_token=on_token, stream_top_k=MAX_TOP_LOGPROBS,
            stream_every=min(self.shapes.stream_every, self.shapes.max_tokens))

    # ---- heatmaps ---------------------------------------------------------------------
    def patches(self, job: Job) -> tuple[list[list[float] | None], int]:
        """Each emitted answer token's per-patch evidence (teacher forced, mean over the
        grounded layers; what the token's score is the maximum of), and the grid side."""
        answer = job.token_ids[:len(job.events)]
        ids = job.ids + answer
        t = self.shapes.prompt_lengths[-1] + self.shapes.max_tokens
        ids_1t, mask_1t = left_pad([ids], self.pad_id, length=t)
        out = score(self.model, ids_1t, job.pixels[None], mask_1t, patches=True)
        maps = patch_maps(np.asarray(out.patches)[0, t - len(answer):], self.model.config)
        grid = int(round(maps.shape[-1] ** 0.5))
        return [m.round(4).tolist() if e.grounding is not None else None
                for m, e in zip(maps, job.events)], grid

    # ---- compilation ------------------------------------------------------------------
    def warm_up(self, text_only: bool = True, guided: bool = True,
                progress: Callable[[str], None] | None = None) -> float:
        """Compiles every program a request can need; returns the seconds it took."""
        t0 = time.perf_counter()
        cfg = self.model.config
        size = cfg.vision.image_size
        kinds = [True] + ([False] if text_only else [])
        for with_image in kinds:
            for guidance in ([None, 1.0] if guided and with_image and self.has_heads
                             else [None]):
                for b in self.shapes.batch_sizes:
                    for t in self.shapes.prompt_lengths:
                        n_img = cfg.image_seq_length if with_image else 0
                        if t < n_img + 1:
                            continue
                        ids = np.full((b, t), self.pad_id, np.int32)
                        ids[:, -n_img - 1:-1] = cfg.image_token_id
                        pixels = (np.zeros((b, 3, size, size), np.float32) if with_image
                                  else None)
                        if progress:
                            progress(f"compiling batch {b} x {t} tokens"
                                     f"{'' if with_image else ', text only'}"
                                     f"{', guided' if guidance is not None else ''}")
                        self._generate(ids, np.ones_like(ids), pixels, [0.0] * b,
                                       [1.0] * b, [0] * b, [1] * b, [False] * b, guidance,
                                       lambda step: None)
        if self.has_heads:
            t = self.shapes.prompt_lengths[-1] + self.shapes.max_tokens
            ids = np.full((1, t), self.pad_id, np.int32)
            ids[:, :cfg.image_seq_length] = cfg.image_token_id
            score(self.model, ids, np.zeros((1, 3, size, size), np.float32),
                  np.ones_like(ids), patches=True)
        return time.perf_counter() - t0

