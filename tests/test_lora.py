"""LoRA adapters, int8 / NF4 frozen weights and per-group learning rates: exact zero-init,
what a LoRA step may change, exact resume of a LoRA + int8 run, checkpoints without the
base, quantization error on a trained model, and the config mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxground
from jaxground.checkpoints.converted import read_config, save_params
from jaxground.checkpoints.restore import restore_model
from jaxground.inference.batching import left_pad
from jaxground.models.adapters import fresh_lora, merge_lora, quantize_params
from jaxground.models.config import ConfigError, LoraConfig, QuantConfig, tiny
from jaxground.models.llava import init_model, param_dict
from jaxground.models.quant import NF4_VALUES, dequantize, quantize
from jaxground.training.config import ConfigValueError, TrainRun, train_config_dict
from jaxground.training.optim import make_optimizer
from jaxground.utils.trees import flatten
from serving import REPO, images, shared_workdir

LORA = LoraConfig(enabled=True, rank=4, alpha=8.0)


def tiny_inputs(config, rows: int = 2, seed: int = 0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, config.text.vocab_size - 2, (rows, 12 + config.image_seq_length))
    ids[:, 3:3 + config.image_seq_length] = config.image_token_id
    px = rng.randn(rows, 3, config.vision.image_size, config.vision.image_size)
    return ids, px.astype(np.float32)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A converted dir holding a random tiny model (the base a LoRA model starts from)."""
    config = tiny()
    out = str(tmp_path_factory.mktemp("tiny_base"))
    save_params(out, config, param_dict(init_model(config, seed=3)))
    return out


def logits(model, config, seed=0):
    ids, px = tiny_inputs(config, seed=seed)
    return np.asarray(model(input_ids=ids, pixel_values=px).logits)


# ---- building blocks -------------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_fresh_adapters_leave_the_logits_exactly_unchanged(tiny_base, quant):
    base_config = read_config(tiny_base).replace(quant=QuantConfig(mode=quant))
    base = restore_model(tiny_base, config=base_config)
    adapted = restore_model(tiny_base, config=base_config.replace(lora=LORA), seed=5)
    leaves = flatten(nnx.to_pure_dict(nnx.state(adapted)))
    adapters = {k: v for k, v in leaves.items() if k[-1].startswith("lora_")}
    assert len(adapters) == 2 * 7  # A and B of q, k, v, o, gate, up, down (stacked)
    assert all(np.abs(np.asarray(v)).max() > 0 for k, v in adapters.items() if k[-1] == "lora_a")
    np.testing.assert_array_equal(logits(adapted, base_config), logits(base, base_config))


def test_adapters_change_the_output_by_scale_x_A_B_and_merge_exactly(tiny_base):
    """A non-zero adapter: the LoRA model equals the model with W + (alpha / r) A B."""
    config = read_config(tiny_base).replace(lora=LORA)
    params = jax.tree.map(np.array, param_dict(restore_model(tiny_base, config=config)))
    rng = np.random.RandomState(0)
    for path, leaf in flatten(params).items():
        if path[-1] == "lora_b":
            leaf[...] = rng.randn(*leaf.shape) * 0.05
    model = init_model(config)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    adapted = nnx.merge(graphdef, state)
    merged_params = merge_lora(jax.tree.map(jnp.asarray, params), config.lora)
    assert not any(k[-1].startswith("lora_") for k in flatten(merged_params))
    plain = init_model(config.base)
    graphdef, state = nnx.split(plain)
    nnx.replace_by_pure_dict(state, merged_params)
    plain = nnx.merge(graphdef, state)
    got, want = logits(adapted, config), logits(plain, config)
    assert np.abs(got - logits(restore_model(tiny_base), config)).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("mode,bits_error", [("int8", 1 / 254), ("nf4", 0.17)])
def test_quantize_round_trip_error_and_layout(mode, bits_error):
    """Each weight comes back within half a step of its group's grid; nf4 codes are the
    nearest NF4 value (checked against a brute-force argmin); groups are per column."""
    rng = np.random.RandomState(0)
    w = rng.randn(2, 128, 24).astype(np.float32)
    w[1, :, 3] = 0.0  # an all-zero column stays zero (no division by zero)
    codes, scale = quantize(jnp.asarray(w), mode, 64)
    assert scale.shape == (2, 2, 24)
    assert codes.shape == ((2, 128, 24) if mode == "int8" else (2, 64, 24))
    back = np.asarray(dequantize(codes, scale, mode, jnp.float32))
    absmax = np.abs(w.reshape(2, 2, 64, 24)).max(axis=2, keepdims=True)
    err = np.abs(back - w).reshape(2, 2, 64, 24) / np.where(absmax == 0, 1, absmax)
    assert err.max() <= bits_error + 1e-6
    assert np.all(back[1, :, 3] == 0)
    if mode == "nf4":
        normalized = w.reshape(2, 2, 64, 24) / np.where(absmax == 0, 1, absmax)
        nearest = NF4_VALUES[np.abs(normalized[..., None] - NF4_VALUES).argmin(-1)]
        np.testing.assert_allclose(back.reshape(2, 2, 64, 24) / np.where(absmax == 0, 1, absmax),
                                   nearest, atol=1e-6)


