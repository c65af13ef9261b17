"""Serve a checkpoint over OpenAI's chat-completions API, with grounding per token.

  python -m jaxground.serve --workdir DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]

DIR is anything `jaxground.load` reads (a converted dir or a training workdir). Prompts use
the checkpoint's evaluation protocol (jaxground.eval.protocols: llava-1.5's conversation
format for converted LLaVA checkpoints). Before it listens, the server compiles one decode
program per batch size x prompt length (--batch-sizes, --prompt-lengths), so no request
waits for a compile; requests arriving within --window-ms of each other are decoded
together. Open http://HOST:PORT/ for the grounding viewer. The API key may also come from
the environment (JAXGROUND_API_KEY).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from absl import app, flags

FLAGS = flags.FLAGS
SWITCH_INTERVAL_S = 0.0005


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Converted checkpoint dir or training workdir.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback by default).")
    flags.DEFINE_integer("port", 8000, "Port (0: any free port; the chosen one is printed).")
    flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY'.")
    flags.DEFINE_string("model_name", None, "The model id clients send (default: the "
                        "workdir's folder name).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("dtype", "", "float32 | bfloat16 | float16 (default: the checkpoint's).")
    flags.DEFINE_integer("max_tokens", 256, "Longest answer (and the default max_tokens).")
    flags.DEFINE_list("batch_sizes", ["1", "4", "8", "16"], "Compiled batch sizes.")
    flags.DEFINE_list("prompt_lengths", [], "Compiled prompt lengths in tokens, image "
                      "included (default: image + 64, image + 512 and the context minus "
                      "--max_tokens).")
    flags.DEFINE_float("window_ms", 20.0, "How long a batch may wait for more requests (it "
                       "waits for as many as the last batch had plus those queued since).")
    flags.DEFINE_float("flag_threshold", None, "Flag object words whose grounding logit is "
                       "below this (default: the run's eval.flag_threshold).")
    flags.DEFINE_string("objects", None, "COCO-format folder whose categories are the object "
                        "words flagged (default: the run's training data, else COCO's).")
    flags.DEFINE_integer("max_body_mb", 32, "Largest request body.")
    flags.DEFINE_integer("max_image_mb", 20, "Largest image.")
    flags.DEFINE_enum("warm_up", "all", ["all", "image", "none"], "Compile at start-up: "
                      "every program, those for image requests (no text-only, no guidance), "
                      "or none (compile on first use).")


def main(argv) -> None:
    del argv
    import uvicorn

    from jaxground.serve import Limits, ServeShapes, create_app, load_engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    f = FLAGS
    if not f.workdir:
        raise app.UsageError("--workdir is required")
    try:
        sizes = tuple(int(x) for x in f.batch_sizes)
        lengths = tuple(int(x) for x in f.prompt_lengths)
    except ValueError as e:
        raise app.UsageError(f"--batch_sizes and --prompt_lengths are integers: {e}") from e
    if not sizes or min(sizes) < 1 or f.max_tokens < 1:
        raise app.UsageError("--batch_sizes must be >= 1 and --max_tokens >= 1")
    shapes = ServeShapes(batch_sizes=sizes, prompt_lengths=lengths, max_tokens=f.max_tokens,
                         window_s=f.window_ms / 1000)
    engine, loaded = load_engine(f.workdir, shapes, step=f.step, dtype=f.dtype,
                                 objects=f.objects, flag_threshold=f.flag_threshold,
                                 model_name=f.model_name)
    print(f"model {loaded.model_name}: protocol {loaded.protocol}; object words from "
          f"{loaded.objects}", flush=True)
    if f.warm_up != "none":
        seconds = engine.warm_up(text_only=f.warm_up == "all", guided=f.warm_up == "all",
                                 progress=lambda m: print(m, flush=True))
        print(f"compiled in {seconds:.1f} s", flush=True)
    # The decode loop calls back into Python at every step; while HTTP work holds the GIL it
    # waits up to the switch interval (5 ms by default) each time.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    engine.start()
    api_key = f.api_key or os.environ.get("JAXGROUND_API_KEY") or None
    application = create_app(engine, loaded.model_name, api_key=api_key,
                             limits=Limits(max_tokens=f.max_tokens,
                                           max_image_bytes=f.max_image_mb << 20),
                             max_body_bytes=f.max_body_mb << 20,
                             image_aspect_ratio=loaded.image_aspect_ratio)
    # Bound here, so that the printed address is the real one (--port 0 picks a free port).
    sock = socket.socket(socket.AF_INET6 if ":" in f.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((f.host, f.port))
    host, port = sock.getsockname()[:2]
    print(f"serving {loaded.model_name} on http://{host}:{port}/", flush=True)
    server = uvicorn.Server(uvicorn.Config(application, log_level="warning"))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()


if __name__ == "__main__":
    from jaxground import cli

    cli.run(main, define_flags)
