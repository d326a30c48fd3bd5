"""Two local processes x 4 CPU devices joined by jax.distributed on 127.0.0.1 (launch/local_multihost.sh).

Run 1 trains a few steps with the experts sharded across the process boundary (mesh expert 4 x
tensor 2: experts 0-1 live on process 0, 2-3 on process 1, so the time-MoE all-to-all crosses it)
and checkpoints; run 2 restores the middle checkpoint onto a different mesh (data 2 x fsdp 2 x
expert 2) and must continue with the same losses.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

# LLVM-only options: compile 2-3x faster on XLA:CPU, the same program
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
LAUNCH = os.path.join(ROOT, "launch", "local_multihost.sh")
SETS = ["model.channels=(16, 32)", "model.block_levels=(0, 1)", "model.self_attention_levels=(0, 1)",
        "model.mid_block=False", "model.edge.num_layers=2", "text.num_layers=1", "model.head_dim=8",
        "text.width=32", "model.context_dim=32", "train.batch_size=16",
        "train.log_every=1", "train.checkpoint_every=2", "train.sample_every=0", "train.warmup_steps=2",
        "train.max_to_keep=3", "parallel.time_capacity_factor=0"]


def train(workdir, mesh, steps, timeout=900):
    args = [sys.executable, "-m", "raphael_jax.cli.train", "--workdir", str(workdir), "--steps", str(steps),
            "--config", os.path.join(ROOT, "configs", "tiny.py")]
    for s in SETS + [f"parallel.mesh.{a}={mesh.get(a, 1)}" for a in ("data", "fsdp", "expert", "tensor")]:
        args += ["--set", s]
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    # own session: on a timeout the launcher and both trainers are stopped together
    proc = subprocess.Popen(["bash", LAUNCH, "-n", "2", "-d", "4", "--", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"multi-process run timed out after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, out[-4000:] + err[-4000:]
    return out


def losses(workdir):
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        r = json.loads(line)
        out[r["step"]] = r["loss"]  # the last record of a step wins (resumed runs append)
    return out


@pytest.mark.slow
def test_two_processes_expert_parallel_checkpoint_and_reshard(tmp_path):
    w1, w2 = tmp_path / "run", tmp_path / "resharded"
    log1 = train(w1, {"expert": 4, "tensor": 2}, steps=4)
    assert "[p0] " in log1 and "[p1] " in log1
    assert "expert 4 x tensor 2 (8 devices)" in log1 and "2 processes" in log1
    assert os.path.exists(w1 / "metrics.jsonl") and not os.path.exists(w1 / "metrics.jsonl.1")
    steps = sorted(int(d) for d in os.listdir(w1 / "checkpoints") if d.isdigit())
    assert steps == [2, 4]
    # restore step 2 onto another mesh shape and continue
    shutil.copytree(w1, w2)
    shutil.rmtree(w2 / "checkpoints" / "4")
    log2 = train(w2, {"data": 2, "fsdp": 2, "expert": 2}, steps=4)
    assert "resumed from step 2" in log2 and "data 2 x fsdp 2 x expert 2" in log2
    a, b = losses(w1), losses(w2)
    assert sorted(a) == [1, 2, 3, 4]
    for s in (3, 4):
        assert abs(a[s] - b[s]) <= 1e-5 * max(1.0, abs(a[s])), (s, a[s], b[s])


# --- failures and preemption across processes (docs/RELIABILITY.md) --------------------------------------

def _start_direct(workdir, i, port, log, extra=(), steps=30):
    """Process ``i`` of 2, started as a cluster would (no launcher that stops the others when one fails):
    one device each (mesh data 2), a 10 s heartbeat timeout, the persistent compilation cache shared."""
    args = [sys.executable, "-u", "-m", "raphael_jax.cli.train", "--workdir", str(workdir), "--steps", str(steps),
            "--config", os.path.join(ROOT, "configs", "tiny.py")]
    for s in SETS + ["parallel.mesh.data=2", "train.checkpoint_every=100"] + list(extra):
        args += ["--set", s]
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS="cpu", RAPHAEL_COORDINATOR=f"127.0.0.1:{port}",
               RAPHAEL_NUM_PROCESSES="2", RAPHAEL_PROCESS_ID=str(i), RAPHAEL_LOCAL_DEVICES="1",
               RAPHAEL_HEARTBEAT_TIMEOUT="10", JAX_COMPILATION_CACHE_DIR=str(workdir) + "_jax_cache",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_logged(log, step, procs, timeout=900):
    import time

    t0 = time.time()
    while f"step {step:6d}/" not in open(log).read():
        if time.time() - t0 > timeout or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail(f"step {step} never logged:\n{open(log).read()[-3000:]}")
        time.sleep(0.3)


def _wait_exit(proc, seconds):
    """The exit status, and the seconds it took; fails the test (killing it) past ``seconds``."""
    import time

    t0 = time.time()
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"a process still ran {seconds} s after its peer failed (it should stop, not hang)")
    return proc.returncode, time.time() - t0


@pytest.mark.slow
def test_two_processes_agree_on_preemption_and_stop_when_one_fails(tmp_path):
    run = tmp_path / "run"
    logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
    # 1. SIGTERM to process 1 only: both stop at the same step, save it together and exit 143.
    port = _free_port()
    procs = [_start_direct(run, i, port, logs[i]) for i in range(2)]
    _wait_logged(logs[0], 3, procs)
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
        assert _wait_exit(p, 300)[0] == 143
    stopped = [[x for x in open(log).read().splitlines() if x.startswith("stopped by SIGTERM at step")] for log in logs]
    assert all(len(s) == 1 for s in stopped), [open(log).read()[-2000:] for log in logs]
    step = int(stopped[0][0].split("at step ")[1].split(":")[0])
    assert stopped[0] == stopped[1] and str(step) in os.listdir(run / "checkpoints")
    # 2. The same command resumes; process 1 is killed (-9) mid-run: process 0 stops at once with a message.
    port = _free_port()
    procs = [_start_direct(run, i, port, logs[i]) for i in range(2)]
    _wait_logged(logs[0], step + 2, procs)
    assert f"resumed from step {step}" in open(logs[0]).read()
    procs[1].kill()
    status, seconds = _wait_exit(procs[0], 120)
    out = open(logs[0]).read()
    # a collective that loses its peer fails at once (our line, exit 1); killed outside one, process 0 is
    # stopped by the coordination service after the heartbeat timeout (jax's line)
    ours = "raphael-train: error: process 0 of 2: another process failed or stopped answering"
    assert status != 0 and (ours in out or "another task died" in out), (status, out[-3000:])
    # 3. Process 1 fails at start (a bad value on its command line): process 0 stops within the heartbeat
    #    timeout (10 s here) with jax's message instead of waiting for it.
    port = _free_port()
    procs = [_start_direct(tmp_path / "run2", 0, port, logs[0]),
             _start_direct(tmp_path / "run2", 1, port, logs[1], extra=["train.batch_size=abc"])]
    assert _wait_exit(procs[1], 120)[0] == 2
    status, seconds = _wait_exit(procs[0], 120)
    assert status != 0 and "another task died" in open(logs[0]).read(), open(logs[0]).read()[-3000:]
    assert "train.batch_size takes a int" in open(logs[1]).read().strip().splitlines()[-1]
