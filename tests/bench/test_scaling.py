"""``bench/scaling.py``: the power-law fit, and a small end-to-end run writing its markdown and JSON reports."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from scriptload import load_script

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "bench", "scaling.py")
# The smallest model of the tests (tests/analysis/test_ablate.py's shape, with self-attention on level 1) without
# the space-MoE (the costliest part to compile: ~40% of the step's compile time), so that three train steps
# compile in test time; the chunked attention checks that --set reaches the model.
CONFIG = os.path.join(ROOT, "configs", "tiny.py") + ":no_space_moe"
SMALL = ["model.channels=(8, 16)", "model.block_levels=(0, 1)", "model.self_attention_levels=(0, 1)",
         "model.mid_block=False", "model.head_dim=8", "text.width=16", "model.context_dim=16", "text.num_layers=1",
         "model.edge.channels=4", "model.edge.num_layers=2", "model.attention=chunked"]


def _slope_by_formula(xs, ys) -> float:
    """The least-squares slope of log y on log x as cov / var (independent of the script's lstsq)."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum())


@pytest.mark.parametrize("exponent,prefactor", [(1.7, 3.5), (2.0, 1e-3), (0.5, 40.0), (-1.0, 2.0), (4.0, 1e-9)])
def test_fit_recovers_known_power_law(exponent, prefactor):
    bench = load_script("scaling")
    xs = [32, 64, 128, 256]
    ys = [prefactor * x**exponent for x in xs]
    fit = bench.fit_power_law(xs, ys)
    assert fit["exponent"] == pytest.approx(exponent, abs=1e-9)
    assert fit["prefactor"] == pytest.approx(prefactor, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    # the inverse relation has the reciprocal exponent
    assert bench.fit_power_law(ys, xs)["exponent"] == pytest.approx(1.0 / exponent, rel=1e-9)


def test_fit_is_least_squares_on_log_log():
    bench = load_script("scaling")
    rng = np.random.default_rng(3)
    xs = np.array([4.0, 8.0, 16.0, 32.0, 64.0])
    ys = 0.2 * xs**1.3 * np.exp(rng.normal(0, 0.1, xs.shape))  # multiplicative noise
    fit = bench.fit_power_law(xs, ys)
    assert fit["exponent"] == pytest.approx(_slope_by_formula(xs, ys), abs=1e-12)
    assert abs(fit["exponent"] - 1.3) < 0.2 and 0.9 < fit["r2"] < 1.0
    # not a fit on the linear scale: a straight line through (x, y) has a different slope
    assert abs(fit["exponent"] - np.polyfit(xs, ys, 1)[0]) > 0.1
    # y = x + x^2 is no power law: its local exponent runs from ~1 to ~2, the fit lies between, R^2 < 1
    xs2 = np.array([0.01, 0.1, 1.0, 10.0, 100.0])
    mixed = bench.fit_power_law(xs2, xs2 + xs2**2)
    assert 1.0 < mixed["exponent"] < 2.0 and mixed["r2"] < 0.999


@pytest.mark.parametrize("xs,ys", [([32], [1.0]), ([32, 32], [1.0, 2.0]), ([32, 64], [1.0, 0.0]),
                                   ([32, 64], [1.0, -2.0]), ([32, 64], [1.0, float("nan")]),
                                   ([0, 64], [1.0, 2.0]), ([32, 64, 128], [1.0, 2.0])])
def test_fit_rejects_what_it_cannot_fit(xs, ys):
    bench = load_script("scaling")
    with pytest.raises(ValueError):
        bench.fit_power_law(xs, ys)


def test_points_are_measured_once_and_arguments_parsed():
    bench = load_script("scaling")
    assert bench.points_of([32, 64, 128], 8, [4, 8, 16, 32], 32) == \
        [(32, 8), (64, 8), (128, 8), (32, 4), (32, 16), (32, 32)]
    assert bench.parse_ints("16, 32", "--sizes") == [16, 32]
    for bad in ("16,x", "0,32", ""):
        with pytest.raises(SystemExit):
            bench.parse_ints(bad, "--sizes")


def _table_rows(text: str, ncells: int) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == ncells and cells[0].isdigit():
            rows.append(cells)
    return rows


def test_small_run_writes_report(tmp_path):
    out = tmp_path / "scaling.md"
    cmd = [sys.executable, SCRIPT, "--config", CONFIG, "--sizes", "16,32", "--fixed-batch", "2", "--batches", "2,4",
           "--fixed-size", "16", "--rounds", "2", "--warmup", "0", "--fast-compile", "--note", "pytest",
           "--out", str(out)]
    for s in SMALL:
        cmd += ["--set", s]
    # one CPU device, as a training run on a laptop (tests/conftest.py forces 8 virtual devices)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^\[\s*\d+\.\ds\] ", proc.stdout, re.M), "progress lines carry the elapsed seconds"
    assert "model.attention=chunked" in proc.stdout

    text = out.read_text()
    res = json.loads((tmp_path / "scaling.json").read_text())
    # machine, versions, note and the attention in effect are named
    assert "also running: pytest" in text and f"{os.cpu_count()} cores visible" in text
    assert f"jax {res['machine']['jax']}" in text and res["machine"]["cpu"] in text
    assert "model.attention=chunked (runs: self-attention chunked, cross-attention chunked" in text
    assert res["model_attention"] == "chunked" and "--fast-compile" in text
    assert "config: `configs/tiny.py:no_space_moe` with `--set model.channels=(8, 16)`" in text
    assert res["inits"] == 1  # no parameter depends on the image size or batch: one initialisation

    # one row per distinct point, in the JSON and the markdown table, with positive finite values
    pts = {(p["size"], p["batch"]): p for p in res["points"]}
    assert sorted(pts) == [(16, 2), (16, 4), (32, 2)]
    rows = _table_rows(text, 16)
    assert sorted((int(r[0]), int(r[1])) for r in rows) == sorted(pts)
    for r in rows:
        for cell in (r[2], r[4], r[5], r[6], r[7], r[8], r[10]):  # ms, ms/image, GFLOP, temp, args, outputs, total
            assert math.isfinite(float(cell)) and float(cell) > 0
        assert r[11] == r[12] == r[13] == r[14] == "-"  # no --rss: no child processes
    for p in pts.values():
        assert len(p["times_s"]) == 2 and all(math.isfinite(t) and t > 0 for t in p["times_s"])
        assert p["time_median_s"] > 0 and p["flops"] > 0
        assert all(p["xla"][k] > 0 for k in ("temp", "argument", "output", "total"))

    # memory and work grow with the image and the batch
    for key in ("temp", "total"):
        assert pts[(32, 2)]["xla"][key] > pts[(16, 2)]["xla"][key]
        assert pts[(16, 4)]["xla"][key] > pts[(16, 2)]["xla"][key]
    assert pts[(32, 2)]["flops"] > 2 * pts[(16, 2)]["flops"]   # 4x the pixels
    assert pts[(16, 4)]["flops"] > 1.5 * pts[(16, 2)]["flops"]  # 2x the images (+ a fixed optimizer update)

    # the exponents are the log-log slopes of the reported numbers, and written to the markdown
    fits = res["fits"]
    for curve, axis, ks in (("size", 0, [(16, 2), (32, 2)]), ("batch", 1, [(16, 2), (16, 4)])):
        xs = [k[axis] for k in ks]
        expect = {"time": [pts[k]["time_median_s"] for k in ks], "flops": [pts[k]["flops"] for k in ks],
                  "xla_temp": [pts[k]["xla"]["temp"] for k in ks], "xla_total": [pts[k]["xla"]["total"] for k in ks]}
        for q, ys in expect.items():
            assert fits[curve][q]["exponent"] == pytest.approx(_slope_by_formula(xs, ys), abs=1e-9), (curve, q)
        assert fits[curve]["rss_peak_step"] is None and fits[curve]["rss_step_increase"] is None  # not measured
        assert fits[curve]["xla_temp"]["exponent"] > 0
    assert fits["size"]["flops"]["exponent"] > 1.0  # convolutions alone: 2 per side doubling
    assert 0.5 < fits["batch"]["flops"]["exponent"] <= 1.0 + 1e-6
    exp_rows = {r[0]: r for r in ([c.strip() for c in line.strip().strip("|").split("|")]
                                  for line in text.splitlines()) if len(r) == 9}
    size_row = next(v for k, v in exp_rows.items() if k.startswith("side (batch 2)"))
    batch_row = next(v for k, v in exp_rows.items() if k.startswith("batch (side 16 px)"))
    assert size_row[2].startswith(f"a = {fits['size']['time']['exponent']:.2f}")
    assert size_row[4].startswith(f"b = {fits['size']['xla_temp']['exponent']:.2f}")
    assert batch_row[2].startswith(f"c = {fits['batch']['time']['exponent']:.2f}")
    assert batch_row[5].startswith(f"d = {fits['batch']['xla_total']['exponent']:.2f}")
