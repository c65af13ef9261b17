"""Exporting a LoRA run: merged full weights (HF), a PEFT adapter dir, and evaluation with
the adapters merged at load. One 3-step base run and one 3-step LoRA run (rank 4) serve
every test; variants (a quantized run, a bf16 base, a run without a base) are copies of
the LoRA workdir with an edited config: a LoRA checkpoint holds only what it trained, so
a copy is the same run over another base / quantization."""

import importlib.util
import json
import os
import re
import shutil
import sys
import warnings

import numpy as np
import pytest

import hf_tiny
import jaxground
from jaxground.checkpoints.safetensors_io import HEADS_FILE, SafetensorsFile
from test_train import run, train_cmd

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("lora_export")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK, ALPHA = 4, 8
LLM_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _orbax_to_hf():
    spec = importlib.util.spec_from_file_location(
        "orbax_to_hf", os.path.join(REPO, "convert", "orbax_to_hf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


export_cli = _orbax_to_hf()


def export(capsys, *args) -> str:
    """convert/orbax_to_hf.py in this process; returns stdout (asserting success)."""
    rc = export_cli([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    return out


def export_error(capsys, *args) -> str:
    """The one `error: ...` line of a failing export (exit status 1)."""
    assert export_cli([str(a) for a in args]) == 1
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from jaxground.data import shapes

    root = tmp_path_factory.mktemp("lora_export")
    worlds = (str(root / "train"), str(root / "heldout"))
    shapes.write_world(worlds[0], 80, seed=1)
    shapes.write_world(worlds[1], 20, seed=2)
    base, lora = root / "base", root / "lora"
    run(train_cmd(base, worlds, "--config.train.steps=3"))
    run(train_cmd(lora, worlds, "--config.train.steps=3", f"--config.model.init_from={base}",
                  "--config.model.lora.enabled=True", f"--config.model.lora.rank={RANK}",
                  f"--config.model.lora.alpha={ALPHA}",
                  "--config.train.trainable=lora,projector,grounding_heads"))
    return {"root": root, "base": str(base), "lora": str(lora), "heldout": worlds[1]}


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """The base and the LoRA run exported to HF, and the LoRA run as a PEFT adapter."""
    out = tmp_path_factory.mktemp("exports")
    dirs = {"base_hf": out / "base_hf", "lora_hf": out / "lora_hf", "peft": out / "peft"}
    for src, dest, extra in ((runs["base"], dirs["base_hf"], ()),
                             (runs["lora"], dirs["lora_hf"], ()),
                             (runs["lora"], dirs["peft"], ("--adapter",))):
        assert export_cli(["--ckpt", src, "--out", str(dest), *extra]) == 0
    return {k: str(v) for k, v in dirs.items()}


@pytest.fixture(scope="module")
def ours(runs):
    """Our LoRA model (adapters applied as they are), two left-padded rows and its logits."""
    model = jaxground.load(runs["lora"])
    c = model.config
    rng = np.random.RandomState(0)
    text = [int(t) for t in rng.randint(5, c.text.vocab_size, 24) if t != c.image_token_id]
    image = [c.image_token_id] * c.image_seq_length
    rows = [text[:3] + image + text[3:12], text[12:13] + image + text[13:17]]
    width = max(map(len, rows))
    ids, mask = np.zeros((2, width), np.int32), np.zeros((2, width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    px = rng.randn(2, 3, c.vision.image_size, c.vision.image_size).astype(np.float32)
    logits = np.asarray(model(input_ids=ids, pixel_values=px, attention_mask=mask).logits)
    return model, (ids, mask, px), logits


def hf_model_logits(model, inputs):
    ids, mask, px = inputs
    return np.where(mask[..., None] > 0, hf_tiny.hf_logits(model.eval(), ids, mask, px), 0)


def masked(logits, inputs):
    return np.where(inputs[1][..., None] > 0, logits, 0)


def load_hf(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(path), attn_implementation="eager")


def tensors(path) -> dict[str, np.ndarray]:
    st = SafetensorsFile(path)
    return {k: st.read(k) for k in st.keys()}


def copy_run(runs, name, edit_model=None, edit_config=None) -> str:
    """A copy of the LoRA workdir beside it, its train_config.json's `model` section and
    its jaxground_config.json edited in place."""
    dest = str(runs["root"] / name)
    shutil.copytree(runs["lora"], dest, ignore=shutil.ignore_patterns("eval", "tb"))
    for file, edit in (("train_config.json", edit_model), ("jaxground_config.json", edit_config)):
        if edit is None:
            continue
        path = os.path.join(dest, file)
        with open(path) as f:
            d = json.load(f)
        edit(d["model"] if file == "train_config.json" else d)
        with open(path, "w") as f:
            json.dump(d, f)
    return dest


def test_a_lora_run_exports_merged_full_weights(runs, exports, ours):
    """HF loads the merged export with our LoRA model's logits; it holds no adapter and
    differs from the base (the adapters and the trained projector are in it)."""
    model, inputs, want = ours
    names = set(tensors(os.path.join(exports["lora_hf"], "model.safetensors")))
    assert not any("lora" in n for n in names)
    assert names == set(tensors(os.path.join(exports["base_hf"], "model.safetensors")))
    got = hf_model_logits(load_hf(exports["lora_hf"]), inputs)
    diff = np.abs(got - masked(want, inputs)).max()
    print(f"merged export vs our LoRA model: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4
    base = hf_model_logits(load_hf(exports["base_hf"]), inputs)
    assert np.abs(base - got).max() > 1e-2
    # The trained heads travel in their side file, exactly.
    heads = tensors(os.path.join(exports["lora_hf"], HEADS_FILE))
    from flax import nnx

    trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))["language_model"]["grounding_heads"]
    for leaf, value in trained.items():
        np.testing.assert_array_equal(heads[f"language_model.grounding_heads.{leaf}"],
                                      np.asarray(value))


def test_a_quantized_lora_run_exports_the_same_full_weights(runs, exports, capsys):
    """An int8 LoRA run is written from its base's full weights (never dequantized codes):
    the same tensors as the unquantized run with the same adapters, merged or as PEFT."""
    quantized = copy_run(runs, "lora_int8", lambda m: m.__setitem__("quant", "int8"),
                         lambda c: c["quant"].__setitem__("mode", "int8"))
    model = jaxground.load(quantized)
    assert model.config.quant.mode == "int8"  # the copy is a quantized LoRA model
    out, peft_out = runs["root"] / "lora_int8_hf", runs["root"] / "lora_int8_peft"
    export(capsys, "--ckpt", quantized, "--out", out)
    export(capsys, "--ckpt", quantized, "--out", peft_out, "--adapter")
    for got_dir, want_dir, name in ((out, exports["lora_hf"], "model.safetensors"),
                                    (peft_out, exports["peft"], "adapter_model.safetensors")):
        got, want = tensors(os.path.join(got_dir, name)), tensors(os.path.join(want_dir, name))
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with open(os.path.join(out, "config.json")) as f:
        assert "quant" not in json.dumps(json.load(f))


def test_merged_weights_are_written_in_the_base_dtype(runs, exports, capsys):
    """Over a bfloat16 base, the merged weights are bfloat16 (rounded once, after adding
    the float32 update); the heads keep their float32."""
    from jaxground.checkpoints.hf_convert import hf_to_jaxground

    bf16_base = str(runs["root"] / "base_bf16")
    hf_to_jaxground(exports["base_hf"], bf16_base, dtype="bfloat16")
    lora = copy_run(runs, "lora_on_bf16",
                    lambda m: m.__setitem__("init_from", os.path.abspath(bf16_base)))
    out = runs["root"] / "lora_bf16_hf"
    export(capsys, "--ckpt", lora, "--out", out)
    got = tensors(os.path.join(out, "model.safetensors"))
    want = tensors(os.path.join(exports["lora_hf"], "model.safetensors"))
    base = tensors(os.path.join(exports["base_hf"], "model.safetensors"))
    assert {str(v.dtype) for v in got.values()} == {"bfloat16"}
    for k, v in want.items():  # two roundings: the base's weight, then the merged one
        bound = 2 ** -8 * (np.abs(base[k]) + np.abs(v)) + 1e-12
        assert (np.abs(got[k].astype(np.float32) - v) <= bound).all(), k
    assert {str(v.dtype) for v in tensors(os.path.join(out, HEADS_FILE)).values()} == {"float32"}
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"


def test_a_lora_run_exports_a_peft_adapter(runs, exports, ours):
    """--adapter: PEFT's own format (lora_A [r, in], lora_B [out, r] under
    base_model.model.<module>; the trained projector whole, as modules_to_save), which
    PeftModel loads over the base's HF export with our LoRA model's logits."""
    import peft
    from peft.utils.other import ModulesToSaveWrapper

    _, inputs, want = ours
    d = exports["peft"]
    assert {"adapter_config.json", "adapter_model.safetensors", HEADS_FILE} <= set(os.listdir(d))
    with open(os.path.join(d, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", RANK, ALPHA)
    assert cfg["base_model_name_or_path"] == os.path.abspath(runs["base"])
    base = load_hf(exports["base_hf"])
    layers = base.config.text_config.num_hidden_layers
    adapted = {f"model.language_model.layers.{l}.{m}" for l in range(layers) for m in LLM_LINEARS}
    names = {n for n, _ in base.named_modules()}
    assert {n for n in names if re.fullmatch(cfg["target_modules"], n)} == adapted
    projector = {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}
    assert set(cfg["modules_to_save"]) == projector
    weights = tensors(os.path.join(d, "adapter_model.safetensors"))
    hidden = base.config.text_config.hidden_size
    expected = {f"base_model.model.{m}.{w}" for m in adapted
                for w in ("lora_A.weight", "lora_B.weight")}
    expected |= {f"base_model.model.{m}.{w}" for m in projector for w in ("weight", "bias")}
    assert set(weights) == expected
    q = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    assert weights[f"{q}.lora_A.weight"].shape == (RANK, hidden)
    out_features = base.get_submodule(q.removeprefix("base_model.model.")).out_features
    assert weights[f"{q}.lora_B.weight"].shape == (out_features, RANK)

    base_logits = hf_model_logits(base, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, d)
    assert not [w for w in caught if "keys" in str(w.message)], [str(w.message) for w in caught]
    assert isinstance(model.get_submodule("base_model.model.model.multi_modal_projector.linear_1"),
                      ModulesToSaveWrapper)
    got = hf_model_logits(model, inputs)
    diff = np.abs(got - masked(want, inputs)).max()
    print(f"PEFT adapter vs our LoRA model: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4
    assert np.abs(got - base_logits).max() > 1e-2


def test_export_mistakes_name_the_field(runs, capsys, tmp_path):
    err = export_error(capsys, "--ckpt", runs["base"], "--out", tmp_path / "a", "--adapter")
    assert err.startswith("error: ") and "config.model.lora.enabled is off" in err, err
    no_base = copy_run(runs, "lora_no_base", lambda m: m.pop("init_from"))
    gone = copy_run(runs, "lora_gone_base",
                    lambda m: m.__setitem__("init_from", "../no_such_base"))
    for workdir in (no_base, gone):
        for extra in (("--adapter",), ()):
            err = export_error(capsys, "--ckpt", workdir, "--out", tmp_path / "b", *extra)
            assert err.startswith("error: ") and "model.init_from" in err, err
    assert "no_such_base" in err


def test_evaluate_merges_adapters_at_load_with_the_same_numbers(runs, tmp_path):
    """python -m jaxground.evaluate --merge: teacher-forced grounding on held-out captions
    gives the numbers of the run evaluated with its adapters applied as they are (here
    `jaxground.evaluate.evaluate` in this process) up to float rounding."""
    from jaxground import evaluate
    from jaxground.config import shapes_config
    from jaxground.data.coco import main as write_records

    records = str(tmp_path / "captions.jsonl")
    write_records(["--coco_dir", runs["heldout"], "--out", records, "--kinds", "caption"])
    outs = {merge: str(tmp_path / f"merge_{merge}") for merge in (False, True)}
    cfg = shapes_config()
    cfg.eval.limit = 8
    evaluate.evaluate(runs["lora"], "grounding", records, cfg, images=runs["heldout"],
                      out=outs[False])
    run([sys.executable, "-m", "jaxground.evaluate", "--config", "configs/shapes.py",
         "--workdir", runs["lora"], "--task", "grounding", "--data", records, "--images",
         runs["heldout"], "--out", outs[True], "--config.eval.limit=8", "--merge"])
    samples, results = {}, {}
    for merge, out in outs.items():
        with open(os.path.join(out, "samples.jsonl")) as f:
            samples[merge] = [json.loads(line) for line in f]
        with open(os.path.join(out, "results.json")) as f:
            results[merge] = json.load(f)
    assert (results[False]["adapters"], results[True]["adapters"]) == ("applied", "merged")
    a, b = samples[False], samples[True]
    assert [s["id"] for s in a] == [s["id"] for s in b] and len(a) == 8
    worst = 0.0
    for x, y in zip(a, b):
        assert x["token_ids"] == y["token_ids"]
        for key in ("logprobs", "entropy", "grounding"):
            worst = max(worst, float(np.abs(np.subtract(x[key], y[key])).max()))
    print(f"evaluate --merge vs applied adapters: max per-token diff {worst:.2e}")
    assert 0 < worst <= 1e-4  # 0: the same model ran twice (--merge ignored)
    # Counts agree exactly (AUROCs rank near-tied scores, which rounding may reorder).
    for key in ("tokens", "hallucinated_tokens", "mentions", "hallucinated_mentions"):
        assert results[False]["metrics"][key] == results[True]["metrics"][key]
