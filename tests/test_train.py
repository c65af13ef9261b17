"""python -m jaxground.train: sharding equivalence, exact resume, crash safety, multi-host,
NaN guard, config errors, and that the default shapes run learns."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import jaxground
from jaxground.data import shapes
from jaxground.models.llava import abstract_model

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


def stopped_copy(run_dir, to, step: int):
    """`run_dir` as it was when stopped after `step` (its checkpoints up to there, its
    metrics up to there): what `train.stop_at=step` leaves, without training it again
    (`train.stop_at` itself: test_sharded_mesh_matches_one_device, the signal tests)."""
    import shutil

    later = [n for n in os.listdir(run_dir / "checkpoints") if n.isdigit() and int(n) > step]
    shutil.copytree(run_dir, to, ignore=lambda d, names: [n for n in names if n in later
                                                          and d.endswith("checkpoints")])
    with open(to / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in metrics(run_dir) if r["step"] <= step)


def test_resume_is_exact(tmp_path, worlds):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--config.train.steps=6", "--config.train.checkpoint_every=3")
    run(train_cmd(straight, worlds, *common))
    stopped_copy(straight, resumed, 3)
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


def stopped_by_signal_saves_the_current_step(sig, workdir, worlds):
    """Sends `sig` mid-run (no periodic checkpoint due): the trainer must save the step it
    reached, exit 0 and say so."""
    cmd = train_cmd(workdir, worlds, "--config.train.steps=400",
                    "--config.train.checkpoint_every=1000")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(workdir, 5, proc)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # ignored the signal: do not leave it training
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert rc == 0, err[-2000:]
    last = metrics(workdir)[-1]["step"]
    assert complete_steps(workdir) == [last] and 5 <= last < 400
    assert f"signal {int(sig)}: saved step {last}, exiting" in err, err[-2000:]


def test_sigterm_saves_the_current_step(tmp_path, worlds):
    stopped_by_signal_saves_the_current_step(signal.SIGTERM, tmp_path / "run", worlds)


def test_sigint_saves_the_current_step(tmp_path, worlds):
    stopped_by_signal_saves_the_current_step(signal.SIGINT, tmp_path / "run", worlds)


def tb_scalars(directory):
    """{tag: {step: value}} of the scalars in every TensorBoard event file under `directory`.
    tensorboardX ships no reader: the TFRecord framing (length, masked CRC, Event proto,
    masked CRC) is parsed here and both checksums are verified."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    out = {}
    files = [os.path.join(root, n) for root, _, names in os.walk(directory) for n in names
             if "tfevents" in n]
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (n,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
            record = data[pos + 12:pos + 12 + n]
            crc = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0]
            assert crc == masked_crc32c(record), path
            pos += 16 + n
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[event.step] = v.simple_value
                elif v.HasField("tensor"):
                    out.setdefault(v.tag, {})[event.step] = v.tensor.float_val[0]
    return out


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_pruning_steps_bf16_frozen_and_tensorboard(tmp_path, worlds):
    """One short run checks four README claims: only the last `train.keep_checkpoints`
    step dirs remain and `jaxground.load(WORKDIR, step=N)` gives step N (a pruned step is a
    clear error); `model.frozen_dtype=bfloat16` stores and holds the frozen parameters in
    bf16 while the trainable ones stay fp32, and training runs; WORKDIR/tb holds the losses
    metrics.jsonl has."""
    import orbax.checkpoint as ocp

    from jaxground.training.optim import trainable_filter

    wd = tmp_path / "run"
    trainable = "projector,grounding_heads"
    run(train_cmd(wd, worlds, "--config.train.steps=4", "--config.train.checkpoint_every=1",
                  "--config.train.keep_checkpoints=2", "--config.model.frozen_dtype=bfloat16",
                  f"--config.train.trainable={trainable}"))
    rows = metrics(wd)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["finite"] and np.isfinite(r["loss"]) for r in rows), rows

    # Pruning: steps 1 and 2 were saved, then deleted.
    ckdir = wd / "checkpoints"
    assert complete_steps(wd) == [3, 4], os.listdir(ckdir)
    assert not [n for n in os.listdir(ckdir) if "tmp" in n]

    # Earlier step: what Orbax holds for step 3, read here without jaxground's loader.
    def stored(step):
        with ocp.PyTreeCheckpointer() as c:
            raw = c.restore(str(ckdir / str(step) / "state"))
        assert int(raw["step"]) == step
        flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(v)
                             for p, v in jax.tree_util.tree_leaves_with_path(tree)}
        frozen, trained = flat(raw["frozen"]), flat(raw["trainable"])
        assert frozen and trained and not set(frozen) & set(trained)
        return {**frozen, **trained}

    def loaded(**kw):
        model = jaxground.load(str(wd), **kw)
        state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return model, {jax.tree_util.keystr(p): v
                       for p, v in jax.tree_util.tree_leaves_with_path(state)}

    model3, at3 = loaded(step=3)
    _, latest = loaded()
    raw3, raw4 = stored(3), stored(4)
    assert set(at3) == set(raw3) == set(latest)
    for k in at3:
        np.testing.assert_array_equal(np.asarray(at3[k]), raw3[k], err_msg=k)
        np.testing.assert_array_equal(np.asarray(latest[k]), raw4[k], err_msg=k)
    moved = [k for k in at3 if not np.array_equal(np.asarray(at3[k]), np.asarray(latest[k]))]
    assert moved and all("projector" in k or "grounding_heads" in k for k in moved), moved
    with pytest.raises(FileNotFoundError, match=r"step 1 .*steps: \[3, 4\]"):
        jaxground.load(str(wd), step=1)

    # frozen_dtype: the checkpoint stores, and the restored model holds, the frozen
    # parameters in bf16; the trainable ones stay fp32.
    with ocp.PyTreeCheckpointer() as c:
        meta = c.metadata(str(ckdir / "4" / "state"))
    meta = getattr(meta, "item_metadata", meta)
    for part, dtype in (("frozen", np.dtype(jax.numpy.bfloat16)), ("trainable", np.float32)):
        leaves = jax.tree_util.tree_leaves_with_path(meta[part])
        assert leaves, part
        for p, m in leaves:
            if jax.numpy.issubdtype(m.dtype, jax.numpy.floating):
                assert np.dtype(m.dtype) == dtype, (part, jax.tree_util.keystr(p), m.dtype)
    trained = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        nnx.to_pure_dict(nnx.state(model3, trainable_filter(trainable))))}
    assert trained and trained < set(at3)
    for k, v in at3.items():
        assert v.dtype == (jax.numpy.float32 if k in trained else jax.numpy.bfloat16), k
    # Asking for a dtype casts every parameter, the stored-bf16 frozen ones too, to what
    # the model in that dtype holds (the heads' calibration scalars stay float32).
    for name in ("float32", "bfloat16"):
        model = jaxground.load(str(wd), dtype=name)
        cast = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        policy = nnx.to_pure_dict(nnx.state(abstract_model(model.config), nnx.Param))
        dtypes = jax.tree.map(lambda a, b: (a.dtype, b.dtype), cast, policy)
        assert all(a == b for a, b in jax.tree.leaves(
            dtypes, is_leaf=lambda x: isinstance(x, tuple)))
        assert {v.dtype for k, v in jax.tree_util.tree_leaves_with_path(cast)
                if "grounding_heads" not in jax.tree_util.keystr(k)} == \
            {np.dtype(getattr(jax.numpy, name))}

    # TensorBoard: every train row's loss is in WORKDIR/tb at its step.
    tb = tb_scalars(wd / "tb")
    for key in ("loss", "lm_loss", "grounding_loss"):
        assert tb.get(f"train/{key}", {}).keys() >= {1, 2, 3, 4}, sorted(tb)
        for r in rows:
            assert tb[f"train/{key}"][r["step"]] == pytest.approx(r[key], rel=1e-6), key


