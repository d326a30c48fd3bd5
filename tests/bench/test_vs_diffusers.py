"""``bench/vs_diffusers.py``: the matched shapes, and a tiny end-to-end run writing its markdown report."""
import math
import os
import subprocess
import sys

import pytest
from scriptload import load_script

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "bench", "vs_diffusers.py")


def test_parse_shapes():
    bench = load_script("vs_diffusers")
    assert bench.parse_shapes("32x32:32,64x64:4") == [(32, 32), (64, 4)]
    with pytest.raises(SystemExit, match="square"):
        bench.parse_shapes("32x64:2")
    with pytest.raises(SystemExit, match="HxW:BATCH"):
        bench.parse_shapes("32:2")


@pytest.mark.parametrize("small", [False, True])
def test_diffusers_heads_have_our_head_width(small):
    bench = load_script("vs_diffusers")
    d = bench.dims(small)
    kw = bench.diffusers_kwargs(32, d)
    # diffusers reads attention_head_dim as the number of heads per level
    assert [c // h for c, h in zip(kw["block_out_channels"], kw["attention_head_dim"], strict=True)] == \
        [d["head_dim"]] * len(d["channels"])
    ov = bench.our_overrides(32, d, "chunked", 64)
    assert f"model.head_dim={d['head_dim']}" in ov and "model.attention=chunked" in ov


def _row(text: str, label: str, model: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == [label, model]:
            return cells
    raise AssertionError(f"no table row for {label} / {model} in:\n{text}")


def test_tiny_run_writes_report(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    out = tmp_path / "vs.md"
    # one torch thread: OpenMP's spinning barriers stall for whole time slices on a loaded machine
    cmd = [sys.executable, SCRIPT, "--small", "--shapes", "16x16:2", "--rounds", "1", "--warmup", "1",
           "--threads", "1", "--no-rss", "--out", str(out), "--note", "pytest"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "also running: pytest" in text and "torch.set_num_threads(1)" in text
    if (os.cpu_count() or 1) > 1:
        assert "XLA is NOT limited" in text
    ours, theirs = _row(text, "16x16:2", "ours (raphael_jax)"), _row(text, "16x16:2", "diffusers")
    p_ours, p_theirs = float(ours[2]), float(theirs[2])
    assert p_ours > 0 and p_theirs > 0
    assert abs(p_ours - p_theirs) / p_theirs <= 0.10
    # 16 x 16 self-attention runs the looping ``blocked`` kernel here, whose body XLA counts once: our FLOPs
    # come from the loop-free twin, so they are of the size of diffusers' (which count matmuls, convolutions
    # and attention only; ours count every op)
    assert "counted on the model.attention=xla twin" in proc.stderr + proc.stdout
    assert 0.9 <= float(ours[3]) / float(theirs[3]) <= 1.5, (ours[3], theirs[3])
    for row in (ours, theirs):
        assert float(row[3]) > 0 and float(row[6]) > 0         # train / sample GFLOP
        assert float(row[4]) > 0 and float(row[7]) > 0         # median ms
        assert row[9] == "-"                                   # --no-rss: no child processes (CI time)
    ratios = next(c for c in ([c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines())
                  if len(c) == 6 and c[0] == "16x16:2")
    assert all(math.isfinite(float(x)) and float(x) > 0 for x in ratios[1:])
