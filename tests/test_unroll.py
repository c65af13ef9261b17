"""The unrolled decoder layout (`LlamaModel.unroll`): the same numbers as the stacked one."""

import gc

import jax
import numpy as np
import pytest
from flax import nnx

import hf_tiny
import jaxground
from test_generate import hf_generate, teacher_forced, with_heads

NEW = 10


def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


@pytest.mark.parametrize("grounding", [
    dict(type="similarity"),
    dict(type="learned", dim=16, layers=(1, 2), aggregate="max"),
    dict(type="cross_attention", num_heads=2, image_features="hidden"),
], ids=["similarity", "learned", "cross_attention"])
def test_unrolled_model_gives_the_stacked_results(tmp_path, grounding):
    hf_dir = str(tmp_path / "hf")
    hf = hf_tiny.build_hf("bias_theta", seed=8)
    hf_tiny.save_hf(hf, hf_dir)
    model = with_heads(hf_dir, tmp_path, **grounding)
    ids, mask, px = hf_tiny.batch(hf)
    runs = dict(greedy={})
    if grounding["type"] == "cross_attention":  # the other decode paths, once (CI time)
        runs.update(guided=dict(guidance=1.0, guidance_top_k=3), vcd=dict(contrast="vcd"))
    generate = lambda kw: jaxground.generate(model, ids, px, attention_mask=mask,
                                             max_new_tokens=NEW, **kw)
    stacked = {name: generate(kw) for name, kw in runs.items()}
    logits = np.asarray(model(ids, px, mask).logits)

    before = live_bytes()
    lm = model.language_model
    layer_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(lm.layers)))
    lm.unroll()
    assert lm.unrolled and len(lm.layers) == lm.config.num_layers
    assert len(lm.grounding_heads) == len(lm.grounded_layers)
    q = lm.layers[0].self_attn.q_proj.kernel[...]
    assert q.shape == (lm.config.hidden_size, lm.config.num_heads * lm.config.head_dim)
    # Stacked buffers are released, not kept beside their slices (collected: under xdist a
    # reference cycle elsewhere in the process sometimes holds the old module until then).
    gc.collect()
    assert abs(live_bytes() - before) <= 0.01 * layer_bytes

    np.testing.assert_allclose(np.asarray(model(ids, px, mask).logits), logits, atol=1e-5)
    unrolled = {name: generate(kw) for name, kw in runs.items()}
    for name, out in unrolled.items():
        ref = stacked[name]
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs),
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.grounding), np.asarray(ref.grounding),
                                   atol=1e-5)
    # The per-layer cache decodes what teacher forcing scores.
    gen = unrolled["greedy"]
    scores, t = teacher_forced(model, ids, mask, px, gen)
    np.testing.assert_allclose(np.asarray(gen.grounding), np.asarray(scores.grounding)[:, t:],
                               atol=1e-5)
    if grounding["type"] != "cross_attention":  # an open gate changes the LLM's outputs
        np.testing.assert_array_equal(np.asarray(gen.tokens),
                                      hf_generate(hf, ids, mask, px, new=NEW))


def test_unroll_twice_is_a_no_op(tmp_path):
    hf_dir = str(tmp_path / "hf")
    hf_tiny.save_hf(hf_tiny.build_hf("mha", seed=3), hf_dir)
    model = with_heads(hf_dir, tmp_path, type="similarity")
    model.language_model.unroll()
    layers = model.language_model.layers
    model.language_model.unroll()
    assert model.language_model.layers is layers
