"""Logit parity with HF transformers for every key layout, sharding and variant."""

import subprocess
import sys
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

import hf_tiny
import jaxground
from jaxground.hf_convert import hf_to_jaxground

REPO = __file__.rsplit("/tests/", 1)[0]


def valid(mask):
    return mask.astype(bool)


@pytest.fixture(scope="module", params=sorted(hf_tiny.VARIANTS))
def hf_model(request, tmp_path_factory):
    model = hf_tiny.build_hf(request.param, seed=zlib.crc32(request.param.encode()) % 1000)
    d = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf_tiny.save_hf(model, str(d))
    eager = LlavaForConditionalGeneration.from_pretrained(str(d), attn_implementation="eager")
    return request.param, str(d), eager.eval()


def test_logits_match_hf(hf_model, tmp_path):
    variant, hf_dir, hf = hf_model
    hf_to_jaxground(hf_dir, str(tmp_path / "jg"))
    model = jaxground.load(str(tmp_path / "jg"))
    ids, mask, px = hf_tiny.batch(hf)
    ref = hf_tiny.hf_logits(hf, ids, mask, px)
    out = model(input_ids=ids, pixel_values=px, attention_mask=mask)
    assert out.logits.shape == ref.shape
    diff = np.abs(np.asarray(out.logits) - ref)[valid(mask)]
    assert diff.max() <= 1e-4, f"{variant}: max |logit diff| {diff.max():.2e}"
    # The image tokens are where the mask says, not at the start of the sequence.
    assert not np.asarray(out.image_mask)[:, 0].any()
    assert np.asarray(out.image_mask).sum() == 3 * hf_tiny.num_image_tokens(hf)


def test_vision_hidden_states_match_hf(hf_model, tmp_path):
    variant, hf_dir, hf = hf_model
    hf_to_jaxground(hf_dir, str(tmp_path / "jg"))
    model = jaxground.load(str(tmp_path / "jg"))
    _, _, px = hf_tiny.batch(hf)
    cfg = hf.config
    layers = cfg.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else layers
    with torch.no_grad():
        hs = hf.model.vision_tower(torch.tensor(px), output_hidden_states=True).hidden_states
    ref = np.concatenate([hs[l].numpy() for l in layers], -1)
    if cfg.vision_feature_select_strategy == "default":
        ref = ref[:, 1:]
    ours = np.asarray(model.vision_hidden_states(jnp.asarray(px)))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("layout", sorted(hf_tiny.LAYOUTS))
@pytest.mark.parametrize("shards", [1, 2])
def test_every_key_layout_converts(layout, shards, tmp_path, request):
    hf = hf_tiny.build_hf("mha", seed=3)
    hf_tiny.save_hf(hf, str(tmp_path / "saved"))
    src = hf_tiny.rewrite_layout(str(tmp_path / "saved"), str(tmp_path / "src"), layout, shards)
    hf_to_jaxground(src, str(tmp_path / "jg"))
    model = jaxground.load(str(tmp_path / "jg"))
    ids, mask, px = hf_tiny.batch(hf, seed=1)
    ref = hf_tiny.hf_logits(hf.eval(), ids, mask, px)
    out = np.asarray(model(input_ids=ids, pixel_values=px, attention_mask=mask).logits)
    assert np.abs(out - ref)[valid(mask)].max() <= 1e-4


def test_cli_round_trip_to_hf(tmp_path):
    """hf_to_orbax.py -> orbax_to_hf.py -> from_pretrained gives the same logits."""
    hf = hf_tiny.build_hf("gqa_multi_full", seed=7)
    hf_tiny.save_hf(hf, str(tmp_path / "hf"))
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=REPO, capture_output=True,
                                    text=True, timeout=300)
    r = run("convert/hf_to_orbax.py", "--hf_dir", str(tmp_path / "hf"), "--out",
            str(tmp_path / "jg"))
    assert r.returncode == 0, r.stderr
    r = run("convert/orbax_to_hf.py", "--ckpt", str(tmp_path / "jg"), "--out",
            str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    back = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "back"),
                                                         attn_implementation="eager").eval()
    ids, mask, px = hf_tiny.batch(hf)
    ref = hf_tiny.hf_logits(hf.eval(), ids, mask, px)
    got = hf_tiny.hf_logits(back, ids, mask, px)
    assert np.abs(got - ref)[valid(mask)].max() <= 1e-5
    # Every original tensor came back bit for bit.
    sd, sd_back = hf.state_dict(), back.state_dict()
    assert set(sd) == set(sd_back)
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k


def test_bfloat16_argmax_agrees(tmp_path):
    # A random model's logits are near-ties everywhere; fitted briefly, its argmax is a
    # property of the model (as in a trained LLaVA), not of rounding noise.
    hf = hf_tiny.build_hf("mha", seed=11)
    ids, mask, px = hf_tiny.batch(hf)
    hf, loss = hf_tiny.fit_briefly(hf, ids, mask, px)
    assert loss < 1.0
    hf_tiny.save_hf(hf, str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "convert/hf_to_orbax.py", "--hf_dir",
                        str(tmp_path / "hf"), "--out", str(tmp_path / "bf16"), "--dtype",
                        "bfloat16"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    model = jaxground.load(str(tmp_path / "bf16"))
    leaf = model.language_model.layers.mlp.up_proj.kernel[...]
    assert leaf.dtype == jnp.bfloat16
    ref = hf_tiny.hf_logits(hf.eval(), ids, mask, px)
    out = np.asarray(model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
                     .astype(jnp.float32))
    m = valid(mask)
    agree = (out.argmax(-1) == ref.argmax(-1))[m].mean()
    assert agree >= 0.99, f"bf16 argmax agreement {agree:.3f}"


def test_load_with_dtype_override(tmp_path):
    hf = hf_tiny.build_hf("mha", seed=5)
    hf_tiny.save_hf(hf, str(tmp_path / "hf"))
    hf_to_jaxground(str(tmp_path / "hf"), str(tmp_path / "jg"))
    model = jaxground.load(str(tmp_path / "jg"), dtype="bfloat16")
    assert model.config.dtype == "bfloat16"
    assert model.projector.linear_1.kernel[...].dtype == jnp.bfloat16
