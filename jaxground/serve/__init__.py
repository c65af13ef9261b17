"""Serving a checkpoint: an OpenAI-compatible server with grounding per token, its viewer
page, and the engine the terminal chat shares.

  engine, info = load_engine("runs/shapes")   # any model `jaxground.load` reads
  app = create_app(engine, info.model_name)   # Starlette/FastAPI app; uvicorn runs it

`python -m jaxground.serve --workdir DIR` and `python -m jaxground.chat --workdir DIR
--image FILE` are the command lines on top.
"""

from __future__ import annotations

import dataclasses
import os

from jaxground.serve.engine import Engine, ServeShapes
from jaxground.serve.messages import ChatRequest, Limits, RequestError, parse_request

__all__ = ["ChatRequest", "Engine", "Limits", "RequestError", "ServeShapes", "create_app",
           "load_engine", "parse_request"]


def create_app(*args, **kwargs):
    """`jaxground.serve.app.create_app` (imported on use: FastAPI is needed only to serve)."""
    from jaxground.serve.app import create_app as create

    return create(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Loaded:
    model_name: str
    image_aspect_ratio: str   # how the protocol fits images: "pad" | "crop"
    protocol: str             # the protocol's one-line description
    objects: str              # where the flagged object words come from


def object_source(workdir: str, objects: str | None) -> str | None:
    """The COCO-format folder whose categories are the object words (flagging, guidance):
    `objects` when given, else the run's training data (config data.dir, or the shapes world
    generated in WORKDIR/data/train); None: COCO's categories with CHAIR's synonyms."""
    from jaxground.checkpoints.workdir import read_train_config

    if objects:
        return objects
    config = read_train_config(workdir) or {}
    given = (config.get("data") or {}).get("dir")
    for candidate in (given, os.path.join(workdir, "data", "train")):
        if candidate and os.path.isdir(os.path.join(candidate, "annotations")):
            return candidate
    return None


def load_engine(workdir: str, shapes: ServeShapes = ServeShapes(), *, step: int | None = None,
                dtype: str = "", objects: str | None = None,
                flag_threshold: float | None = None, model_name: str | None = None
                ) -> tuple[Engine, Loaded]:
    """The model of a converted dir or training workdir (decoder unrolled, as evaluation
    loads it), with its evaluation protocol's prompt format and image handling, and the
    object vocabulary whose words get flagged."""
    from jaxground.data.coco import load_coco
    from jaxground.data.objects import ObjectVocabulary, token_ids, vocabulary_for
    from jaxground.eval import runner

    if not os.path.exists(workdir):
        raise FileNotFoundError(f"--workdir {workdir} does not exist")
    settings = runner.settings_for(workdir)
    if dtype:
        settings = dataclasses.replace(settings, dtype=dtype)
    model, _ = runner.load_model(workdir, settings, step)
    processor = runner.load_eval_processor(workdir, settings, model.config)
    source = object_source(workdir, objects)
    vocab = (vocabulary_for(load_coco(source).categories) if source
             else ObjectVocabulary.coco())
    words = token_ids(processor.tokenizer, vocab)
    threshold = settings.flag_threshold if flag_threshold is None else flag_threshold
    engine = Engine(model, processor, shapes, flag_tokens=words, flag_threshold=threshold,
                    guidance_tokens=words, guidance_top_k=settings.guidance_top_k)
    protocol = settings.resolved_protocol
    name = model_name or os.path.basename(os.path.normpath(workdir))
    return engine, Loaded(model_name=name, image_aspect_ratio=protocol.image_aspect_ratio,
                          protocol=protocol.describe(),
                          objects=source or "COCO categories (CHAIR synonyms)")