def test_lr_groups_equal_separate_adamw_rates():
    """`lr_groups` = AdamW at the group's own rate (same schedule, same decay)."""
    params = {"projector": {"w": jnp.ones((3, 2))}, "lora": {"a": jnp.full((2,), 2.0)}}
    grads = {"projector": {"w": jnp.arange(6.0).reshape(3, 2)}, "lora": {"a": jnp.array([1., -3.])}}
    run = TrainRun.from_config_dict({"train": {"lr": 1e-2, "warmup_steps": 0, "steps": 10,
                                               "weight_decay": 0.1,
                                               "lr_groups": "projector=2e-3"}})
    tx, _ = make_optimizer(run.train)
    state, p = tx.init(params), params
    for _ in range(3):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    for name, lr in (("projector", 2e-3), ("lora", 1e-2)):
        single = TrainRun.from_config_dict({"train": {"lr": lr, "warmup_steps": 0, "steps": 10,
                                                      "weight_decay": 0.1}})
        ref_tx, _ = make_optimizer(single.train)
        ref_state, ref = ref_tx.init(params[name]), params[name]
        for _ in range(3):
            updates, ref_state = ref_tx.update(grads[name], ref_state, ref)
            ref = optax.apply_updates(ref, updates)
        for k in ref:
            np.testing.assert_allclose(p[name][k], ref[k], rtol=1e-6)


# ---- config mistakes -------------------------------------------------------------------------
def run_config(**model):
    cfg = train_config_dict().to_dict()
    cfg["model"].update(model)
    return cfg


@pytest.mark.parametrize("model,train,field", [
    ({"init_from": "/base", "lora": {"enabled": True, "rank": 0}}, {}, "config.model.lora.rank"),
    ({"init_from": "/base", "lora": {"enabled": True, "rnak": 4}}, {}, "config.model.lora.rnak"),
    ({"lora": {"enabled": True}}, {}, "config.model.init_from"),
    ({"init_from": "/base", "quant": "int4"}, {}, "config.model.quant"),
    ({"init_from": "/base", "quant": "nf4", "quant_group_size": 3}, {},
     "config.model.quant_group_size"),
    ({}, {"lr_groups": "projector:2e-5"}, "config.train.lr_groups"),
])
def test_config_mistakes_name_the_field(model, train, field):
    cfg = run_config(**model)
    cfg["train"].update(train)
    with pytest.raises(ConfigValueError, match=field.replace(".", r"\.")):
        TrainRun.from_config_dict(cfg)


def test_targets_that_match_nothing_and_trainable_quantized_weights_are_refused(tiny_base):
    config = read_config(tiny_base)
    with pytest.raises(ConfigError, match=r"lora\.targets='q_prj'.*matches no linear layer"):
        init_model(config.replace(lora=LoraConfig(enabled=True, targets="q_prj")))
    with pytest.raises(ConfigError, match=r"quant\.targets"):
        init_model(config.replace(quant=QuantConfig(mode="int8", targets="nothing")))
    from jaxground.training.setup import check_trainable

    model = init_model(config.replace(lora=LORA, quant=QuantConfig(mode="int8")))
    for trainable, message in ((".*", r"config\.train\.trainable='\.\*' selects the kernels"),
                               ("projector", r"trains none of the LoRA adapters")):
        cfg = run_config(init_from=tiny_base, quant="int8", lora={"enabled": True})
        cfg["train"]["trainable"] = trainable
        with pytest.raises(ConfigValueError, match=message):
            check_trainable(TrainRun.from_config_dict(cfg), model)


# ---- on a trained shapes model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return shared_workdir(tmp_path_factory)


def shapes_processor(workdir: str, config):
    from jaxground.checkpoints.workdir import tokenizer_source
    from jaxground.data.processor import (Processor, clip_image_processor,
                                          load_tokenizer)

    source = tokenizer_source(workdir)
    return Processor(load_tokenizer(source), clip_image_processor(config.vision.image_size,
                                                                  source),
                     config.image_seq_length, config.image_token_id, "hf", False,
                     max_length=1 << 20)


