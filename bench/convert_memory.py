"""Peak memory of `convert/hf_to_orbax.py` on a synthetic HF LLaVA checkpoint.

  python bench/convert_memory.py [--size_mb 600] [--dtype bfloat16] [--keep DIR]
  python bench/convert_memory.py --preset llava-1.5-7b      # the real size: 13.2 GiB fp16

Writes a random fp32 checkpoint of about `--size_mb` MiB (config.json + 2 safetensors shards
+ model.safetensors.index.json) tensor by tensor, so the writer never holds the model, then
runs the converter in a subprocess. `--preset llava-1.5-7b` writes what a user downloads
instead: llava-hf/llava-1.5-7b-hf's published config.json, its Hub key layout, fp16 values
in 3 shards (13.2 GiB; nothing downloaded), converted with --dtype bfloat16 by default.
Reports:

  checkpoint_bytes   bytes of the .safetensors files
  peak_rss           ru_maxrss of the converter process (os.wait4), and the converter's own
                     `memory:` line (its RUSAGE_SELF peak, which should agree)
  start_rss          the converter's RSS after its imports (jax, orbax, flax), before loading
  peak/ckpt          the raw ratio
  (peak-start)/ckpt  what the conversion itself adds on top of the interpreter baseline

Results go to bench/out/convert_memory.json. `tests/test_convert_memory.py` imports the
generator and the runner from here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, "bench")):  # also when imported by the tests
    if _path not in sys.path:
        sys.path.insert(0, _path)

from jaxground.utils.trees import flatten  # noqa: E402
from jaxground.checkpoints.hf_weights import hf_tensors, hub_layout  # noqa: E402
from jaxground.models.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402
from jaxground.models.llava import abstract_model, param_dict  # noqa: E402
from jaxground.checkpoints.safetensors_io import write_safetensors  # noqa: E402
from machine import cpu_info  # noqa: E402  (bench/machine.py)

MiB = 1 << 20
MAX_RATIO = 1.25  # the acceptance bound on peak RSS / checkpoint bytes
CONVERTER = os.path.join(REPO, "convert", "hf_to_orbax.py")
OUT_JSON = os.path.join(REPO, "bench", "out", "convert_memory.json")


# ---- synthetic checkpoint ---------------------------------------------------------------------
# llava-hf/llava-1.5-7b-hf's config.json as published on the Hub: most sizes are left to
# LlamaConfig's and CLIPVisionConfig's defaults, which the converter must fill in the same way.
LLAVA_1_5_7B_HF_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
PUBLISHED = {"llava-1.5-7b": LLAVA_1_5_7B_HF_CONFIG}


def synthetic_config(size_mb: float, hidden: int = 1024, vocab: int = 32064) -> LlavaConfig:
    """A LLaVA config whose fp32 parameters take at least `size_mb` MiB: a small CLIP and a
    LLaMA 1024 wide with as many decoder layers as the size needs (~49 MiB each)."""
    def make(layers: int, vocab: int) -> LlavaConfig:
        return LlavaConfig(
            vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=2,
                                num_heads=4, image_size=56, patch_size=14),
            text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2816,
                            num_layers=layers, num_heads=16, num_kv_heads=16,
                            head_dim=hidden // 16, rms_norm_eps=1e-5,
                            max_position_embeddings=1024),
            image_token_id=vocab - 1, pad_token_id=0)

    target = size_mb * MiB
    if param_bytes(make(1, vocab)) >= target:  # small sizes: shrink the vocabulary instead
        vocab = max(256, int(vocab * target / param_bytes(make(1, vocab))))
        return make(1, vocab)
    layers = 1
    while param_bytes(make(layers, vocab)) < target:
        layers += 1
    return make(layers, vocab)


def param_bytes(config: LlavaConfig) -> int:
    """fp32 bytes of every parameter the checkpoint holds (lm_head included unless tied)."""
    return sum(int(np.prod(s)) * 4 for _, s in tensor_specs(config))


def tensor_specs(config: LlavaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF Hub key, torch-layout shape) of every tensor, without allocating any data: the key
    table runs over zero-stride broadcast views of the abstract parameter shapes."""
    abstract = flatten(param_dict(abstract_model(config)))
    views = {p: np.broadcast_to(np.zeros((), np.uint8), a.shape) for p, a in abstract.items()}
    return [(k, tuple(v.shape)) for k, v in hf_named(views)]


