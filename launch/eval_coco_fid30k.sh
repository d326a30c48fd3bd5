#!/usr/bin/env bash
# COCO zero-shot FID-30k (the paper, Table 1) of a RAPHAEL run, on every host at once.
#
# Usage (same command on every host; one host works too):
#   launch/eval_coco_fid30k.sh WORKDIR [extra flags for raphael-eval coco-fid]
#
# Environment (defaults in brackets):
#   COCO_DIR      folder with annotations/captions_val2014.json and val2014/         [coco]
#   FID_WEIGHTS   FID Inception safetensors (docs/EVALUATION.md section 1)         [weights/fid_inception.safetensors]
#   REF_STATS     reference statistics .npz; computed from $COCO_DIR/val2014 and written there
#                 on the first run, read afterwards                               [$COCO_DIR/fid_stats_val2014_256.npz]
#   OUT           results: images/, generated_stats.npz, fid.json, captions.json   [$WORKDIR/eval/coco_fid30k]
#   NUM (30000), SEED (0: caption draw), GUIDANCE / STEPS (empty: the run's config), PYTHON (python)
#   CLIP_MODEL    optional transformers CLIPModel folder: also report the CLIP score
#
# Multi-host: jax.distributed is initialized from the environment (Cloud TPU pods and SLURM are
# detected; otherwise RAPHAEL_COORDINATOR / RAPHAEL_NUM_PROCESSES / RAPHAEL_PROCESS_ID). Each host
# generates its slice of the 30k captions on its local devices; features are gathered for the FID.
# OUT must be on storage every host can write (a shared disk, or gcsfuse); re-running the same
# command after a preemption reuses the images already written.
#
# Cloud TPU pod: set TPU_NAME and ZONE (and optionally PROJECT, REPO_DIR) and run this script from
# your workstation: it re-runs itself on every worker with `gcloud ... ssh --worker=all`.
#   TPU_NAME=my-v4-32 ZONE=us-central2-b COCO_DIR=/mnt/coco launch/eval_coco_fid30k.sh /mnt/runs/raphael
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,27p' "$0"
  exit 2
fi
WORKDIR=$1
shift

if [[ -n "${TPU_NAME:-}" ]]; then
  REPO_DIR=${REPO_DIR:-\~/raphael_jax}
  VARS="COCO_DIR=${COCO_DIR:-coco} FID_WEIGHTS=${FID_WEIGHTS:-weights/fid_inception.safetensors}"
  VARS+=" NUM=${NUM:-30000} SEED=${SEED:-0} GUIDANCE=${GUIDANCE:-} STEPS=${STEPS:-} PYTHON=${PYTHON:-python}"
  [[ -n "${REF_STATS:-}" ]] && VARS+=" REF_STATS=$REF_STATS"
  [[ -n "${OUT:-}" ]] && VARS+=" OUT=$OUT"
  [[ -n "${CLIP_MODEL:-}" ]] && VARS+=" CLIP_MODEL=$CLIP_MODEL"
  exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
    --command "cd $REPO_DIR && env $VARS launch/eval_coco_fid30k.sh $(printf '%q ' "$WORKDIR" "$@")"
fi

cd "$(dirname "$0")/.."
COCO_DIR=${COCO_DIR:-coco}
ARGS=(
  --workdir "$WORKDIR"
  --annotations "$COCO_DIR/annotations/captions_val2014.json"
  --coco-images "$COCO_DIR/val2014"
  --ref-stats "${REF_STATS:-$COCO_DIR/fid_stats_val2014_256.npz}"
  --inception-weights "${FID_WEIGHTS:-weights/fid_inception.safetensors}"
  --num "${NUM:-30000}"
  --seed "${SEED:-0}"
  --out "${OUT:-$WORKDIR/eval/coco_fid30k}"
)
[[ -n "${GUIDANCE:-}" ]] && ARGS+=(--guidance "$GUIDANCE")
[[ -n "${STEPS:-}" ]] && ARGS+=(--steps "$STEPS")
[[ -n "${CLIP_MODEL:-}" ]] && ARGS+=(--clip-model "$CLIP_MODEL")
exec "${PYTHON:-python}" -m raphael_jax.cli.eval coco-fid "${ARGS[@]}" "$@"
