"""`restore_model`: converted dirs and training workdirs, straight onto a mesh, in a dtype."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs with 8 simulated CPU devices (the device count is fixed when JAX starts, so in a
# fresh process). Writes a converted dir and a training workdir of one tiny model, restores
# both onto an fsdp=8 mesh, and reports what it found as JSON.
SHARDED_RESTORE = textwrap.dedent('''
    import json, sys
    import grain, jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jaxground.checkpoints import restore_model
    from jaxground.checkpoints.converted import save_params, write_config
    from jaxground.checkpoints.workdir import Checkpointer
    from jaxground.models.config import llava_1_5_7b, tiny
    from jaxground.models.llava import abstract_model, init_model, param_dict
    from jaxground.parallel.sharding import make_mesh, param_shardings
    from jaxground.training.optim import trainable_filter
    from jaxground.training.step import init_state
    from jaxground.utils.trees import leaves_by_path

    out, root = {}, sys.argv[1]
    assert jax.device_count() == 8
    mesh = make_mesh({"fsdp": 8})
    config = tiny(vocab_size=256)
    model = init_model(config, seed=0)
    reference = {k: np.asarray(v) for k, v in leaves_by_path(param_dict(model)).items()}
    save_params(root + "/converted", config, param_dict(model))

    # A training workdir: trainable fp32, frozen bf16 (as model.frozen_dtype=bfloat16 saves).
    _, state = init_state(model, trainable_filter("projector,grounding_heads"),
                          optax.adam(1e-3), 0)
    state = state.replace(frozen=jax.tree.map(
        lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a,
        state.frozen))
    data = grain.MapDataset.range(4).to_iter_dataset()
    ckpt = Checkpointer(root + "/workdir")
    ckpt.save(5, state, iter(data))
    ckpt.close()
    write_config(root + "/workdir", config)

    want = {k: s.spec for k, s in leaves_by_path(
        param_shardings(param_dict(abstract_model(config)), mesh)).items()}
    for name, kw in (("converted", {}), ("workdir", {}),
                     ("workdir_bf16", {"dtype": "bfloat16"})):
        path = root + "/" + name.split("_")[0]
        model = restore_model(path, mesh=mesh, **kw)
        restored = leaves_by_path(param_dict(model))
        policy = leaves_by_path(param_dict(abstract_model(model.config)))
        out[name] = {
            "as_model_holds": sorted(k for k, v in restored.items()
                                     if v.dtype != policy[k].dtype),
            "specs_match": all(v.sharding.spec == want[k] for k, v in restored.items()),
            "mesh_ok": all(v.sharding.mesh.shape == mesh.shape for v in restored.values()),
            "sharded": sorted(k for k, v in restored.items()
                              if any(a is not None for a in v.sharding.spec)),
            "dtypes": sorted({str(v.dtype) for v in restored.values()}),
            "max_diff": max(float(np.max(np.abs(np.asarray(v, np.float32) -
                                                reference[k].astype(np.float32))))
                            for k, v in restored.items()),
            "keys_match": set(restored) == set(reference)}

    # The real 7B, abstractly: what each parameter would be restored onto (nothing allocated).
    big = param_dict(abstract_model(llava_1_5_7b()))
    specs = leaves_by_path(param_shardings(big, mesh))
    shapes = leaves_by_path(big)
    out["7b_unsharded_large"] = sorted(
        k for k, s in specs.items()
        if np.prod(shapes[k].shape) >= (1 << 20) and all(a is None for a in s.spec))
    out["7b_specs"] = {k: str(specs[k].spec) for k in (
        "language_model/layers/self_attn/q_proj/kernel",
        "language_model/layers/mlp/down_proj/kernel",
        "language_model/embed_tokens/embedding", "lm_head/kernel")
        if k in specs}
    print(json.dumps(out))
''')


def _run_script(tmp_path, name: str, source: str, *args, env=None) -> dict:
    script = tmp_path / name
    script.write_text(source)
    r = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])



EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def test_restore_places_every_parameter_on_its_sharding_of_an_fsdp_mesh(tmp_path):
    out = _run_script(tmp_path, "sharded_restore.py", SHARDED_RESTORE, tmp_path,
                      env=EIGHT_DEVICES)
    for name in ("converted", "workdir", "workdir_bf16"):
        got = out[name]
        assert got["keys_match"] and got["specs_match"] and got["mesh_ok"], (name, got)
        # The matrices are split over the 8 devices, not replicated.
        assert any("q_proj" in k for k in got["sharded"]), (name, got["sharded"])
        assert any("embed_tokens" in k for k in got["sharded"]), (name, got["sharded"])
    assert out["converted"]["dtypes"] == ["float32"]
    assert out["converted"]["max_diff"] == 0.0
    # A workdir restores each array in its stored dtype unless a dtype is asked for.
    assert out["workdir"]["dtypes"] == ["bfloat16", "float32"]
    assert out["workdir"]["as_model_holds"]  # the bf16 frozen ones, as stored
    # Asked for bf16: every array as the bf16 model holds it (heads' scalars stay float32).
    assert out["workdir_bf16"]["as_model_holds"] == []
    assert out["workdir_bf16"]["dtypes"] == ["bfloat16", "float32"]
    assert out["workdir"]["max_diff"] < 2e-2  # frozen ones went through bf16
    assert out["7b_unsharded_large"] == []
    assert out["7b_specs"]["language_model/layers/self_attn/q_proj/kernel"] == \
        "P(None, 'fsdp', None)"
    assert out["7b_specs"]["lm_head/kernel"] == "P('fsdp', None)"


# ---------------------------------------------------------------- in-process, one device

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from jaxground.checkpoints.converted import save_params
    from jaxground.models.config import tiny
    from jaxground.models.llava import init_model, param_dict

    path = str(tmp_path_factory.mktemp("ckpt") / "converted")
    config = tiny()
    params = param_dict(init_model(config, seed=1))
    save_params(path, config, params)
    return path, config, params


def params_flat(params):
    from jaxground.utils.trees import leaves_by_path

    return {k: np.asarray(v) for k, v in leaves_by_path(params).items()}


def flat_params(model):
    from jaxground.models.llava import param_dict
    from jaxground.utils.trees import leaves_by_path

    return {k: np.asarray(v) for k, v in leaves_by_path(param_dict(model)).items()}


def test_converted_dir_restores_into_another_grounding_config_with_fresh_seeded_heads(
        converted):
    import dataclasses

    from jaxground.checkpoints import restore_model
    from jaxground.models.llava import fresh_grounding_heads
    from jaxground.utils.trees import leaves_by_path

    path, config, params = converted
    learned = config.replace(grounding=dataclasses.replace(config.grounding, type="learned",
                                                           dim=8))
    got = flat_params(restore_model(path, config=learned, seed=3))
    want = {k: np.asarray(v) for k, v in leaves_by_path(params).items()}
    fresh = {k: np.asarray(v) for k, v in leaves_by_path(fresh_grounding_heads(learned, 3)).items()}
    assert set(got) == (set(want) - {k for k in want if "grounding_heads" in k}) | set(fresh)
    for k, v in got.items():
        np.testing.assert_array_equal(v, fresh[k] if "grounding_heads" in k else want[k],
                                      err_msg=k)
    assert any("text_proj" in k for k in fresh)


def test_restore_dtype_casts_while_reading(converted):
    from jaxground.checkpoints import restore_model

    path, _, params = converted
    model = restore_model(path, dtype="bfloat16")
    got = flat_params(model)
    # Every parameter in bf16 but the heads' calibration scalars, which the model keeps in
    # float32 whatever its dtype.
    assert {k: str(v.dtype) for k, v in got.items() if str(v.dtype) != "bfloat16"} == {
        "language_model/grounding_heads/bias": "float32",
        "language_model/grounding_heads/scale": "float32"}
    for k, v in got.items():
        np.testing.assert_array_equal(
            v.astype(np.float32), np.asarray(
                jax.numpy.asarray(params_flat(params)[k]).astype(v.dtype), np.float32),
            err_msg=k)
    assert model.config.dtype == model.config.param_dtype == "bfloat16"
    with pytest.raises(ValueError, match="float64"):
        restore_model(path, dtype="float64")


def test_restore_mistakes_name_the_problem(converted, tmp_path):
    from jaxground.checkpoints import restore_model

    path, _, _ = converted
    with pytest.raises(ValueError, match="converted checkpoint dir: it has no steps"):
        restore_model(path, step=3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore_model(str(tmp_path / "nothing"))


def test_init_from_is_saved_relative_to_the_workdir_and_found_after_a_move(tmp_path):
    import shutil

    import ml_collections

    from jaxground.checkpoints.workdir import (TRAIN_CONFIG_FILE, init_from_of,
                                               write_train_config)

    old = tmp_path / "old"
    (old / "base").mkdir(parents=True)
    (old / "run").mkdir()
    cfg = ml_collections.ConfigDict({"model": {"init_from": str(old / "base")}})
    write_train_config(str(old / "run"), cfg)
    saved = json.load(open(old / "run" / TRAIN_CONFIG_FILE))
    assert saved["model"]["init_from"] == os.path.join("..", "base")
    assert cfg.model.init_from == str(old / "base")  # the caller's config is untouched
    shutil.move(str(old), str(tmp_path / "new"))
    assert init_from_of(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "base")

    # Runs saved before this: init_from relative to where training was started.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / TRAIN_CONFIG_FILE).write_text(json.dumps({"model": {"init_from": "base_here"}}))
    (tmp_path / "base_here").mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert init_from_of(str(legacy)) == "base_here"
    finally:
        os.chdir(cwd)
    assert init_from_of(str(tmp_path / "nothing_saved")) == ""


# ---------------------------------------------------------------- restore memory, 1 GiB
# A training workdir whose parameters take 1 GiB (fp32; frozen ones saved beside the
# trainable projector and heads), written in one process and restored in another onto an
# fsdp=8 mesh of simulated CPU devices, whose peak RSS is measured.
WRITE_GIB_WORKDIR = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, "bench")
    import grain, numpy as np, optax
    from convert_memory import synthetic_config
    from jaxground.checkpoints.converted import save_params, write_config
    from jaxground.checkpoints.workdir import Checkpointer
    from jaxground.models.config import tiny
    from jaxground.models.llava import init_model, param_dict
    from jaxground.training.optim import trainable_filter
    from jaxground.training.step import init_state
    from jaxground.utils.trees import leaves_by_path

    config = synthetic_config(1024)
    model = init_model(config, seed=0)
    leaves = leaves_by_path(param_dict(model))
    sums = {k: float(np.asarray(v, np.float64).sum()) for k, v in leaves.items()}
    _, state = init_state(model, trainable_filter("projector,grounding_heads"),
                          optax.adam(1e-3), 0)
    del model, leaves
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()))
    ckpt.close()
    write_config(sys.argv[1], config)
    save_params(sys.argv[2], tiny(), param_dict(init_model(tiny())))  # the warm-up restore
    print(json.dumps({"sums": sums}))
''')
RESTORE_MEASURED = textwrap.dedent('''
    import json, os, resource, sys
    import jax, numpy as np
    from jaxground.checkpoints import restore_model
    from jaxground.models.llava import param_dict
    from jaxground.parallel.sharding import make_mesh
    from jaxground.utils.trees import leaves_by_path

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    mesh = make_mesh({"fsdp": 8})
    restore_model(sys.argv[2], mesh=mesh)  # a tiny model first: the fixed costs paid
    start = rss()
    model = restore_model(sys.argv[1], mesh=mesh)
    leaves = jax.block_until_ready(leaves_by_path(param_dict(model)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "start": start, "peak": peak, "bytes": sum(v.nbytes for v in leaves.values()),
        "sums": {k: float(np.asarray(v, np.float64).sum()) for k, v in leaves.items()},
        "sharded": all(len(v.sharding.device_set) == 8 for v in leaves.values())}))
''')


@pytest.mark.slow
def test_restoring_a_1_gib_workdir_adds_under_1_3x_its_bytes(tmp_path):
    """What the restore adds to the process stays under 1.3x the parameter bytes: the
    parameters plus read buffers, never a second copy (Orbax's default reads every array
    before placing any). Measured from the RSS after restoring a tiny model, so that what
    any restore costs once (imports, the CPU backend, tracing the abstract model: ~350 MiB,
    0.33x of 1 GiB) is not counted against the 1 GiB; the raw ratio is printed."""
    workdir, warm_up = tmp_path / "workdir", tmp_path / "tiny"
    written = _run_script(tmp_path, "write.py", WRITE_GIB_WORKDIR, workdir, warm_up)
    got = _run_script(tmp_path, "restore.py", RESTORE_MEASURED, workdir, warm_up,
                      env=EIGHT_DEVICES)
    assert got["sums"] == written["sums"]  # every parameter came back, bit for bit
    assert got["bytes"] >= 1 << 30 and got["sharded"]
    added, raw = (got["peak"] - got["start"]) / got["bytes"], got["peak"] / got["bytes"]
    print(f"restore of {got['bytes'] >> 20} MiB: (peak - baseline) / bytes = {added:.3f}, "
          f"peak / bytes = {raw:.3f}")
    assert added <= 1.3, (added, raw)