def hf_named(flat_params: dict) -> list[tuple[str, object]]:
    """(HF Hub key, torch-layout view) of the parameters HF has (grounding heads are ours)."""
    out = []
    for path, value in flat_params.items():
        try:
            out += list(hf_tensors({path: value}, hub_layout))
        except KeyError:
            continue  # a jaxground-only parameter: not in an HF checkpoint
    return out


def tensor_value(key: str, shape: tuple[int, ...], seed: int = 0,
                 dtype=np.float32) -> np.ndarray:
    """The random value written for `key` (drawn in fp32, then cast to `dtype`):
    deterministic, so it can be re-created to check a converted checkpoint without reading
    the HF files back."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    out = rng.standard_normal(shape, dtype=np.float32)
    out *= 0.02
    return out if np.dtype(dtype) == np.float32 else out.astype(dtype)


class _LazyTensor:
    """Shape/dtype now, data on `np.asarray` (write_safetensors needs the header first and
    then makes each tensor contiguous only while it writes it)."""

    def __init__(self, key: str, shape: tuple[int, ...], seed: int, dtype=np.float32):
        self.key, self.shape, self.seed = key, shape, seed
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        out = tensor_value(self.key, self.shape, self.seed, self.dtype)
        return out if dtype is None else out.astype(dtype, copy=False)


def write_synthetic_checkpoint(hf_dir: str, size_mb: float = 600, seed: int = 0,
                               num_shards: int = 2, preset: str | None = None) -> dict:
    """Writes config.json + `num_shards` safetensors shards + index; returns a summary
    {config, checkpoint_bytes, shards, keys: {key: shape}} (one tensor in memory at a time).
    With `preset` (a key of PUBLISHED): that model's published config.json and fp16 values
    instead of a synthetic fp32 model of `size_mb`."""
    if preset:
        hf_config = PUBLISHED[preset]
        config, dtype = LlavaConfig.from_hf(hf_config), np.dtype(np.float16)
    else:
        config, dtype = synthetic_config(size_mb), np.dtype(np.float32)
        hf_config = config.to_hf()
    specs = tensor_specs(config)
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    total = sum(int(np.prod(s)) * dtype.itemsize for _, s in specs)
    groups, acc = [[] for _ in range(num_shards)], 0
    for key, shape in specs:  # contiguous split by bytes
        groups[min(num_shards - 1, acc * num_shards // total)].append((key, shape))
        acc += int(np.prod(shape)) * dtype.itemsize
    groups = [g for g in groups if g]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, group in zip(names, groups):
        write_safetensors(os.path.join(hf_dir, name),
                          [(k, _LazyTensor(k, s, seed, dtype)) for k, s in group])
        weight_map.update({k: name for k, _ in group})
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    ckpt_bytes = sum(os.path.getsize(os.path.join(hf_dir, n)) for n in names)
    return {"config": config, "checkpoint_bytes": ckpt_bytes, "shards": names,
            "keys": dict(specs), "seed": seed, "dtype": dtype}


# ---- running the converter --------------------------------------------------------------------
_MEMORY_LINE = re.compile(r"^memory: (.*)$", re.M)


def run_converter(hf_dir: str, out_dir: str, dtype: str | None = None,
                  extra_env: dict | None = None, timeout: float = 600) -> dict:
    """Runs convert/hf_to_orbax.py in a child process; returns its peak RSS (ru_maxrss from
    wait4, which counts only that child) and the fields of its `memory:` line."""
    cmd = [sys.executable, CONVERTER, "--hf_dir", hf_dir, "--out", out_dir]
    if dtype:
        cmd += ["--dtype", dtype]
    env = dict(os.environ, **(extra_env or {}))
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        seconds = time.time() - t0
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-4000:]}")
    m = _MEMORY_LINE.search(output)
    if not m:
        raise RuntimeError(f"no 'memory:' line in the converter output:\n{output[-4000:]}")
    fields = {k: float(v) if "." in v else int(v)
              for k, v in (kv.split("=") for kv in m.group(1).split())}
    return {"seconds": seconds, "child_peak_rss_bytes": usage.ru_maxrss * 1024,
            "reported": fields, "output": output}


def summarize(ckpt_bytes: int, run: dict) -> dict:
    peak = run["child_peak_rss_bytes"]
    start = run["reported"]["start_rss_bytes"]
    return {"checkpoint_bytes": ckpt_bytes, "peak_rss_bytes": peak, "start_rss_bytes": start,
            "reported_peak_rss_bytes": run["reported"]["peak_rss_bytes"],
            "peak_over_checkpoint": peak / ckpt_bytes,
            "added_over_checkpoint": (peak - start) / ckpt_bytes,
            "convert_seconds": round(run["seconds"], 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size_mb", type=float, default=600,
                        help="synthetic checkpoint size in MiB (fp32; rounded up by layers)")
    parser.add_argument("--preset", choices=sorted(PUBLISHED), default=None,
                        help="the real model: its published config.json and key layout, "
                             "fp16 values in 3 shards (ignores --size_mb)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], action="append",
                        help="converter --dtype; repeat to run several (default: float32, "
                             "then bfloat16; with --preset: bfloat16)")
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="write into DIR and keep it (default: a temp dir, removed)")
    parser.add_argument("--json", default=None, help="where to write the results (default "
                        "bench/out/convert_memory[_PRESET].json)")
    args = parser.parse_args(argv)
    dtypes = args.dtype or (["bfloat16"] if args.preset else ["float32", "bfloat16"])
    json_path = args.json or (OUT_JSON.replace(".json", f"_{args.preset}.json") if args.preset
                              else OUT_JSON)
    cpu, simd = cpu_info()
    print(f"cpu: {cpu} ({', '.join(simd) or 'no avx2'}), {os.cpu_count()} cpus")
    work = args.keep or tempfile.mkdtemp(prefix="convert_memory_")
    try:
        hf_dir = os.path.join(work, "hf")
        t0 = time.time()
        ckpt = write_synthetic_checkpoint(hf_dir, args.size_mb, preset=args.preset,
                                          num_shards=3 if args.preset else 2)
        t = ckpt["config"].text
        print(f"{args.preset or 'synthetic'} checkpoint: {ckpt['checkpoint_bytes'] / MiB:.1f} "
              f"MiB ({ckpt['checkpoint_bytes'] / 2**30:.2f} GiB, {ckpt['dtype']}) in "
              f"{len(ckpt['shards'])} shards, LLaMA {t.num_layers}x{t.hidden_size} vocab "
              f"{t.vocab_size}, written in {time.time() - t0:.1f}s")
        results = {"cpu": cpu, "preset": args.preset, "size_mb": args.size_mb,
                   "checkpoint_bytes": ckpt["checkpoint_bytes"],
                   "checkpoint_dtype": str(ckpt["dtype"]), "text_layers": t.num_layers,
                   "runs": {}}
        for dtype in dtypes:
            out = os.path.join(work, f"out_{dtype}")
            run = run_converter(hf_dir, out, None if dtype == "float32" else dtype)
            s = summarize(ckpt["checkpoint_bytes"], run)
            results["runs"][dtype] = s
            print(f"[{dtype}] converted in {s['convert_seconds']:.1f}s: "
                  f"peak RSS {s['peak_rss_bytes'] / MiB:.0f} MiB (converter says "
                  f"{s['reported_peak_rss_bytes'] / MiB:.0f}), baseline after imports "
                  f"{s['start_rss_bytes'] / MiB:.0f} MiB")
            print(f"[{dtype}]   peak / checkpoint            = {s['peak_over_checkpoint']:.3f}")
            print(f"[{dtype}]   (peak - baseline) / checkpoint = "
                  f"{s['added_over_checkpoint']:.3f}")
            print(f"[{dtype}]   requirement peak / checkpoint <= {MAX_RATIO}: "
                  f"{'met' if s['peak_over_checkpoint'] <= MAX_RATIO else 'NOT met'}")
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {json_path}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
