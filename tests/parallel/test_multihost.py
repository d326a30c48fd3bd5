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
