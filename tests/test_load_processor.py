"""The processor travels with the converted checkpoint and feeds the model directly."""

import numpy as np
import pytest
from PIL import Image

import hf_tiny
import jaxground
from jaxground.checkpoints.hf_convert import hf_to_jaxground


def test_processor_from_converted_dir_drives_the_model(tmp_path):
    hf = hf_tiny.build_hf("mha", seed=4)
    hf_tiny.save_hf(hf, str(tmp_path / "hf"))
    hf_tiny.make_processor(hf).save_pretrained(str(tmp_path / "hf"))
    hf_to_jaxground(str(tmp_path / "hf"), str(tmp_path / "jg"))

    proc = jaxground.load_processor(str(tmp_path / "jg"))
    model = jaxground.load(str(tmp_path / "jg"))
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (40, 60, 3), np.uint8)),
              Image.fromarray(rng.randint(0, 255, (33, 33, 3), np.uint8))]
    prompts = ["user : <image> \n what is in the image ? assistant :",
               "user : what is <image> red ? assistant :"]
    batch = proc(text=prompts, images=images, return_tensors="np", padding=True)
    ids, mask, px = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    assert px.shape == (2, 3, 28, 28)
    assert (ids == hf_tiny.IMAGE_TOKEN).sum(1).tolist() == [16, 16]
    assert mask[1, 0] == 0  # the shorter prompt is left-padded
    ref = hf_tiny.hf_logits(hf, ids, mask, px)
    out = model(input_ids=ids, pixel_values=px, attention_mask=mask)
    assert np.abs(np.asarray(out.logits) - ref)[mask.astype(bool)].max() <= 1e-4


def test_processor_without_tokenizer_is_a_clear_error(tmp_path):
    hf = hf_tiny.build_hf("mha", seed=4)
    hf_tiny.save_hf(hf, str(tmp_path / "hf"))
    hf_to_jaxground(str(tmp_path / "hf"), str(tmp_path / "jg"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        jaxground.load_processor(str(tmp_path / "jg"))
