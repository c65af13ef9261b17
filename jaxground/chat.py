"""Chat with a checkpoint about an image in the terminal, poorly grounded words highlighted.

  python -m jaxground.chat --workdir DIR --image FILE [--temperature 0.2] [--max_tokens 256]

Like LLaVA's CLI (`llava.serve.cli`): the image goes with the first question, every answer
streams in as it is generated, and the conversation carries on until an empty line, `exit`
or end of input. Object words whose grounding logit is below the threshold (the run's
eval.flag_threshold, or --flag_threshold) are printed in red and underlined; colours are on
when the output is a terminal (--color always|never overrides). The prompt format is the
checkpoint's evaluation protocol, as the server's.
"""

from __future__ import annotations

import queue
import sys

from absl import app, flags

FLAGS = flags.FLAGS
FLAGGED = "\x1b[1;4;31m"   # bold, underlined, red
RESET = "\x1b[0m"


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Converted checkpoint dir or training workdir.")
    flags.DEFINE_string("image", None, "The image to talk about (none: text only).")
    flags.DEFINE_float("temperature", 0.2, "0 is greedy (LLaVA's CLI uses 0.2).")
    flags.DEFINE_integer("max_tokens", 256, "Longest answer.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_float("flag_threshold", None, "Highlight object words whose grounding logit "
                       "is below this (default: the run's eval.flag_threshold).")
    flags.DEFINE_float("guidance", None, "Grounding-guided decoding with this alpha.")
    flags.DEFINE_string("objects", None, "COCO-format folder naming the object words "
                        "(default: the run's training data, else COCO's categories).")
    flags.DEFINE_string("dtype", "", "float32 | bfloat16 | float16 (default: the checkpoint's).")
    flags.DEFINE_enum("color", "auto", ["auto", "always", "never"], "ANSI colours.")


def main(argv) -> None:
    del argv
    from jaxground.data.processor import open_image
    from jaxground.serve import ChatRequest, RequestError, ServeShapes, load_engine
    from jaxground.serve.engine import Failed, Finished, TokenEvent

    f = FLAGS
    if not f.workdir:
        raise app.UsageError("--workdir is required")
    image = open_image(f.image) if f.image else None
    colour = f.color == "always" or (f.color == "auto" and sys.stdout.isatty())
    engine, loaded = load_engine(f.workdir, ServeShapes(batch_sizes=(1,), max_tokens=f.max_tokens,
                                                        window_s=0.0),
                                 dtype=f.dtype, objects=f.objects,
                                 flag_threshold=f.flag_threshold)
    engine.start()
    print(f"{loaded.model_name} ({loaded.protocol}). Empty line or 'exit' to quit.",
          flush=True)
    turns: list[tuple[str, str]] = []
    try:
        while True:
            try:
                question = input("USER: ").strip()
            except EOFError:
                break
            if not question or question == "exit":
                break
            request = ChatRequest(turns=turns + [(question, "")],
                                  image=image, max_tokens=f.max_tokens, stream=True,
                                  temperature=f.temperature, seed=f.seed, guidance=f.guidance)
            events: queue.Queue = queue.Queue()
            try:
                engine.submit(request, events.put)
            except RequestError as e:
                print(f"error: {e.message}", flush=True)
                continue
            print("ASSISTANT:", end="", flush=True)
            answer, flagged = "", 0
            while True:
                event = events.get()
                if isinstance(event, Failed):
                    print(f"\nerror: {event.message}", flush=True)
                    break
                text = event.text
                answer += text
                if isinstance(event, TokenEvent) and event.flagged and text.strip():
                    flagged += 1
                    lead = text[:len(text) - len(text.lstrip())]
                    text = (f"{lead}{FLAGGED}{text.lstrip()}{RESET}" if colour
                            else f"{lead}[{text.lstrip()}?]")
                print(text, end="", flush=True)
                if isinstance(event, Finished):
                    break
            print(flush=True)
            if flagged:
                mark = f"{FLAGGED}red{RESET}" if colour else "[word?]"
                print(f"({flagged} word{'s' if flagged > 1 else ''} in {mark}: the image does "
                      f"not support {'them' if flagged > 1 else 'it'} well)", flush=True)
            turns.append((question, answer.strip()))
    finally:
        engine.stop()


if __name__ == "__main__":
    from jaxground import cli

    cli.run(main, define_flags)
