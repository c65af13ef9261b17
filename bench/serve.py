"""Serving throughput and latency: 1, 4 and 16 concurrent clients against the same requests
sent one at a time, through the real HTTP server and the official `openai` client.

  .venv/bin/python bench/serve.py [--workdir DIR] [--requests 48] [--max-tokens 32]

Every request asks for exactly --max-tokens tokens (the `ignore_eos` extension), greedy, about
one of the held-out images, so that throughput compares like with like. Sequential: one
client, one request at a time. C concurrent: C clients, each sending its share one after
another. Prints requests/s, new tokens/s, p50/p95 latency per setting and the throughput of
16 clients over sequential (target >= 4x), with the CPU model. Without --workdir it trains
the shapes model (the tests' brief run) into bench/out/serve_model first.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from machine import cpu_info  # noqa: E402


def trained_model(out: str) -> str:
    if not os.path.exists(os.path.join(out, "checkpoints")):
        from serving import TRAIN_FLAGS

        subprocess.run([sys.executable, "-m", "jaxground.train", "--config",
                        "configs/shapes.py", "--workdir", out, *TRAIN_FLAGS], cwd=REPO,
                       check=True)
    return out


def run_clients(client, name: str, bodies: list[dict], clients: int) -> dict:
    """Sends `bodies` from `clients` threads; returns throughput and latency figures."""
    latencies, tokens = [], []

    def one(body):
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model=name, **body)
        latencies.append(time.perf_counter() - t0)
        tokens.append(reply.usage.completion_tokens)
        return reply.choices[0].message.content

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, bodies))
    seconds = time.perf_counter() - t0
    lat = np.asarray(latencies)
    return {"clients": clients, "requests": len(bodies), "seconds": seconds,
            "requests_per_s": len(bodies) / seconds, "tokens_per_s": sum(tokens) / seconds,
            "p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "p95_ms": 1e3 * float(np.percentile(lat, 95)), "answers": answers}


def health(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + "/health") as r:
        return json.load(r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="model to serve (default: train the shapes model)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--window-ms", type=float, default=20.0)
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "serve.json"))
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from serving import data_url, user

    import openai

    workdir = args.workdir or trained_model(os.path.join(HERE, "out", "serve_model"))
    pictures = [data_url(p) for p in sorted(glob.glob(
        os.path.join(workdir, "data", "heldout", "images", "*")))] or [None]
    bodies = [dict(messages=[user("Describe the image.", pictures[i % len(pictures)])],
                   max_tokens=args.max_tokens, temperature=0,
                   extra_body={"ignore_eos": True}) for i in range(args.requests)]
    model, flags = cpu_info()
    print(f"CPU: {model} ({', '.join(flags)}), {os.cpu_count()} CPUs")
    # The server as users run it: its own process (the clients' threads do not share its GIL).
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "jaxground.serve", "--workdir", workdir, "--port", "0",
         "--max_tokens", str(args.max_tokens), "--batch_sizes", args.batch_sizes,
         "--window_ms", str(args.window_ms), "--warm_up", "image"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in server.stdout:
            if line.startswith(("model ", "compiled")):
                print(line.strip())
            if line.startswith("serving "):
                url = line.split(" on ")[1].strip().rstrip("/")
                break
        if url is None:
            raise SystemExit("the server did not start")
        print(f"loaded and compiled in {time.perf_counter() - t0:.1f} s")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        name = client.models.list().data[0].id
        run_clients(client, name, bodies[:4], 1)  # warm the path
        results = []
        for c in (1, 4, 16):
            before = health(url)
            results.append(run_clients(client, name, bodies, c))
            after = health(url)
            results[-1]["rows_per_batch"] = ((after["rows"] - before["rows"])
                                             / max(after["batches"] - before["batches"], 1))
            results[-1]["engine_busy"] = ((after["busy_s"] - before["busy_s"])
                                          / results[-1]["seconds"])
    finally:
        server.terminate()
        server.wait(timeout=60)
    base = results[0]
    print(f"{args.requests} requests of {args.max_tokens} new tokens each (window "
          f"{args.window_ms:g} ms, compiled batch sizes {args.batch_sizes}):")
    print(f"{'clients':>8} {'req/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'vs sequential':>14} {'same answers':>13} {'rows/batch':>11} {'decoding':>9}")
    for r in results:
        same = r["answers"] == base["answers"]
        print(f"{r['clients']:>8} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['p50_ms']:>8.0f} {r['p95_ms']:>8.0f} "
              f"{r['requests_per_s'] / base['requests_per_s']:>13.2f}x {str(same):>13} "
              f"{r['rows_per_batch']:>11.1f} {r['engine_busy']:>9.0%}")
    ratio = results[-1]["requests_per_s"] / base["requests_per_s"]
    print(f"16 concurrent clients / sequential: {ratio:.2f}x (target >= 4x: "
          f"{'met' if ratio >= 4 else 'not met'})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"cpu": model, "features": flags, "args": vars(args),
                   "results": [{k: v for k, v in r.items() if k != "answers"}
                               for r in results]}, f, indent=1)


if __name__ == "__main__":
    main()
