"""``bench/moe_train.py``: argument checks, and a smoke run at the smallest settings writing its markdown report."""
import math
import os
import subprocess
import sys

import pytest
from scriptload import load_script

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "bench", "moe_train.py")
# one RAPHAEL block level (16x16 after the 2x2 stem), no edge head: the smallest train step of the tiny config
SMALLEST = ["model.channels=(8,)", "model.block_levels=(1,)", "model.self_attention_levels=(0,)",
            "model.head_dim=8", "text.width=16", "model.context_dim=16", "text.num_layers=1", "train.batch_size=2"]


def test_rejects_bad_arguments():
    bench = load_script("moe_train")
    with pytest.raises(SystemExit, match="experts=0 is a baseline"):
        bench.main(["--experts", "0,2"])
    with pytest.raises(SystemExit, match="repeat"):
        bench.main(["--experts", "2", "--baselines", "experts=2"])


def _table(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("experts=0", "experts=1", "experts=2", "dense"):
            rows[cells[0]] = cells
    return rows


def test_smoke_run_writes_report(tmp_path):
    out = tmp_path / "moe_train.md"
    cmd = [sys.executable, SCRIPT, "--config", os.path.join(ROOT, "configs", "tiny.py") + ":no_edge",
           "--experts", "1,2", "--baselines", "experts=0", "--rounds", "2", "--warmup", "1", "--fast-compile",
           "--out", str(out), "--note", "pytest"]
    for s in SMALLEST:
        cmd += ["--set", s]
    # one device, as on the benchmark machine (tests/conftest.py asks for 8 virtual CPU devices)
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "also running: pytest" in text and "(1 devices)" in text and "--fast-compile" in text
    assert "+24% inference" in text and "no experts=6 row" in text
    rows = _table(text)
    assert set(rows) == {"experts=0", "experts=1", "experts=2"}
    # variant | params | GFLOP | median ms | IQR | time vs experts=0 | FLOPs vs experts=0
    assert all(len(r) == 7 for r in rows.values())
    params = {v: int(r[1].replace(",", "")) for v, r in rows.items()}
    flops = {v: float(r[2]) for v, r in rows.items()}
    ms = {v: float(r[3]) for v, r in rows.items()}
    assert all(p > 0 for p in params.values()) and params["experts=2"] > params["experts=1"]
    assert all(math.isfinite(t) and t > 0 for t in ms.values())
    assert 0 < flops["experts=1"] < flops["experts=2"]
    assert rows["experts=0"][5] == rows["experts=0"][6] == "1.000"
    for v in ("experts=1", "experts=2"):
        assert float(rows[v][5]) == pytest.approx(ms[v] / ms["experts=0"], rel=0.01, abs=2e-3)
        assert float(rows[v][6]) == pytest.approx(flops[v] / flops["experts=0"], rel=0.01, abs=2e-3)
