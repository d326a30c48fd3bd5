#!/usr/bin/env bash
# The ControlNet measurement (docs/FINETUNE.md, docs/RESULTS.md): train a ControlNet on a trained tiny run with the
# scenes' edge maps as control (configs/tiny_control.py), then score 200 place-free prompts of 1-2 objects drawn
# from their scenes' edge maps, the same with other colours, and at control scale 0 (the base).
#
#   launch/tiny_control.sh BASE OUT       # e.g. runs/tiny runs/tiny_control
#
# Environment: SEED (1234, the test seed), STEPS (config train.num_steps), PYTHON (python).
set -euo pipefail
if [[ $# -ne 2 ]]; then sed -n '2,7p' "$0"; exit 2; fi
BASE=$1
OUT=$2
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SEED=${SEED:-1234}
t0=$(date +%s)
$PY -m raphael_jax.cli.train --config configs/tiny_control.py --workdir "$OUT" --set "train.init_from=$BASE" \
    ${STEPS:+--set "train.num_steps=$STEPS"}
echo "[tiny_control] trained after $(( $(date +%s) - t0 )) s"
$PY -m raphael_jax.cli.eval control --workdir "$OUT" --seed "$SEED"
echo "[tiny_control] scored after $(( $(date +%s) - t0 )) s"
$PY -m raphael_jax.cli.eval report control "$OUT" --seed "$SEED" | tee "$OUT/report.md"
