#!/usr/bin/env bash
# The LoRA measurement (docs/FINETUNE.md, docs/RESULTS.md): fine-tune a trained tiny run on 32 ring images
# (configs/tiny_ring.py) with LoRA ranks 1, 4, 16 and with full fine-tuning at the same budget, then score
# each (and the base) on 200 ring prompts in unseen colours/places and 200 retention prompts.
#
#   launch/finetune_ring.sh BASE OUT      # e.g. runs/tiny runs/ring
#
# Environment: SEED (1234, the test seed; the learning rates were chosen on seed 99), FULL_LR (1e-4),
# LORA_LR (from configs/tiny_ring.py), TARGETS (lora.targets, as a Python tuple), PYTHON (python).
set -euo pipefail
if [[ $# -ne 2 ]]; then sed -n '2,9p' "$0"; exit 2; fi
BASE=$1
OUT=$2
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SEED=${SEED:-1234}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[finetune_ring] $1 after $(( $(date +%s) - t0 )) s"; }
common=(--config configs/tiny_ring.py --set "train.init_from=$BASE")
[[ -n "${TARGETS:-}" ]] && common+=(--set "lora.targets=$TARGETS")
[[ -n "${LORA_LR:-}" ]] && common+=(--set "train.learning_rate=$LORA_LR")
for r in 1 4 16; do
    $PY -m raphael_jax.cli.train "${common[@]}" --workdir "$OUT/lora$r" --set "lora.rank=$r"
    stamp "LoRA rank $r trained"
done
$PY -m raphael_jax.cli.train --config configs/tiny_ring.py --set "train.init_from=$BASE" --workdir "$OUT/full" \
    --set lora.rank=0 --set "train.learning_rate=${FULL_LR:-1e-4}"
stamp "full fine-tuning trained"
for wd in "$OUT/lora1" "$OUT/lora4" "$OUT/lora16" "$OUT/full"; do
    $PY -m raphael_jax.cli.eval subject --workdir "$wd" --seed "$SEED"
done
$PY -m raphael_jax.cli.eval subject --workdir "$BASE" --subject-of "$OUT/lora4" --seed "$SEED"
stamp "scored"
$PY -m raphael_jax.cli.eval report subject "$BASE" "$OUT/lora1" "$OUT/lora4" "$OUT/lora16" "$OUT/full" --seed "$SEED" \
    | tee "$OUT/report.md"
