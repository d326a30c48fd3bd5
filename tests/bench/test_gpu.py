"""``bench/gpu.py``: the package check and its one-line message, the batch search, the peak table, the
fused-attention FLOP estimate, ``bench/gpu.sh``'s carried wheels, and the ``--dry-run`` end to end on CPU."""
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile

import pytest
from scriptload import load_script

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "bench", "gpu.py")
WRAPPER = os.path.join(ROOT, "bench", "gpu.sh")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device is enough here
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")}, **extra)
    return env


# --- packages ---------------------------------------------------------------------------------

def test_missing_modules_finds_only_the_absent_one():
    bench = load_script("gpu")
    req = [("os", "os", True), ("raphael_no_such_module_4711", "raphael-no-such-pkg", True)]
    assert bench.missing_modules(req) == [("raphael_no_such_module_4711", "raphael-no-such-pkg", True)]
    assert bench.missing_modules([("json", "json", True)]) == []


def test_missing_message_is_one_line_with_the_recipe():
    bench = load_script("gpu")
    msg = bench.missing_message([("fake_pure_mod", "fake-pure>=1,<2", True), ("fake_bin_mod", "fake-bin", False)],
                                python="3.12", machine="x86_64")
    assert "\n" not in msg
    assert "fake_pure_mod (pip: fake-pure>=1,<2, pure Python)" in msg and "fake_bin_mod (pip: fake-bin, binary)" in msg
    assert "`pip download --no-deps -d runs/wheels 'fake-pure>=1,<2'`" in msg
    assert ("--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d runs/wheels fake-bin"
            in msg)
    assert "bash bench/gpu.sh" in msg and "pip install --no-index --no-deps runs/wheels/*.whl" in msg