def greedy_and_teacher_forced(model, processor, paths, tokens: int = 24):
    prompt = processor.encode("Describe the image.")["input_ids"]
    ids, mask = left_pad([prompt] * len(paths), processor.tokenizer.pad_token_id or 0)
    px = processor.pixel_values(paths)
    gen = jaxground.generate(model, ids, px, attention_mask=mask, max_new_tokens=tokens)
    return ids, mask, px, np.asarray(gen.tokens)


@pytest.mark.slow
def test_int8_and_nf4_stay_close_to_fp32_on_a_trained_model(trained):
    """Teacher forced on the fp32 model's greedy answers: next-token logits within a stated
    tolerance and the same argmax at >= 97% (int8) / 93% (nf4) of the answer positions."""
    full = jaxground.load(trained)
    processor = shapes_processor(trained, full.config)
    paths = images(trained)[:16]
    ids, mask, px, answers = greedy_and_teacher_forced(full, processor, paths)
    eos = full.config.eos_token_id
    seq = np.concatenate([ids, answers], axis=1)
    seq_mask = np.concatenate([mask, np.cumsum(answers == eos, axis=1) - (answers == eos) == 0],
                              axis=1).astype(np.int32)
    positions = slice(ids.shape[1] - 1, seq.shape[1] - 1)  # logits predicting each answer token
    scored = seq_mask[:, ids.shape[1]:].astype(bool)
    want = np.asarray(full(input_ids=seq, pixel_values=px, attention_mask=seq_mask)
                      .logits)[:, positions]
    report = {}
    for mode, agree_at_least, max_logit_error in (("int8", 0.97, 0.1), ("nf4", 0.93, 1.0)):
        model = restore_model(trained, config=read_config(trained).replace(
            quant=QuantConfig(mode=mode)))
        got = np.asarray(model(input_ids=seq, pixel_values=px, attention_mask=seq_mask)
                         .logits)[:, positions]
        agree = (got.argmax(-1) == want.argmax(-1))[scored].mean()
        error = np.abs(got - want)[scored].max()
        report[mode] = (float(agree), float(error))
        assert agree >= agree_at_least, report
        assert error <= max_logit_error, report
    print("quantized vs fp32 (argmax agreement, max |logit error|):", report)


def lora_cmd(workdir, trained, *extra):
    return [sys.executable, "-m", "jaxground.train", "--config", "configs/shapes.py",
            "--workdir", str(workdir), f"--config.model.init_from={trained}",
            f"--config.data.dir={trained}/data/train", "--config.data.groups_per_batch=4",
            "--config.data.max_length=80", "--config.train.progress=False",
            "--config.train.eval_every=0", "--config.train.warmup_steps=1",
            "--config.data.kinds=caption", "--config.model.lora.enabled=True",
            "--config.model.lora.rank=4", "--config.model.lora.alpha=8",
            "--config.model.quant=int8", "--config.train.steps=4",
            "--config.train.checkpoint_every=2", "--config.train.lr=1e-2",
            "--config.train.trainable=lora,projector", "--config.train.lr_groups=projector=1e-3",
            *extra]


def run(cmd):
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_a_lora_int8_run_trains_only_adapters_saves_no_base_and_resumes_exactly(trained,
                                                                              tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(lora_cmd(straight, trained))
    # The same run stopped after step 2: its files then were the straight run's at step 2.
    import shutil

    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("3", "4", "tb"))
    with open(resumed / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in train_metrics(straight)[:2])
    assert "resumed from step 2" in run(lora_cmd(resumed, trained)).stderr
    a, b = train_metrics(straight), train_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss", "lm_loss", "grounding_loss", "grad_norm"):
            assert ra[k] == rb[k], (ra["step"], k)  # bitwise

    # The checkpoint holds the adapters, the projector and the optimizer state: no base.
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(str(straight / "checkpoints" / "4" / "state"))
    stored = getattr(stored, "item_metadata", stored)
    assert "frozen" not in stored or not stored["frozen"]
    kept = {"/".join(k) for k in flatten(dict(stored["trainable"]))}
    assert kept and all("lora_" in k or k.startswith("projector/") for k in kept), kept
    assert not any(k.endswith("/kernel") and "language_model/layers" in k for k in kept)

    # Only the adapters and the projector moved; the base is the int8 base, bit for bit.
    base = param_dict(restore_model(trained))
    tuned = jaxground.load(str(straight))
    assert tuned.config.lora.enabled and tuned.config.quant.mode == "int8"
    tuned_leaves = flatten(nnx.to_pure_dict(nnx.state(tuned)))
    quantized = flatten(quantize_params(dict(jax.tree.map(jnp.asarray, base)), tuned.config.quant))
    moved = set()
    for path, leaf in tuned_leaves.items():
        if path[-1].startswith("lora_"):
            continue
        if not np.array_equal(np.asarray(leaf), np.asarray(quantized[path])):
            moved.add("/".join(path))
    assert moved and all(p.startswith("projector/") for p in moved), moved
    assert any(np.abs(np.asarray(v)).max() > 0 for k, v in tuned_leaves.items()
               if k[-1] == "lora_b")
    resumed_leaves = flatten(nnx.to_pure_dict(nnx.state(jaxground.load(str(resumed)))))
    for path, leaf in tuned_leaves.items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(resumed_leaves[path]),
                                      err_msg="/".join(path))


