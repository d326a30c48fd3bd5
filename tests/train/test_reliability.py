"""Fault tests of the trainer (docs/RELIABILITY.md): non-finite steps, config refusal on resume, damaged
checkpoints, SIGTERM preemption and ``kill -9`` with a bit-identical continuation.

The process tests run the real ``raphael-train`` command (``python -m raphael_jax.cli.train``) on a
shrunken tiny config and signal it from outside.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raphael_jax.config import load_config
from raphael_jax.train import loop as loop_lib
from raphael_jax.train.checkpoint import DamagedCheckpointError, RunCheckpoints, load_run
from raphael_jax.train.loop import ConfigMismatchError, NonFiniteError, config_changes, train_and_evaluate

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG = os.path.join(ROOT, "configs", "tiny.py")
# test_train.py's shrunken model, smaller still: one RAPHAEL level, no middle block
SMALL = ["model.channels=(16, 32)", "model.block_levels=(0, 1)", "model.self_attention_levels=(0, 1)",
         "model.mid_block=False", "model.head_dim=16", "text.width=32", "model.context_dim=32",
         "text.num_layers=1", "model.edge.channels=4", "train.batch_size=4", "train.log_every=1",
         "train.sample_every=0", "train.warmup_steps=2", "sample.num_steps=3", "eval.num_prompts=4"]


def small_config(extra=()):
    return load_config(CONFIG, SMALL + list(extra))


# --- non-finite steps ----------------------------------------------------------------------------

class _Poisoned:
    """The real data iterator whose images become NaN from the ``start``-th batch it yields."""

    def __init__(self, inner, start: int):
        self.inner, self.start, self.n = inner, start, 0

    def __next__(self):
        batch = dict(next(self.inner))
        self.n += 1
        if self.n >= self.start:
            batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


@pytest.fixture(scope="module")
def nonfinite_run(tmp_path_factory):
    """Steps 1-2 finite, then NaN images: the run must stop at the third bad step in a row (step 5)."""
    workdir = str(tmp_path_factory.mktemp("nonfinite") / "run")
    real = loop_lib.make_data_iterator
    loop_lib.make_data_iterator = lambda *a: _Poisoned(real(*a), start=3)
    try:
        with pytest.raises(NonFiniteError) as err:
            train_and_evaluate(small_config(["train.max_nonfinite_steps=3", "train.checkpoint_every=2"]), workdir,
                               num_steps=20)
    finally:
        loop_lib.make_data_iterator = real
    return workdir, str(err.value)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(nonfinite_run):
    workdir, message = nonfinite_run
    assert "3 steps in a row (to step 5)" in message and "train.max_nonfinite_steps=3" in message
    assert "last checkpoint (step 4) is intact" in message
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 1]  # step 5 stopped the run before logging
    assert all(np.isfinite(r["grad_norm"]) for r in rows[:2]) and not np.isfinite(rows[2]["loss"])
    # the weights saved at step 4 (steps 3 and 4 skipped) equal those saved at step 2, bit for bit
    ck = RunCheckpoints(workdir, async_save=False)
    assert ck.manager.all_steps() == [2, 4]
    ck.close()
    a, b = load_run(workdir, 2), load_run(workdir, 4)
    for x, y in zip(jax.tree.leaves((a.params, a.ema_params)), jax.tree.leaves((b.params, b.ema_params)), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
        assert np.isfinite(np.asarray(x)).all()


def test_nonfinite_step_leaves_state_bit_identical():
    from raphael_jax.diffusion.schedule import NoiseSchedule
    from raphael_jax.models.raphael import build_model
    from raphael_jax.train.state import init_state, make_optimizer, split_model
    from raphael_jax.train.step import make_train_step

    cfg = small_config(["model.edge.enabled=False", "model.space_moe.enabled=False", "model.time_moe.enabled=False"])
    graphdef, params = split_model(build_model(cfg, 0))
    tx = make_optimizer(cfg)
    state = init_state(cfg, params, tx)
    step = jax.jit(make_train_step(graphdef, cfg, tx, NoiseSchedule.create("linear", 1000)))
    size = cfg.data.image_size
    batch = {"image": jnp.zeros((2, size, size, 3)), "tokens": jnp.ones((2, cfg.text.max_len), jnp.int32),
             "mask": jnp.ones((2, cfg.text.max_len), bool)}
    state = step(state, batch, jax.random.key(1))[0]  # past the warm-up's first step (learning rate 0)
    bad = {**batch, "image": batch["image"].at[0, 0, 0, 0].set(jnp.inf)}
    new, metrics = step(state, bad, jax.random.key(0))
    assert float(metrics["nonfinite"]) == 1.0 and int(new["step"]) == int(state["step"]) + 1
    for key in ("params", "ema_params", "opt_state"):
        for x, y in zip(jax.tree.leaves(new[key]), jax.tree.leaves(state[key]), strict=True):
            assert np.array_equal(np.asarray(x), np.asarray(y)), key
    good, metrics = step(state, batch, jax.random.key(0))
    assert float(metrics["nonfinite"]) == 0.0
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(good["params"]), jax.tree.leaves(state["params"])))


# --- config refusal on resume --------------------------------------------------------------------

def test_config_changes_split_safe_and_unsafe():
    a = small_config()
    b = small_config(["train.num_steps=7", "sample.guidance=2.0", "train.learning_rate=0.5",
                      "model.channels=(16, 48)"])
    unsafe, safe = config_changes(a, b)
    assert [u.split(":")[0] for u in unsafe] == ["model.channels", "train.learning_rate"]
    assert [u.split(":")[0] for u in safe] == ["sample.guidance", "train.num_steps"]
    assert "(16, 32) -> (16, 48)" in unsafe[0]
    assert config_changes(a, small_config()) == ([], [])


def test_resume_with_another_config_is_refused_without_touching_the_run(nonfinite_run):
    workdir, _ = nonfinite_run
    before = _tree_listing(workdir)
    with pytest.raises(ConfigMismatchError, match=r"model.channels: \(16, 32\) -> \(16, 48\).*--allow-config-change"):
        train_and_evaluate(small_config(["train.max_nonfinite_steps=3", "model.channels=(16, 48)"]), workdir,
                           num_steps=20)
    assert _tree_listing(workdir) == before
    proc = _cli(workdir, ["--set", "model.channels=(16, 48)", "--set", "train.max_nonfinite_steps=3"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raphael-train: error: ") and "Traceback" not in proc.stderr
    assert _tree_listing(workdir) == before


def _tree_listing(root: str) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = (os.path.getsize(p), os.path.getmtime(p))
    return out


# --- damaged checkpoints -------------------------------------------------------------------------

def _copy_run(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["missing_item", "empty_file", "half_file", "deleted_files", "garbled_config"])
def test_damaged_latest_checkpoint_falls_back_and_is_moved_aside(nonfinite_run, tmp_path, damage, capsys):
    workdir = _copy_run(nonfinite_run[0], str(tmp_path / "run"))
    step_dir = os.path.join(workdir, "checkpoints", "4")
    state_files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    if damage == "missing_item":
        import shutil
        shutil.rmtree(os.path.join(step_dir, "data"))
    elif damage == "empty_file":
        biggest = max(state_files, key=os.path.getsize)
        open(biggest, "w").close()  # truncated to nothing
    elif damage == "half_file":  # truncated part-way: caught by the sizes recorded after the save
        biggest = max(state_files, key=os.path.getsize)
        os.truncate(biggest, os.path.getsize(biggest) // 2)
    elif damage == "deleted_files":
        for f in state_files:
            os.remove(f)
    else:
        cfg_files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "config")) for f in fs]
        for f in cfg_files:
            with open(f, "w") as fh:
                fh.write("{not json")
    with pytest.raises(DamagedCheckpointError, match="step 4"):
        RunCheckpoints(workdir, async_save=False).check_step(4)
    run = load_run(workdir)  # sampling's loader: warns, moves step 4 aside, restores step 2
    assert run.step == 2
    err = capsys.readouterr().err
    assert "checkpoint at step 4" in err and "damaged" in err and "moved to" in err
    aside = os.listdir(os.path.join(workdir, "checkpoints_damaged"))
    assert len(aside) == 1 and aside[0].startswith("4-")
    assert sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == ["2"]


def test_truncated_file_without_a_size_record_falls_back_while_reading(nonfinite_run, tmp_path, capsys):
    """A file cut part-way in a checkpoint whose sizes were never recorded (killed right after the save)
    passes the cheap check; the restore finds it, and the trainer's and sampling's loaders fall back."""
    from raphael_jax.train.checkpoint import abstract_like, read_damage

    workdir = _copy_run(nonfinite_run[0], str(tmp_path / "run"))
    os.remove(os.path.join(workdir, "checkpoint_sizes", "4.json"))
    state_dir = os.path.join(workdir, "checkpoints", "4", "state")
    biggest = max((os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs), key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)
    ck = RunCheckpoints(workdir, async_save=False)
    ck.check_step(4)  # not caught without the record
    state2, data2 = ck.restore(None, 2)
    step, state, data_state = ck.restore_with_fallback(abstract_like(state2), 4)  # the trainer's restore
    ck.close()
    assert step == 2 and int(state["step"]) == 2 and data_state == data2
    err = capsys.readouterr().err
    assert "checkpoint at step 4" in err and "is damaged: " in err and "moved to" in err
    assert os.listdir(os.path.join(workdir, "checkpoints_damaged"))[0].startswith("4-")
    assert read_damage(ValueError("shape mismatch")) is None  # other errors never move checkpoints aside


def test_full_disk_during_a_save_is_a_clear_error_and_keeps_the_earlier_checkpoints(reference_run, tmp_path):
    """The trainer resumed under a file-size limit (RLIMIT_FSIZE: writes fail with EFBIG as they would with
    ENOSPC on a full disk, without needing a small filesystem) cannot write its next checkpoint."""
    import resource

    workdir = _copy_run(reference_run, str(tmp_path / "run"))
    before = sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    limit = 64 * 1024  # below the state's largest files, above the metrics and TensorBoard writes

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _cli(workdir, ["--set", f"train.num_steps={STEPS + 2}"], preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"raphael-train: error: could not write the checkpoint of step {STEPS + 2} into "), last
    assert "File too large" in last and f"steps {[int(s) for s in before]}) are intact" in last, last
    assert sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == before
    ck = RunCheckpoints(workdir, async_save=False)
    for step in before:
        ck.check_step(int(step))
    ck.close()
    again = _cli(workdir, ["--set", f"train.num_steps={STEPS + 2}"])  # space freed: the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {STEPS}" in again.stdout
    assert load_run(workdir).step == STEPS + 2


def test_nothing_intact_is_a_clear_error(nonfinite_run, tmp_path):
    workdir = _copy_run(nonfinite_run[0], str(tmp_path / "run"))
    for step in ("2", "4"):
        import shutil
        shutil.rmtree(os.path.join(workdir, "checkpoints", step, "config"))
    with pytest.raises(FileNotFoundError, match=r"no intact checkpoint .* every one is damaged \(steps \[4, 2\]\)"):
        load_run(workdir)
    assert sorted(d.split("-")[0] for d in os.listdir(os.path.join(workdir, "checkpoints_damaged"))) == ["2", "4"]


# --- preemption and kill -9 ----------------------------------------------------------------------

STEPS = 8
PROC = ["train.checkpoint_every=2", f"train.num_steps={STEPS}"]
# The processes share JAX's persistent compilation cache: the first compiles, the others load the same
# executables (as a user's requeued job does), so each restart costs seconds, not a compilation.
_CACHE = os.path.join(os.environ.get("PYTEST_TMPDIR", "/tmp"), f"raphael_fault_cache_{os.getpid()}")
ENV = {**os.environ, "JAX_COMPILATION_CACHE_DIR": _CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _cli(workdir: str, extra=(), timeout=600, **kw):
    args = [sys.executable, "-m", "raphael_jax.cli.train", "--config", CONFIG, "--workdir", workdir]
    for s in SMALL + PROC:
        args += ["--set", s]
    return subprocess.run(args + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV,
                          **kw)


def _start(workdir: str, stderr_path: str) -> subprocess.Popen:
    """The command in the background; stderr to a file (a full pipe would block the child)."""
    args = [sys.executable, "-u", "-m", "raphael_jax.cli.train", "--config", CONFIG, "--workdir", workdir]
    for s in SMALL + PROC:
        args += ["--set", s]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(stderr_path, "w"), text=True,
                            env=ENV)


def _wait_for_step(proc: subprocess.Popen, step: int, timeout=600) -> list[str]:
    lines, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= step:
            return lines
    raise AssertionError(f"never reached step {step}: {''.join(lines)[-2000:]}")


def _losses(workdir: str) -> dict:
    """The last logged loss of every step (a resumed run logs the steps after its checkpoint again)."""
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def _final_weights(workdir: str):
    run = load_run(workdir)
    assert run.step == STEPS
    return [np.asarray(x) for x in jax.tree.leaves((run.params, run.ema_params))]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    proc = _cli(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield workdir
    import shutil
    shutil.rmtree(_CACHE, ignore_errors=True)


def test_sigterm_saves_at_the_step_and_the_same_command_resumes_identically(reference_run, tmp_path):
    workdir = str(tmp_path / "run")
    proc = _start(workdir, str(tmp_path / "stderr"))
    _wait_for_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    err = open(tmp_path / "stderr").read()
    assert proc.returncode == 143, err[-3000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert len(stopped) == 1 and "run the same command again to resume" in stopped[0], err[-2000:]
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert 3 <= step < STEPS
    assert str(step) in os.listdir(os.path.join(workdir, "checkpoints"))
    again = _cli(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {step}" in again.stdout
    ref, got = _losses(reference_run), _losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == ref[s] for s in got), (got, ref)  # equal as floats, every step
    for a, b in zip(_final_weights(reference_run), _final_weights(workdir), strict=True):
        assert np.array_equal(a, b)


def test_kill_9_at_random_moments_resumes_bit_identically(reference_run, tmp_path):
    workdir = str(tmp_path / "run")
    rng = random.Random(int(os.environ.get("RAPHAEL_FAULT_SEED", "0")))
    kills = 0
    for target in (2, 5):  # two crashes: the kill lands anywhere in the steps after `target` (saves included)
        proc = _start(workdir, str(tmp_path / f"stderr{target}"))
        _wait_for_step(proc, target)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.communicate(timeout=60)
        kills += proc.returncode == -signal.SIGKILL
    assert kills >= 1
    final = _cli(workdir)
    assert final.returncode == 0, final.stderr[-3000:]
    ref, got = _losses(reference_run), _losses(workdir)
    assert all(got[s] == ref[s] for s in got), (got, ref)
    for a, b in zip(_final_weights(reference_run), _final_weights(workdir), strict=True):
        assert np.array_equal(a, b)
