"""Bad input gets a clear error naming the problem, and writes nothing misleading."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import hf_tiny
import jaxground
from jaxground.checkpoints.hf_convert import ConversionError, hf_to_jaxground
from jaxground.models.config import ConfigError, LlavaConfig
from jaxground.checkpoints.converted import CONFIG_FILE, CheckpointError

REPO = __file__.rsplit("/tests/", 1)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    model = hf_tiny.build_hf("mha", seed=2)
    hf_tiny.save_hf(model, str(d))
    return str(d), model


def edited(saved, tmp_path, edit):
    return hf_tiny.rewrite_layout(saved[0], str(tmp_path / "src"), "hub", edit=edit)


def convert_error(src, tmp_path) -> str:
    with pytest.raises(ConversionError) as e:
        hf_to_jaxground(src, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / CONFIG_FILE)  # nothing half-written
    return str(e.value)


def test_missing_key_is_named(saved, tmp_path):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    src = edited(saved, tmp_path, lambda t: {k: v for k, v in t.items() if k != key})
    msg = convert_error(src, tmp_path)
    assert "1 missing" in msg and "language_model.layers.mlp.up_proj.kernel (layers 1)" in msg


def test_extra_key_is_named(saved, tmp_path):
    extra = "language_model.model.layers.0.self_attn.rotary_scale.weight"
    src = edited(saved, tmp_path, lambda t: {**t, extra: np.zeros(3, np.float32)})
    msg = convert_error(src, tmp_path)
    assert "1 unexpected" in msg and extra in msg


def test_layer_beyond_config_is_named(saved, tmp_path):
    def add_layer(t):
        t = dict(t)
        t["language_model.model.layers.7.input_layernorm.weight"] = np.ones(32, np.float32)
        return t
    msg = convert_error(edited(saved, tmp_path, add_layer), tmp_path)
    assert "layers.7.input_layernorm.weight (layer 7, but the config has 3 layers)" in msg


def test_wrong_shape_is_named(saved, tmp_path):
    key = "multi_modal_projector.linear_1.weight"
    src = edited(saved, tmp_path, lambda t: {**t, key: np.zeros((32, 16), np.float32)})
    msg = convert_error(src, tmp_path)
    assert f"{key}: checkpoint [32, 16], config.json implies [32, 32]" in msg


def test_missing_config_json(saved, tmp_path):
    src = edited(saved, tmp_path, None)
    os.remove(os.path.join(src, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"src/config\.json is missing"):
        hf_to_jaxground(src, str(tmp_path / "out"))


def test_pickle_refused_without_flag_then_accepted(saved, tmp_path):
    import torch

    _, model = saved
    pkl = edited(saved, tmp_path, None)  # transformers 5 no longer writes .bin itself
    tensors = hf_tiny.read_all(pkl)
    os.remove(os.path.join(pkl, "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()},
               os.path.join(pkl, "pytorch_model.bin"))
    cmd = [sys.executable, "convert/hf_to_orbax.py", "--hf_dir", str(pkl), "--out",
           str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "pickled weights" in r.stderr and "--allow-pickle" in r.stderr
    assert not os.path.exists(tmp_path / "out" / CONFIG_FILE)
    r = subprocess.run(cmd + ["--allow-pickle"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    ids, mask, px = hf_tiny.batch(model)
    ref = hf_tiny.hf_logits(model, ids, mask, px)
    out = jaxground.load(str(tmp_path / "out"))(input_ids=ids, pixel_values=px,
                                                attention_mask=mask)
    assert np.abs(np.asarray(out.logits) - ref)[mask.astype(bool)].max() <= 1e-4


def test_no_weights(tmp_path, saved):
    src = edited(saved, tmp_path, None)
    os.remove(os.path.join(src, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights in"):
        hf_to_jaxground(src, str(tmp_path / "out"))


def test_corrupt_safetensors_names_file(tmp_path, saved):
    src = edited(saved, tmp_path, None)
    with open(os.path.join(src, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors"):
        hf_to_jaxground(src, str(tmp_path / "out"))


def test_checkpoint_that_does_not_fit_config(tmp_path, saved):
    hf_to_jaxground(saved[0], str(tmp_path / "jg"))
    path = tmp_path / "jg" / CONFIG_FILE
    cfg = json.loads(path.read_text())
    cfg["text"]["intermediate_size"] = 40
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        jaxground.load(str(tmp_path / "jg"))
    assert "language_model/layers/mlp/up_proj/kernel: stored [3, 32, 56], model expects " \
           "[3, 32, 40]" in str(e.value)


def test_load_missing_dir_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxground.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="jaxground_config.json is missing"):
        jaxground.load(str(tmp_path / "empty"))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="vision_feature_layer -30 is out of range"):
        LlavaConfig(vision_feature_layer=-30)
    with pytest.raises(ConfigError, match="vision_feature_select_strategy 'cls'"):
        LlavaConfig(vision_feature_select_strategy="cls")
    with pytest.raises(ConfigError, match=r"unknown model config fields text\.\['hiden_size'\]"):
        LlavaConfig.from_dict({"text": {"hiden_size": 3}})
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        LlavaConfig.from_hf({"text_config": {"rope_parameters": {"rope_type": "yarn"}}})


def test_image_token_count_mismatch(tmp_path, saved):
    hf_to_jaxground(saved[0], str(tmp_path / "jg"))
    model = jaxground.load(str(tmp_path / "jg"))
    ids, mask, px = hf_tiny.batch(saved[1])
    with pytest.raises(ValueError, match=r"hold 48 image tokens .* 2 image\(s\) x 16 tokens"):
        model(input_ids=ids, pixel_values=px[:2], attention_mask=mask)
