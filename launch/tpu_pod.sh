#!/usr/bin/env bash
# Train RAPHAEL on a Cloud TPU VM slice: create (or reuse) the slice, ship the code to every worker,
# install, run the trainer on --worker=all and stream the logs here.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --type ACCELERATOR [--version RUNTIME] [--project P] [--spot]
#                     [--repo GIT_URL [--ref REF]] [--mount-bucket BUCKET] [--skip-install] [--dry-run]
#                     -- --config CONFIG --workdir WORKDIR [--set KEY=VALUE ...]
#
# Example (the paper model on a v5p-128 slice = 64 chips, FSDP 32 x expert 2, checkpoints on a
# gcsfuse-mounted bucket that every worker sees):
#   launch/tpu_pod.sh --name raphael-3b --zone us-east5-a --type v5p-128 --version v2-alpha-tpuv5 \
#       --mount-bucket my-bucket -- --config configs/raphael_3b.py --workdir /home/$USER/gcs/runs/raphael_3b \
#       --set parallel.mesh.data=1 --set parallel.mesh.fsdp=-1 --set parallel.mesh.expert=2 \
#       --set train.batch_size=2048 --set data.latents_dir=/home/$USER/gcs/latents
#   launch/tpu_pod.sh --dry-run --name raphael-3b --zone us-east5-a --type v5p-128 -- --config configs/raphael_3b.py \
#       --workdir /tmp/w                                  # prints every command instead of running it
#
# Steps: (1) `gcloud compute tpus tpu-vm describe` the slice, `create` it when missing; (2) copy the
# code: `git clone` of --repo/--ref on every worker, or (default) a tarball of this checkout sent
# with `tpu-vm scp --worker=all`; (3) on every worker: Python 3.11 venv, `pip install -e .` and
# jax[tpu] (skip with --skip-install), optional gcsfuse mount of --mount-bucket at ~/gcs; (4) run
# `raphael-train` on --worker=all (jax.distributed discovers the pod by itself; host 0 writes the
# logs, every host writes its checkpoint shards, so WORKDIR must be shared: the gcsfuse mount),
# streaming every worker's output to this terminal and to logs/tpu_NAME.log. Re-running the same
# command resumes from the latest checkpoint in WORKDIR. Delete the slice when done:
#   gcloud compute tpus tpu-vm delete NAME --zone ZONE
set -euo pipefail

name=""
zone=""
accel=""
version="tpu-ubuntu2204-base"
project=""
spot=0
repo=""
ref="main"
bucket=""
skip_install=0
dry_run=0
jax_pin="jax[tpu]>=0.9.2,<0.11"

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) accel="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --repo) repo="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --mount-bucket) bucket="$2"; shift 2 ;;
    --skip-install) skip_install=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (trainer arguments go after --)" >&2; exit 2 ;;
  esac
done
train_args=("$@")
if [[ -z "$name" || -z "$zone" || -z "$accel" ]]; then
  echo "tpu_pod.sh: --name, --zone and --type are required" >&2
  exit 2
fi
if [[ ${#train_args[@]} -eq 0 ]]; then
  echo "tpu_pod.sh: give the trainer's arguments after -- (at least --config and --workdir)" >&2
  exit 2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n "$project" ]]; then
  where+=(--project "$project")
fi

quote() {
  # one argument as the shell reads it back: bare when safe, else in single quotes
  local a=$1 q="'\\''"
  if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$a"
  else
    printf "'%s'" "${a//\'/$q}"
  fi
}

run() {
  # print the command (copy-pasteable); execute it unless --dry-run
  printf '+'
  local a
  for a in "$@"; do
    printf ' '
    quote "$a"
  done
  printf '\n'
  if [[ "$dry_run" -eq 0 ]]; then
    "$@"
  fi
}

on_all_workers() {
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$1"
}

# (1) create or reuse the slice
if [[ "$dry_run" -eq 1 ]] || ! "${gcloud_tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accel" --version "$version")
  if [[ "$spot" -eq 1 ]]; then
    create+=(--spot)
  fi
  if [[ "$dry_run" -eq 1 ]]; then
    echo "# (only when '${gcloud_tpu[*]} describe $name' fails)"
  fi
  run "${create[@]}"
else
  echo "tpu_pod.sh: reusing TPU VM $name"
fi

# (2) the code on every worker, at ~/raphael_jax
if [[ -n "$repo" ]]; then
  on_all_workers "rm -rf ~/raphael_jax && git clone --depth 1 --branch $(printf '%q' "$ref") $(printf '%q' "$repo") ~/raphael_jax"
else
  root=$(cd "$(dirname "$0")/.." && pwd)
  tarball="/tmp/raphael_jax_${name}.tar.gz"
  run tar -C "$root" --exclude=./runs --exclude=./.git --exclude='*.egg-info' --exclude=__pycache__ -czf "$tarball" .
  run "${gcloud_tpu[@]}" scp "$tarball" "$name:~/raphael_jax.tar.gz" "${where[@]}" --worker=all
  on_all_workers "rm -rf ~/raphael_jax && mkdir -p ~/raphael_jax && tar -C ~/raphael_jax -xzf ~/raphael_jax.tar.gz"
fi

# (3) install (Python 3.11 venv; TPU VM images ship 3.10)
if [[ "$skip_install" -eq 0 ]]; then
  on_all_workers "set -e; (command -v python3.11 >/dev/null || (sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv)); [ -d ~/venv ] || python3.11 -m venv ~/venv; ~/venv/bin/pip install -q -U pip; ~/venv/bin/pip install -q -e ~/raphael_jax '$jax_pin' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
fi
if [[ -n "$bucket" ]]; then
  on_all_workers "set -e; command -v gcsfuse >/dev/null || (export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s); echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list; curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -; sudo apt-get update -qq; sudo apt-get install -y -qq gcsfuse); mkdir -p ~/gcs; mountpoint -q ~/gcs || gcsfuse --implicit-dirs $(printf '%q' "$bucket") ~/gcs"
fi

# (4) train on every worker, streaming the logs
# (RAPHAEL_TPU_POD=1: maybe_initialize calls jax.distributed.initialize(), which finds the pod's
# coordinator in the TPU metadata)
quoted=$(printf ' %q' "${train_args[@]}")
log="logs/tpu_${name}.log"
cmd="cd ~/raphael_jax && RAPHAEL_TPU_POD=1 ~/venv/bin/python -m raphael_jax.cli.train${quoted} 2>&1 | tee -a ~/raphael_train.log"
if [[ "$dry_run" -eq 1 ]]; then
  on_all_workers "$cmd"
  echo "# output streamed to $log"
else
  mkdir -p logs
  on_all_workers "$cmd" 2>&1 | tee -a "$log"
fi