def test_the_7b_lora_recipe_has_llava_s_adapter_count_and_nf4_codes():
    """configs/llava_1_5_7b_lora.py:nf4 builds LLaVA's LoRA (rank 128 on q/k/v/o/gate/up/down
    of 32 layers: 32 * 128 * (4 * (4096 + 4096) + 3 * (4096 + 11008)) = 319,815,680 adapter
    parameters, what PEFT prints for LLaVA-1.5-7b's LoRA) over 4-bit codes."""
    import importlib.util

    from jaxground.config import RunConfig
    from jaxground.models.llava import abstract_model
    from jaxground.models.ops import QuantizedWeight

    spec = importlib.util.spec_from_file_location("lora7b", f"{REPO}/configs/llava_1_5_7b_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("nf4")
    cfg.model.init_from = "/base"
    run = RunConfig.from_config_dict(cfg).train
    assert run.train.lr_group_list == (("projector", 2e-5),) and run.train.lr == 2e-4
    from jaxground.models.config import llava_1_5_7b

    config = llava_1_5_7b().replace(lora=run.model.lora, quant=run.model.quant_config)
    model = abstract_model(config)
    adapters = {k: v for k, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
                if k[-1].startswith("lora_")}
    assert sum(int(np.prod(v.shape)) for v in adapters.values()) == 319_815_680
    codes = flatten(nnx.to_pure_dict(nnx.state(model, QuantizedWeight)))
    q = codes[("language_model", "layers", "mlp", "down_proj", "kernel_q")]
    assert q.shape == (32, 11008 // 2, 4096) and q.dtype == jnp.uint8
    assert codes[("language_model", "layers", "mlp", "down_proj", "kernel_scale")].shape == (
        32, 11008 // 64, 4096)


def test_evaluation_quantizes_at_load(tiny_base):
    """eval.quant loads any checkpoint with its LLM linears quantized (its own output dir);
    a bad value names the field."""
    from jaxground.eval import runner
    from jaxground.eval.settings import EvalConfigError, EvalSettings
    from jaxground.models.ops import QuantizedWeight

    settings = EvalSettings(quant="nf4")
    model, _ = runner.load_model(tiny_base, settings, None)
    assert model.config.quant.mode == "nf4"
    assert not model.language_model.unrolled  # see runner.decode_layout
    assert runner.load_model(tiny_base, EvalSettings(), None)[0].language_model.unrolled
    codes = flatten(nnx.to_pure_dict(nnx.state(model, QuantizedWeight)))
    assert {k[-1] for k in codes} == {"kernel_q", "kernel_scale"}
    assert runner.output_dir(tiny_base, "pope", "x.json", settings).endswith("pope-nf4")
    want = logits(restore_model(tiny_base, config=read_config(tiny_base).replace(
        quant=QuantConfig(mode="nf4"))), model.config)
    np.testing.assert_array_equal(logits(model, model.config), want)
    with pytest.raises(EvalConfigError, match="quant"):
        EvalSettings.from_config_dict({"eval": {"quant": "int4"}})


def test_a_bf16_base_gets_adapters_in_the_model_s_parameter_dtype():
    """Adapters over bf16 kernels (a workdir base whose frozen weights were saved in bf16)
    are made in the model's parameter dtype, fp32 for the 7B recipe: an optimizer stepping
    bf16 adapters would lose most of each update."""
    kernel = jnp.ones((2, 8, 6), jnp.bfloat16)
    params = {"language_model": {"layers": {"mlp": {"up_proj": {"kernel": kernel}}}}}
    cfg = LoraConfig(enabled=True, rank=2, targets="up_proj")
    linear = fresh_lora(params, cfg, seed=1, dtype=jnp.float32)["language_model"]["layers"][
        "mlp"]["up_proj"]
    assert linear["lora_a"].dtype == jnp.float32 and linear["lora_a"].shape == (2, 8, 2)
    assert linear["lora_b"].dtype == jnp.float32 and not np.any(np.asarray(linear["lora_b"]))