def test_a_trained_workdir_exports_to_hf_and_back(tmp_path, worlds):
    """orbax_to_hf.py --ckpt WORKDIR: HF's LlavaForConditionalGeneration loads the export
    with logits equal to jaxground.load(WORKDIR)'s, and converting the export back gives
    the trained heads and their config exactly."""
    import hf_tiny
    from transformers import LlavaForConditionalGeneration

    from jaxground.checkpoints.converted import read_config, restore_params
    from jaxground.checkpoints.hf_convert import hf_to_jaxground

    wd, out = tmp_path / "run", tmp_path / "hf"
    run(train_cmd(wd, worlds, "--config.train.steps=2", "--config.grounding.type=learned",
                  "--config.grounding.dim=16", "--config.data.workers=0"))
    r = run([sys.executable, "convert/orbax_to_hf.py", "--ckpt", str(wd), "--out", str(out)])
    assert "grounding_heads.safetensors" in r.stdout
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(out)), os.listdir(out)
    assert "metrics.jsonl" not in os.listdir(out)  # only what an HF dir holds

    ours = jaxground.load(str(wd))
    c = ours.config
    rng = np.random.RandomState(0)
    text = [int(t) for t in rng.randint(0, c.text.vocab_size, 40) if t != c.image_token_id]
    ids = np.array([text[:3] + [c.image_token_id] * c.image_seq_length + text[3:12]])
    mask = np.ones_like(ids)
    px = rng.randn(1, 3, c.vision.image_size, c.vision.image_size).astype(np.float32)
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager")
    want = hf_tiny.hf_logits(hf.eval(), ids, mask, px)
    got = np.asarray(ours(input_ids=ids, pixel_values=px, attention_mask=mask).logits)
    assert np.abs(got - want).max() <= 1e-4

    hf_to_jaxground(str(out), str(tmp_path / "back"))
    back = read_config(str(tmp_path / "back"))
    assert back.grounding == c.grounding
    heads = restore_params(str(tmp_path / "back"), back)["language_model"]["grounding_heads"]
    trained = nnx.to_pure_dict(nnx.state(ours, nnx.Param))["language_model"]["grounding_heads"]
    for (p, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(heads),
                              jax.tree_util.tree_leaves_with_path(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(p))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, worlds):
    """Two processes, held-out evaluation on and corrupt training images (skipped pairs
    stay in place, masked): they finish, log the held-out metrics, and every train and
    eval number equals a one-process run's."""
    import shutil

    train_world = tmp_path / "world"
    shutil.copytree(worlds[0], train_world)
    images = sorted(os.listdir(train_world / "images"))
    for name in images[::3]:  # a third of the images cannot be decoded
        (train_world / "images" / name).write_bytes(b"not a png")
    flags = ("--config.train.steps=2", "--config.train.eval_every=1",
             "--config.train.eval_batches=2", "--config.loss.grounding_loss=margin")
    world = (str(train_world), worlds[1])
    single = tmp_path / "single"
    one = run(train_cmd(single, world, *flags))
    assert "skipping example" in one.stderr
    multi = tmp_path / "multi"
    port = free_port()
    procs = [subprocess.Popen(train_cmd(multi, world, *flags), cwd=REPO,
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
    ea, eb = metrics(single, "eval"), metrics(multi, "eval")
    assert [r["step"] for r in ea] == [r["step"] for r in eb] == [1, 2]
    for ra, rb in zip(ea, eb):
        assert ra["labelled_tokens"] == rb["labelled_tokens"] > 0
        for k in ("lm_loss", "grounding_auroc"):
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


def test_config_mistakes_fail_before_compiling_in_one_line(tmp_path, worlds):
    """A user's mistake is one line on stderr and a non-zero exit, never a traceback."""
    def last_line(cmd):
        r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode != 0, r.stderr[-2000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        return r.stderr.strip().splitlines()[-1]

    assert last_line(train_cmd(tmp_path / "a", worlds, "--config.train.stepz=1")) == \
        'error: \'stepz\' Did you mean "steps" instead of "stepz"?'
    assert last_line(train_cmd(tmp_path / "b", worlds, "--config.train.steps=0")) == \
        "error: config.train.steps: 0 must be positive"
    assert "grounding.layers [9]" in last_line(
        train_cmd(tmp_path / "c", worlds, "--config.grounding.layers=9"))
    assert "configs/nope.py" in last_line(train_cmd(tmp_path / "d", worlds,
                                                    config="configs/nope.py"))
    assert last_line([sys.executable, "-m", "jaxground.evaluate", "--workdir",
                      str(tmp_path / "missing"), "--task", "pope", "--data", str(tmp_path)]) \
        == f"error: --workdir {tmp_path / 'missing'} does not exist"


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
    from jaxground.checkpoints.hf_convert import hf_to_jaxground

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
