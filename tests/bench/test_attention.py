"""``bench/attention.py``: a small end-to-end run writes its table with every kernel, gradients checked."""
import os
import re

from scriptload import load_script


def test_attention_bench_small_run(tmp_path):
    out = tmp_path / "attention.md"
    assert load_script("attention").main(["--shape", "2x48x2x8", "--chunk", "16", "--rounds", "2",
                                          "--threads", "1", "--note", "smoke", "--out", str(out)]) == 0
    text = out.read_text()
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^\| (jax [^|]+|torch [^|]+) \| (\d+) \| ([\d.]+)x \| "
                                                             r"(\d*) \| ([\d.e+-]+) \|$", text, re.M)}
    assert set(rows) == {"jax xla", "jax chunked (chunk 16)", "jax blocked (chunk 16)", "torch sdpa (fused)",
                         "torch explicit softmax"}, text
    assert rows["jax xla"][1] == "1.00"
    for name, (_, _, temp, diff) in rows.items():
        assert float(diff) < 1e-4, (name, diff)  # every kernel's gradients equal jax xla's
        assert (temp != "") == name.startswith("jax"), name
    assert "B 2, N 48, H 2, D 8" in text and "smoke" in text and os.cpu_count() is not None