def test_required_modules_cover_the_train_and_sampling_chain():
    """Every third-party top-level module the benchmark's import chain loads is in REQUIRED (or comes with jax,
    flax or optax), so a bare image fails at the check, not halfway through the run."""
    bench = load_script("gpu")
    # IPython blocked: treescope (a flax dependency) imports it when present, with a dozen modules of its own
    code = ("import sys; sys.modules['IPython'] = None; import jax, flax, optax, numpy, flax.nnx; "
            "base = {m.split('.')[0] for m in sys.modules}; "
            "import raphael_jax.config, raphael_jax.sampling, raphael_jax.tools.aot, raphael_jax.train.state, "
            "raphael_jax.train.step; from raphael_jax.config import load_config; "
            f"load_config({os.path.join(ROOT, 'configs', 'raphael_3b.py')!r} + ':dense'); "
            "new = {m.split('.')[0] for m in sys.modules} - base; "
            "print(' '.join(sorted(m for m in new if not m.startswith('_') and m not in sys.stdlib_module_names)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(out.stdout.split()) - {"raphael_jax"}
    required = {m for m, _, _ in bench.REQUIRED}
    assert loaded - required - {"treescope"} == set(), loaded
    assert {"ml_collections", "PIL"} <= required


def test_check_imports_fails_with_one_line_naming_a_required_fake_module():
    cmd = [sys.executable, SCRIPT, "--check-imports", "--require", "raphael_fake_mod_4711=raphael-fake-pkg"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "raphael_fake_mod_4711 (pip: raphael-fake-pkg" in lines[0]
    assert "pip download --no-deps -d runs/wheels raphael-fake-pkg" in lines[0]
    ok = subprocess.run([sys.executable, SCRIPT, "--check-imports"], cwd=ROOT, capture_output=True, text=True,
                        env=_env(), timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_wrapper_puts_carried_wheels_on_the_path(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "raphael_carried_4711-0.1-py3-none-any.whl", "w") as z:
        z.writestr("raphael_carried_4711/__init__.py", "VALUE = 1\n")
        z.writestr("raphael_carried_4711-0.1.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: raphael-carried-4711\nVersion: 0.1\n")
    env = _env(PYTHON=sys.executable)
    env.pop("PYTHONPATH")  # the wrapper sets it
    args = ["--check-imports", "--require", "raphael_carried_4711"]
    found = subprocess.run(["bash", WRAPPER, "--wheels", str(wheels), *args], cwd=tmp_path, capture_output=True,
                           text=True, env=env, timeout=300)
    assert found.returncode == 0, found.stdout + found.stderr
    assert (tmp_path / "wheels-unpacked" / "raphael_carried_4711" / "__init__.py").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = subprocess.run(["bash", WRAPPER, "--wheels", str(empty), *args], cwd=tmp_path, capture_output=True,
                             text=True, env=env, timeout=300)
    assert missing.returncode == 2 and "raphael_carried_4711" in missing.stderr


# --- batch search -----------------------------------------------------------------------------

GIB = 2**30


def test_search_batch_takes_the_largest_that_fits_and_skips_by_the_lower_bound():
    bench = load_script("gpu")
    compiled, ran, ooms = [], [], []
    # state 10 GiB; temporaries 6 GiB per sample: 32 -> 202 GiB, 16 -> 106, 8 -> 58 (but OOM at run), 4 -> 34
    limit = 100 * GIB

    def compile_fn(b):
        compiled.append(b)
        temp = 6 * GIB * b
        return f"exe{b}", {"peak_bytes": 10 * GIB + temp, "temp_bytes": temp, "batch_bytes": 0, "flops": 1.0}

    def run_fn(b, exe):
        assert exe == f"exe{b}"
        ran.append(b)
        if b == 8:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB")
        return {"step_times_s": [0.5]}

    b, result, records = bench.search_batch([4, 32, 8, 16, 2], compile_fn, run_fn, limit, lambda: 1e9,
                                            on_oom=lambda: ooms.append(1), say=lambda m: None)
    assert b == 4 and result == {"step_times_s": [0.5]}
    # 16's lower bound from 32 (10 + 192 * 16 / 32 = 106 GiB > 100) skips it uncompiled; 2 is never reached
    assert compiled == [32, 8, 4] and ran == [8, 4] and ooms == [1]
    by = {r["batch"]: r["result"] for r in records}
    assert by[32].startswith("does not fit (memory analysis")
    assert by[16].startswith("skipped")
    assert by[8].startswith("does not fit (RESOURCE_EXHAUSTED at run time")
    assert by[4] == "fits" and 2 not in by


def test_search_batch_without_a_limit_runs_the_largest_and_stops_when_time_runs_out():
    bench = load_script("gpu")
    compiled = []

    def compile_fn(b):
        compiled.append(b)
        time.sleep(0.01)
        return b, None  # no memory analysis: the candidate is run

    def run_fn(b, exe):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    clock = iter([100.0] + [0.0] * 10)  # the first candidate has time; then less is left than its compile took
    b, _, records = bench.search_batch([8, 4, 2], compile_fn, run_fn, None, lambda: next(clock),
                                       say=lambda m: None)
    assert b is None and compiled == [8]
    assert records[0]["result"].startswith("does not fit (RESOURCE_EXHAUSTED at run time")
    assert records[1]["result"].startswith("not tried") and records[2]["result"].startswith("not tried")


def test_search_batch_raises_errors_that_are_not_out_of_memory():
    bench = load_script("gpu")

    def compile_fn(b):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        bench.search_batch([2, 1], compile_fn, None, None, lambda: 1e9, say=lambda m: None)


# --- peaks and FLOPs --------------------------------------------------------------------------

@pytest.mark.parametrize("kind,tflops", [
    ("NVIDIA H200", 989), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA B200", 2250), ("NVIDIA L4", 121),
    ("NVIDIA H20", 148), ("NVIDIA L40S", 362),
])
def test_peak_table(kind, tflops):
    bench = load_script("gpu")
    peak, _ = bench.peak_flops(kind, None, dry_run=False)
    assert peak == pytest.approx(tflops * 1e12)


def test_peak_unknown_and_override():
    bench = load_script("gpu")
    assert bench.peak_flops("Some Future GPU", None, dry_run=False)[0] is None
    assert bench.peak_flops("Some Future GPU", 500.0, dry_run=False)[0] == pytest.approx(5e14)
    peak, src = bench.peak_flops("cpu", None, dry_run=True)
    assert peak > 0 and "nominal" in src


def test_fused_attention_flops_of_the_3b_layout():
    from raphael_jax.config import load_config

    bench = load_script("gpu")
    cfg = load_config(os.path.join(ROOT, "configs", "raphael_3b.py"))
    # 80x80 latents: levels of 6400 / 1600 / 400 / 100 positions at widths 384 / 768 / 1536 / 1536; RAPHAEL
    # blocks on levels 0-2 (2 down + 3 up each) and one in the middle (level 3); self-attention everywhere
    want = sum(4.0 * n * n * c * k for n, c, k in ((6400, 384, 5), (1600, 768, 5), (400, 1536, 5), (100, 1536, 1)))
    assert bench.fused_attention_fwd_flops(cfg.model, 80) == pytest.approx(want)


def test_out_paths():
    bench = load_script("gpu")
    assert bench.out_paths("/x/r.md", False) == ("/x/r.md", "/x/r.json")
    assert bench.out_paths("/x/dir", True) == ("/x/dir/gpu.md", "/x/dir/gpu.json")
    md, js = bench.out_paths(None, True)
    assert md.endswith(os.path.join("bench", "results", "gpu_dry_run.md")) and js.endswith("gpu_dry_run.json")


# --- the dry run ------------------------------------------------------------------------------

@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    import jax

    out = tmp_path / "res"
    cmd = [sys.executable, SCRIPT, "--dry-run", "--out", str(out), "--budget-s", "900"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads((out / "gpu.json").read_text())
    md = (out / "gpu.md").read_text()
    assert r["mode"] == "dry-run" and r["status"] == "done"
    assert r["machine"]["platform"] == "cpu" and r["machine"]["jax"] == jax.__version__
    peak = r["peak_flops"]
    assert peak > 0
    moe, dense = r["train"]["moe"], r["train"]["dense"]
    for t in (moe, dense):
        assert t["status"] == "ok", t
        assert t["batch"] in t["candidates"]
        results = {s["batch"]: s["result"] for s in t["search"]}
        assert results[t["batch"]] == "fits"
        assert all(res != "fits" for b, res in results.items() if b > t["batch"])
        times = t["step_times_s"]
        assert times and all(x > 0 for x in times)
        assert t["step_s_median"] == pytest.approx(statistics.median(times))
        assert t["img_per_s"] == pytest.approx(t["batch"] / t["step_s_median"], rel=1e-9)
        assert t["flops_per_step"] > 0
        assert t["mfu"] == pytest.approx(t["flops_per_step"] / t["step_s_median"] / peak, rel=1e-9)
        assert t["fused_attention_flops_est"] == 0  # XLA:CPU runs attention as einsums: XLA counts it
        assert t["mfu_incl_fused_attention"] == pytest.approx(t["mfu"], rel=1e-9)
        assert math.isfinite(t["loss_last"])
        assert t["latent"] == [8, 8, 4] and t["dtype"] == "bfloat16"
    assert sorted(moe["candidates"]) == [1, 2]
    assert dense["batch"] == moe["batch"] and dense["config"].endswith(":dense")
    d = r["ddim"]
    assert d["status"] == "ok" and d["steps"] == 2 and d["finite"] and d["vae_decode"] is False
    assert d["runs_s"] and d["latency_s_median"] == pytest.approx(statistics.median(d["runs_s"]))
    assert d["latency_s_median"] > 0
    assert r["goal"]["met"] == (moe["mfu"] >= 0.40)
    assert "Goal MFU >= 40%" in md and ("**met**" in md or "**unmet**" in md)
    assert f"| {moe['batch']} |" in md
