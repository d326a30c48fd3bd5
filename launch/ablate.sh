#!/usr/bin/env bash
# The paper's Fig. 6 ablations on the captioned-shapes world (raphael_jax.analysis.ablate).
#
#   launch/ablate.sh                                  # everything: Fig. 6b components, dense, experts, alpha, T_c
#   VARIANTS=fig6b STEPS=1000 launch/ablate.sh        # a subset at a smaller budget
#   MULTI=1 launch/ablate.sh                          # then continue every variant on 1-3 object scenes
#
# Re-run the same command after an interruption: each variant resumes from its checkpoints, finished
# runs are skipped and evaluations are cached per (variant, guidance) in <root>/<variant>/eval/.
# Extra arguments go to raphael-ablate (e.g. --list to see what is done, --report-only).
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=${ROOT:-runs/ablate}
VARIANTS=${VARIANTS:-all}
STEPS=${STEPS:-}                      # empty: the config's own budget (configs/tiny.py: 2400); equal for every variant
NUM_PROMPTS=${NUM_PROMPTS:-200}      # held-out prompts per object count
GUIDANCE=${GUIDANCE:-1.5,3,4.5,6,7.5,9}
DOCS=${DOCS:-docs/ablations}
SEED=${SEED:-0}                      # configs/base.py's seed: the `full` variant is then the README's main run
OBJECTS=${OBJECTS:-1}                # stage 1 trains on single-object scenes; stage 2 evaluates 1,2,3

# stage 1: single-object scenes (configs/tiny.py)
raphael-ablate --root "$ROOT/tiny" --config configs/tiny.py --variants "$VARIANTS" ${STEPS:+--steps "$STEPS"} \
  --seed "$SEED" --num-prompts "$NUM_PROMPTS" --objects "$OBJECTS" --guidance "$GUIDANCE" --docs "$DOCS/tiny" "$@"

# stage 2 (MULTI=1): 1-3 object scenes, each variant started from its stage-1 run (configs/tiny_multi.py)
if [[ "${MULTI:-0}" == "1" ]]; then
  raphael-ablate --root "$ROOT/tiny_multi" --config configs/tiny_multi.py --variants "$VARIANTS" \
    ${MULTI_STEPS:+--steps "$MULTI_STEPS"} --seed "$SEED" --init-from-root "$ROOT/tiny" --num-prompts "$NUM_PROMPTS" \
    --guidance "$GUIDANCE" --docs "$DOCS/tiny_multi" "$@"
fi
