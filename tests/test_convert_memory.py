"""Conversion memory: peak RSS of convert/hf_to_orbax.py stays <= 1.25x the checkpoint bytes.

The ratio asserted is the raw one: peak RSS of the whole converter process / checkpoint bytes.
The converter holds ~200 MiB before it reads a tensor (python + jax + orbax + flax imports) and
~270 MiB once jax's CPU backend is up: a fixed cost that alone is 0.45x of a 600 MiB checkpoint.
So the checkpoint here is 1536 MiB (fp32), where that cost is ~0.17x and the bound is about the
conversion: the test fails if the converter holds a second copy of any sizeable part of the
model (orbax's deep copy of host arrays, zstd write buffers, a whole-tensor read buffer of the
125 MiB embedding). The failure message also gives (peak - baseline) / checkpoint.
"""

import os
import shutil
import sys

import numpy as np
import pytest
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import convert_memory  # noqa: E402  (bench/convert_memory.py: generator + runner)

import jaxground  # noqa: E402
from jaxground.utils.trees import flatten  # noqa: E402

SIZE_MB = 1536  # MiB of fp32 weights: >= 500 MB, and big enough that the baseline is small
MAX_RATIO = convert_memory.MAX_RATIO
SPOT_CHECKS = (  # the two largest tensors (read in blocks), a stacked layer, a conv, a norm
    "language_model.model.embed_tokens.weight",
    "language_model.lm_head.weight",
    "language_model.model.layers.1.mlp.down_proj.weight",
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "language_model.model.norm.weight",
)


@pytest.mark.slow
def test_conversion_peak_rss_within_1_25x_checkpoint(tmp_path):
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "jg")
    ckpt = convert_memory.write_synthetic_checkpoint(hf_dir, SIZE_MB, seed=3)
    assert ckpt["checkpoint_bytes"] >= 500e6
    run = convert_memory.run_converter(hf_dir, out)
    s = convert_memory.summarize(ckpt["checkpoint_bytes"], run)
    print(f"conversion memory: {s}")  # shown with -rP / -s
    # The spot checks first: a converter that keeps memory down by dropping data must fail.
    params = {p: np.asarray(v) for p, v in  # numpy views: the HF-layout transposes are free
              flatten(nnx.to_pure_dict(nnx.state(jaxground.load(out), nnx.Param))).items()}
    hf = dict(convert_memory.hf_named(params))
    for key in SPOT_CHECKS:
        want = convert_memory.tensor_value(key, ckpt["keys"][key], seed=3)
        np.testing.assert_array_equal(np.asarray(hf[key]), want, err_msg=key)
    del params, hf
    shutil.rmtree(tmp_path, ignore_errors=True)  # ~2.5 GiB of files: free them now
    assert s["peak_over_checkpoint"] <= MAX_RATIO, (
        f"peak RSS / checkpoint bytes = {s['peak_over_checkpoint']:.3f} > {MAX_RATIO} "
        f"(converter peak RSS {s['peak_rss_bytes'] >> 20} MiB for a "
        f"{s['checkpoint_bytes'] >> 20} MiB checkpoint; baseline after imports "
        f"{s['start_rss_bytes'] >> 20} MiB; (peak - baseline) / checkpoint = "
        f"{s['added_over_checkpoint']:.3f})")

