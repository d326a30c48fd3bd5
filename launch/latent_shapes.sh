#!/usr/bin/env bash
# The latent shapes world (README "The latent shapes world", docs/RESULTS.md section 6): proves the latent path learns.
#
#   launch/latent_shapes.sh OUT            # e.g. runs/latent_shapes; needs the test extra (torch) for the CLIP
#
# 1. raphael-train-vae: the project's own KL autoencoder on 64 px shapes-world images (factor 4,
#    latents 16x16x4, scaling factor from the latents' std), saved in the diffusers layout.
# 2. raphael-data shapes-folder: NUM images as a LAION-style folder (PNG + caption .txt + metadata.jsonl).
# 3. a CLIP-layout text tower with random weights (transformers save_pretrained, safetensors) and a
#    BPE vocabulary with one token per world word (raphael_jax.tools.tiny_clip, data.shapes.clip_vocab).
# 4. raphael-data image-text (one 64x64 bucket) -> raphael-precompute (that VAE and CLIP) ->
#    raphael-train --config configs/latent_shapes.py -> raphael-eval alignment (200 single-object prompts).
# Environment: NUM (12000 images), VAE_STEPS / TRAIN_STEPS (empty: the defaults), PYTHON (python).
set -euo pipefail
if [[ $# -ne 1 ]]; then sed -n '2,14p' "$0"; exit 2; fi
OUT=$1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[latent_shapes] $1 after $(( $(date +%s) - t0 )) s"; }
[[ -f "$OUT/vae/config.json" ]] || $PY -m raphael_jax.cli.train_vae --out "$OUT/vae" ${VAE_STEPS:+--steps "$VAE_STEPS"}
stamp "autoencoder"
[[ -f "$OUT/folder/metadata.jsonl" ]] || $PY -m raphael_jax.cli.data shapes-folder "$OUT/folder" --num "${NUM:-12000}" --image-size 64
[[ -f "$OUT/clip/config.json" ]] || $PY - "$OUT" <<'PYEOF'
import sys
from raphael_jax.data.shapes.clip_vocab import write_clip_vocab
from raphael_jax.tools.tiny_clip import write_random_clip
out = sys.argv[1]
write_clip_vocab(f"{out}/vocab")
write_random_clip(f"{out}/clip", f"{out}/vocab", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)
PYEOF
BUILD="$OUT/tfds/image_text/shapes64/1.0.0"
[[ -d "$BUILD" ]] || $PY -m raphael_jax.cli.data image-text "$OUT/folder" --data-dir "$OUT/tfds" --name shapes64 \
    --buckets 64x64 --min-aesthetic -1 --max-watermark -1
stamp "data"
SETS=(--set "data.tfds_dir=$BUILD" --set "data.vae_dir=$OUT/vae" --set "data.clip_dir=$OUT/clip"
      --set "data.latents_dir=$OUT/latents")
ls "$OUT"/latents/done-* >/dev/null 2>&1 || $PY -m raphael_jax.cli.precompute --config configs/latent_shapes.py "${SETS[@]}" \
    --batch-size 64 --store-dtype float16
stamp "precompute"
$PY -m raphael_jax.cli.train --config configs/latent_shapes.py --workdir "$OUT/run" "${SETS[@]}" \
    ${TRAIN_STEPS:+--set "train.num_steps=$TRAIN_STEPS"}
stamp "latent model"
$PY -m raphael_jax.cli.eval alignment --workdir "$OUT/run" --objects 1
stamp "evaluation"
