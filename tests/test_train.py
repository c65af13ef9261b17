"""python -m jaxground.train: sharding equivalence, exact resume, crash safety, multi-host,
NaN guard, config errors, and that the default shapes run learns."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import jaxground
from jaxground.data import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    shapes.write_world(str(root / "train"), 80, seed=1)
    shapes.write_world(str(root / "heldout"), 20, seed=2)
    return str(root / "train"), str(root / "heldout")


def train_cmd(workdir, worlds, *overrides, config="configs/shapes.py"):
    return [sys.executable, "-m", "jaxground.train", "--config", config, "--workdir",
            str(workdir), f"--config.data.dir={worlds[0]}",
            f"--config.data.eval_dir={worlds[1]}", "--config.data.groups_per_batch=4",
            "--config.data.max_length=80", "--config.train.progress=False",
            "--config.train.eval_every=0", "--config.train.warmup_steps=2",
            "--config.data.kinds=caption", *overrides]


def env(devices=1, **extra):
    e = dict(os.environ, JAX_PLATFORMS="cpu", **{k: str(v) for k, v in extra.items()})
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def run(cmd, devices=1, timeout=600, **extra):
    r = subprocess.run(cmd, cwd=REPO, env=env(devices, **extra), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    return [r for r in rows if r["split"] == split]


def params(workdir):
    model = jaxground.load(str(workdir))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}


def test_sharded_mesh_matches_one_device(tmp_path, worlds):
    one = tmp_path / "one"
    eight = tmp_path / "eight"
    run(train_cmd(one, worlds, "--config.train.steps=3"))
    run(train_cmd(eight, worlds, "--config.train.steps=3", "--config.mesh.data=2",
                  "--config.mesh.fsdp=2", "--config.mesh.tensor=2"), devices=8)
    a, b = metrics(one), metrics(eight)
    assert [r["step"] for r in a] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("loss", "lm_loss", "grounding_loss"):
            assert abs(ra[k] - rb[k]) <= 1e-5, (ra["step"], k, ra[k], rb[k])
    # A run stopped on one device and resumed on eight continues the same trajectory.
    mixed = tmp_path / "mixed"
    run(train_cmd(mixed, worlds, "--config.train.steps=3", "--config.train.stop_at=2"))
    run(train_cmd(mixed, worlds, "--config.train.steps=3", "--config.mesh.data=2",
                  "--config.mesh.fsdp=2", "--config.mesh.tensor=2"), devices=8)
    assert abs(metrics(mixed)[-1]["loss"] - a[-1]["loss"]) <= 1e-5
    pa, pb = params(one), params(eight)
    # Adam divides each gradient by its own running scale, so an element whose true gradient
    # is ~0 (CLIP's k_proj bias: softmax ignores a bias shared by all keys; a rarely used
    # embedding entry) turns rounding noise, which differs with the sharding, into steps of up
    # to the learning rate. A sharding bug moves whole tensors, not such stray elements: all
    # but 0.1% of each tensor must agree to 1e-5, and none by more than 3 steps at the peak
    # learning rate (3 * 3e-3).
    for k in pa:
        diff = np.abs(np.asarray(pa[k], np.float64) - np.asarray(pb[k], np.float64))
        assert diff.max() <= 9e-3, (k, diff.max())
        if "k_proj']['bias" not in k:
            assert (diff > 1e-5).mean() <= 1e-3, (k, int((diff > 1e-5).sum()), diff.size)


def test_resume_is_exact(tmp_path, worlds):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--config.train.steps=6", "--config.train.checkpoint_every=3")
    run(train_cmd(straight, worlds, *common))
    run(train_cmd(resumed, worlds, *common, "--config.train.stop_at=3"))
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3]
    r = run(train_cmd(resumed, worlds, *common))
    assert "resumed from step 3" in r.stderr
    a, b = metrics(straight), metrics(resumed)
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a[3:], b[3:]):
        for k in ("loss", "lm_loss", "grounding_loss", "grad_norm"):
            assert ra[k] == rb[k], (ra["step"], k)  # bitwise
    pa, pb = params(straight), params(resumed)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def wait_for_step(workdir, step, proc, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stderr.read()[-2000:]}")
        try:
            rows = metrics(workdir)
            if rows and rows[-1]["step"] >= step:
                return rows[-1]["step"]
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


def complete_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def test_sigkill_resumes_from_last_complete_checkpoint(tmp_path, worlds):
    wd = tmp_path / "run"
    cmd = train_cmd(wd, worlds, "--config.train.steps=400", "--config.train.checkpoint_every=4")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(wd, 13, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = complete_steps(wd)
    assert done and done[-1] >= 8  # step 12 may still have been writing (async): not counted
    r = run(train_cmd(wd, worlds, "--config.train.steps=400",
                      "--config.train.checkpoint_every=4", f"--config.train.stop_at={done[-1] + 2}"))
    assert f"resumed from step {done[-1]}" in r.stderr
    assert metrics(wd)[-1]["step"] == done[-1] + 2
    assert not [n for n in os.listdir(wd / "checkpoints") if "tmp" in n]


def test_sigterm_saves_the_current_step(tmp_path, worlds):
    wd = tmp_path / "run"
    cmd = train_cmd(wd, worlds, "--config.train.steps=400",
                    "--config.train.checkpoint_every=1000")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(wd, 5, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    last = metrics(wd)[-1]["step"]
    assert complete_steps(wd) == [last] and 5 <= last < 400


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, worlds):
    single = tmp_path / "single"
    run(train_cmd(single, worlds, "--config.train.steps=2"))
    multi = tmp_path / "multi"
    port = free_port()
    procs = [subprocess.Popen(train_cmd(multi, worlds, "--config.train.steps=2"), cwd=REPO,
                              env=env(1, JAXGROUND_COORDINATOR=f"127.0.0.1:{port}",
                                      JAXGROUND_NUM_PROCESSES=2, JAXGROUND_PROCESS_ID=i),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "over 2 devices (2 processes)" in outs[0][1]
    a, b = metrics(single), metrics(multi)
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for k in ("loss", "lm_loss", "grounding_loss"):
            assert abs(ra[k] - rb[k]) <= 1e-5, (ra["step"], k, ra[k], rb[k])


def test_nan_batches_are_skipped_then_stop(tmp_path, worlds):
    wd = tmp_path / "run"
    run(train_cmd(wd, worlds, "--config.train.steps=4", "--config.train.debug_nan_steps=2"))
    rows = metrics(wd)
    assert [r["finite"] for r in rows] == [True, False, True, True]
    assert [r["bad_steps"] for r in rows] == [0, 1, 0, 0]
    wd2 = tmp_path / "run2"
    r = subprocess.run(train_cmd(wd2, worlds, "--config.train.steps=6",
                                 "--config.train.debug_nan_steps=2,3",
                                 "--config.train.max_bad_steps=2"),
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "2 consecutive steps with a non-finite loss or gradient" in r.stderr
    assert metrics(wd2)[-1]["step"] == 3


def test_config_mistakes_fail_before_compiling(tmp_path, worlds):
    r = subprocess.run(train_cmd(tmp_path / "a", worlds, "--config.train.lrr=1"), cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "lrr" in r.stderr
    r = subprocess.run(train_cmd(tmp_path / "b", worlds, "--config.train.steps=0"), cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "config.train.steps: 0 must be positive" in r.stderr
    r = subprocess.run(train_cmd(tmp_path / "c", worlds, "--config.grounding.layers=9"),
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "grounding.layers [9]" in r.stderr


@pytest.mark.slow
def test_default_shapes_run_learns(tmp_path):
    """The acceptance run: the default config, from nothing, on this machine."""
    wd = tmp_path / "shapes"
    run([sys.executable, "-m", "jaxground.train", "--config", "configs/shapes.py",
         "--workdir", str(wd), "--config.train.progress=False"], timeout=900)
    train, ev = metrics(wd), metrics(wd, "eval")
    assert train[-1]["step"] == 400
    first_lm = train[0]["lm_loss"]
    last_lm = np.mean([r["lm_loss"] for r in train[-20:]])
    assert last_lm <= first_lm / 2, (first_lm, last_lm)
    assert ev[-1]["grounding_auroc"] >= 0.9, ev


def test_llava_preset_fine_tunes_a_converted_checkpoint(tmp_path, worlds):
    """configs/llava_1_5_7b.py's recipe (bf16 compute, frozen CLIP + LLM in bf16, projector
    and heads trained, frozen weights not saved) on a tiny converted HF model."""
    import hf_tiny
    from jaxground.hf_convert import hf_to_jaxground

    hf = hf_tiny.build_hf("mha", seed=3)
    hf_tiny.save_hf(hf, str(tmp_path / "hf"))
    hf_tiny.make_processor(hf).save_pretrained(str(tmp_path / "hf"))
    hf_to_jaxground(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    wd = tmp_path / "run"
    run(train_cmd(wd, worlds, "--config.train.steps=2", "--config.train.warmup_steps=1",
                  f"--config.model.init_from={tmp_path / 'ckpt'}", "--config.data.workers=0",
                  "--config.data.groups_per_batch=2", "--config.data.max_length=64",
                  "--config.grounding.type=learned", "--config.grounding.dim=16",
                  config="configs/llava_1_5_7b.py"))
    assert [r["step"] for r in metrics(wd)] == [1, 2]
    before, after = params(tmp_path / "ckpt"), params(wd)
    for k in before:
        if "grounding_heads" in k:
            continue  # the converted similarity heads were replaced by learned ones
        moved = not np.array_equal(before[k], after[k])
        assert moved == ("projector" in k), k
    assert any("text_proj" in k for k in after)
