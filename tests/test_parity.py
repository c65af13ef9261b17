"""Logit parity with HF transformers for every key layout, sharding and variant."""

import dataclasses
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

import hf_tiny
import jaxground
from jaxground.checkpoints import converted
from jaxground.checkpoints.hf_convert import hf_to_jaxground

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


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_cli_round_trip_to_hf(tmp_path):
    """hf_to_orbax.py -> orbax_to_hf.py -> from_pretrained gives the same logits; the heads
    (which HF's format lacks) travel in grounding_heads.safetensors beside the HF weights,
    and converting that dir back restores their parameters and config exactly."""
    hf = hf_tiny.build_hf("gqa_multi_full", seed=7)
    hf_tiny.save_hf(hf, str(tmp_path / "hf"))
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=REPO, capture_output=True,
                                    text=True, timeout=300)
    r = run("convert/hf_to_orbax.py", "--hf_dir", str(tmp_path / "hf"), "--out",
            str(tmp_path / "jg"), "--grounding_type", "cross_attention",
            "--grounding_layers", "0,2")
    assert r.returncode == 0, r.stderr
    # Non-default heads: a config beyond what the CLI sets, and random non-zero parameters
    # (the tanh gate too, 0 at init) that fresh heads would not reproduce.
    config = converted.read_config(str(tmp_path / "jg"))
    assert config.grounding.type == "cross_attention" and list(config.grounded_layers) == [0, 2]
    config = config.replace(grounding=dataclasses.replace(
        config.grounding, num_heads=4, aggregate="max", image_features="hidden",
        init_scale=3.0, init_bias=-0.5))
    params = converted.restore_params(str(tmp_path / "jg"), config)
    rng = np.random.default_rng(0)
    heads = jax.tree.map(lambda a: (rng.standard_normal(a.shape) + 0.5).astype(a.dtype),
                         params["language_model"]["grounding_heads"])
    flat_heads = flat(heads)
    assert {"['gate']", "['q_proj']['kernel']"} <= set(flat_heads)
    assert all(np.all(v != 0) for v in flat_heads.values())
    params["language_model"]["grounding_heads"] = heads
    converted.save_params(str(tmp_path / "jg"), config, params)

    r = run("convert/orbax_to_hf.py", "--ckpt", str(tmp_path / "jg"), "--out",
            str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    assert "grounding_heads.safetensors" in r.stdout
    assert os.path.isfile(tmp_path / "back" / "grounding_heads.safetensors")
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

    # And back to jaxground with no grounding options: the side file's heads and config.
    again = hf_to_jaxground(str(tmp_path / "back"), str(tmp_path / "jg_again"))
    assert again.grounding == config.grounding
    assert converted.read_config(str(tmp_path / "jg_again")).grounding == config.grounding
    restored = converted.restore_params(str(tmp_path / "jg_again"), again)
    flat_back = flat(restored["language_model"]["grounding_heads"])
    assert set(flat_back) == set(flat_heads)
    for k, v in flat_heads.items():
        assert flat_back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(flat_back[k], v, err_msg=k)


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
