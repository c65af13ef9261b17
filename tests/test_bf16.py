"""A bf16 model computes with its bf16 weights: no fp32 copies in the compiled programs.

XLA's memory analysis of a compiled program is deterministic, so this is a test, not a
benchmark. The programs are compiled on abstract arrays (nothing allocated, a few seconds
each, the 7B included: its layers are one scan). Before jaxground/models/ops.py, the mid
config's bf16 forward held 193 MiB of temporaries for 133 MiB of weights (an fp32 copy of
every weight), and a converted llava-1.5-7b asked for 27.8 GB on its first forward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxground.inference.generate import lower_generate
from jaxground.models import config as model_config
from jaxground.models.cache import KVCache
from jaxground.models.grounding import DecodeGrounding
from jaxground.models.llava import _forward_jit, abstract_model
from jaxground.models.ops import model_jit

TEXT_TOKENS = 24  # one image + a short question, as in the 7B bench
CACHE = 640       # decode-step cache positions: a 7B prompt (576 image tokens) and its answer
PRESETS = {"mid": model_config.mid, "llava-1.5-7b": model_config.llava_1_5_7b}


def _bf16(preset: str):
    cfg = PRESETS[preset]().replace(dtype="bfloat16", param_dtype="bfloat16")
    model = abstract_model(cfg)
    param_bytes = sum(np.prod(x.shape) * x.dtype.itemsize
                      for x in jax.tree.leaves(model) if hasattr(x, "dtype"))
    return cfg, model, param_bytes


def _prompt(cfg, batch: int):
    ids = np.full((batch, TEXT_TOKENS + cfg.image_seq_length), 7, np.int32)
    ids[:, 0] = cfg.bos_token_id or 1
    ids[:, 5:5 + cfg.image_seq_length] = cfg.image_token_id
    size = cfg.vision.image_size
    return ids, jnp.zeros((batch, 3, size, size), jnp.bfloat16)


def _temporaries(lowered) -> int:
    return lowered.compile().memory_analysis().temp_size_in_bytes


def _report(what: str, temp: int, param_bytes: int) -> None:
    print(f"{what}: {temp / 2**20:.1f} MiB temporaries for {param_bytes / 2**20:.0f} MiB of "
          f"weights ({temp / param_bytes:.1%})")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_bf16_forward_temporaries_are_under_a_tenth_of_the_weights(preset):
    cfg, model, param_bytes = _bf16(preset)
    ids, pixels = _prompt(cfg, batch=1)
    temp = _temporaries(_forward_jit.lower(model, jnp.asarray(ids), pixels,
                                           jnp.ones_like(ids), None))
    _report(f"{preset} bf16 forward", temp, param_bytes)
    assert temp <= 0.10 * param_bytes, (temp, param_bytes)


@model_jit
def _decode_step(model, tokens_bc, positions_b, cache, ground):
    return model.decode_step(tokens_bc, positions_b, cache, ground)


@pytest.mark.parametrize("batch", [1, 8])
def test_bf16_decode_step_temporaries_are_under_a_tenth_of_the_weights(batch):
    """One llava-1.5-7b decode step (the cache is an argument here)."""
    cfg, model, param_bytes = _bf16("llava-1.5-7b")
    t, d, sds = cfg.text, cfg.text.hidden_size, jax.ShapeDtypeStruct
    cache = KVCache(*(sds((t.num_layers, batch, t.num_kv_heads, CACHE, t.head_dim),
                          jnp.bfloat16) for _ in "kv"), sds((batch, CACHE), bool))
    ground = DecodeGrounding(sds((len(cfg.grounded_layers), batch, cfg.image_seq_length, d),
                                 jnp.bfloat16),
                             sds((batch, cfg.image_seq_length), bool), sds((batch,), bool))
    temp = _temporaries(_decode_step.lower(model, sds((batch, 1), jnp.int32),
                                           sds((batch,), jnp.int32), cache, ground))
    _report(f"llava-1.5-7b bf16 decode step, batch {batch}", temp, param_bytes)
    assert temp <= 0.10 * param_bytes, (temp, param_bytes)


@pytest.mark.parametrize("layout", ["stacked", "unrolled"])
def test_bf16_generate_temporaries_are_under_a_tenth_of_the_weights(layout):
    """Prefill and the decode loop in one llava-1.5-7b program, batch 1 (the KV cache is
    among the temporaries here), in both decoder layouts."""
    cfg, model, param_bytes = _bf16("llava-1.5-7b")
    if layout == "unrolled":
        model.language_model.unroll()
    ids, pixels = _prompt(cfg, 1)
    temp = _temporaries(lower_generate(model, ids, pixels, max_new_tokens=32))
    _report(f"llava-1.5-7b bf16 generate, batch 1, {layout}", temp, param_bytes)
    assert temp <= 0.10 * param_bytes, (temp, param_bytes)


def test_int8_generate_keeps_no_dequantized_copies():
    """A llava-1.5-7b with int8 LLM linears (bf16 elsewhere), generate at batch 1 in the
    layout evaluation decodes it in (stacked, `decode_layout`): each layer's kernels are
    dequantized inside the loop, so temporaries stay under 15% of the weights' bytes, the
    KV cache included (unrolled, XLA hoisted a 16-bit copy of every quantized kernel out of
    the decode loop: 13.0 GiB for 7.1 GiB of weights)."""
    from jaxground.eval.runner import decode_layout
    from jaxground.models.config import QuantConfig

    cfg = model_config.llava_1_5_7b().replace(dtype="bfloat16", param_dtype="bfloat16",
                                              quant=QuantConfig(mode="int8"))
    assert decode_layout(cfg) == "stacked"
    model = abstract_model(cfg)
    weight_bytes = sum(np.prod(x.shape) * x.dtype.itemsize
                       for x in jax.tree.leaves(model) if hasattr(x, "dtype"))
    ids, pixels = _prompt(cfg, 1)
    temp = _temporaries(lower_generate(model, ids, pixels, max_new_tokens=32))
    _report("llava-1.5-7b int8 generate, batch 1, stacked", temp, weight_bytes)
    assert temp <= 0.15 * weight_bytes, (temp, weight_bytes)
