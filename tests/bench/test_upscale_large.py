"""``bench/upscale_large.py``: a smoke run on a small picture writes its report with the output size, the tile
count and a peak RSS."""
import os
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_smoke_run_writes_report(tmp_path):
    out = tmp_path / "upscale_large.md"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "upscale_large.py"), "--size", "40x24", "--tile", "24",
           "--halo", "4", "--preset", "RealESRGAN_x4plus_anime_6B", "--out", str(out), "--note", "pytest"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "40x24 -> 160x96" in text and "6 blocks" in text
    assert re.search(r"Tiles: 2 windows of 24 px", text), text
    peak = float(re.search(r"\| ([\d.]+) GiB \|", text).group(1))
    assert 0.05 < peak < 6
