"""``bench/finetune_step.py``: a smoke run at the smallest settings writes its report with every variant, the
LoRA ranks training fewer parameters the lower the rank."""
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SMALLEST = ["model.channels=(8, 16)", "model.block_levels=(0, 1)", "model.self_attention_levels=(0, 1)",
            "model.head_dim=8", "text.width=16", "model.context_dim=16", "text.num_layers=1", "train.batch_size=2"]


def test_smoke_run_writes_report(tmp_path):
    out = tmp_path / "finetune_step.md"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "finetune_step.py"), "--ranks", "1,2", "--rounds", "1",
           "--warmup", "0", "--out", str(out), "--note", "pytest"]
    for s in SMALLEST:
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.read_text().splitlines() if line.startswith("| ") and "variant" not in line}
    assert set(rows) == {"full fine-tuning", "LoRA rank 1", "LoRA rank 2", "ControlNet"}
    n = {k: int(v[0].replace(",", "")) for k, v in rows.items()}
    assert n["LoRA rank 1"] < n["LoRA rank 2"] < n["ControlNet"] < n["full fine-tuning"]
    assert rows["full fine-tuning"][4] == "1.000" and all(float(v[2]) > 0 for v in rows.values())
