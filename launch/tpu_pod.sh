#!/usr/bin/env bash
# Train RAPHAEL on a Cloud TPU VM slice: create (or reuse) the slice, ship the code to every worker,
# install, run the trainer on --worker=all and stream the logs here.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --type ACCELERATOR [--version RUNTIME] [--project P] [--spot]
#                     [--repo GIT_URL [--ref REF]] [--mount-bucket BUCKET] [--skip-install] [--dry-run]
#                     [--no-watch | --attach] [--max-restarts N] [--poll SECONDS]
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
# jax[tpu] (skip with --skip-install), optional gcsfuse mount of --mount-bucket at ~/gcs; (4) start
# `raphael-train` on --worker=all DETACHED (nohup setsid: a dropped ssh connection does not kill it),
# its output in ~/raphael_train.log and its exit status in ~/raphael_train.status on each worker
# (jax.distributed discovers the pod by itself; every host writes its checkpoint shards, so WORKDIR
# must be shared: the gcsfuse mount); (5) watch: stream worker 0's log here and to
# logs/tpu_NAME.log (reconnecting when the connection drops) and poll the status. Exit 0 ends the
# watch; exit 143 (the trainers saved a checkpoint on SIGTERM: a maintenance event or preemption)
# or a slice that is gone or not READY (spot preemption, host failure) relaunches: the slice is
# recreated when needed, the code shipped and installed again, and the same command resumes from the
# newest checkpoint in WORKDIR, up to --max-restarts times (default 20). Any other exit status (a bad
# config: 2; non-finite steps: 1) stops the watch with that status: relaunching would fail again.
# --no-watch starts the run and returns; --attach only watches a run already started (same args).
# Delete the slice when done:
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
watch=1
attach=0
max_restarts=20
poll=60
jax_pin="jax[tpu]>=0.9.2,<0.11"

usage() { sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'; }

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
    --no-watch) watch=0; shift ;;
    --attach) attach=1; shift ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --poll) poll="$2"; shift 2 ;;
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

prepare() {
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
}

# (4) start the trainer detached on every worker; (5) watch it
# (RAPHAEL_TPU_POD=1: maybe_initialize calls jax.distributed.initialize(), which finds the pod's
# coordinator in the TPU metadata)
quoted=$(printf ' %q' "${train_args[@]}")
log="logs/tpu_${name}.log"
job="cd ~/raphael_jax && RAPHAEL_TPU_POD=1 ~/venv/bin/python -m raphael_jax.cli.train${quoted} >> ~/raphael_train.log 2>&1; echo \\\$? > ~/raphael_train.status"
launch() {
  on_all_workers "rm -f ~/raphael_train.status; nohup setsid bash -c \"$job\" > /dev/null 2>&1 < /dev/null &"
}

slice_state() {
  "${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null || echo MISSING
}

worker0_status() {
  # the trainer's exit status on worker 0, "running" while it runs, "unreachable" when ssh fails
  "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=0 \
    --command 'cat ~/raphael_train.status 2>/dev/null || echo running' 2>/dev/null | tail -n 1 || echo unreachable
}

if [[ "$dry_run" -eq 1 ]]; then
  prepare
  launch
  echo "# watch (unless --no-watch): stream worker 0's ~/raphael_train.log into $log, reconnecting;"
  echo "# poll ~/raphael_train.status every ${poll}s: 0 ends; 143 or a slice not READY relaunches (prepare +"
  echo "# start again, at most $max_restarts times); any other status stops with it"
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command "tail -n +1 -F ~/raphael_train.log"
  exit 0
fi

mkdir -p logs
if [[ "$attach" -eq 0 ]]; then
  prepare
  launch
fi
if [[ "$watch" -eq 0 ]]; then
  echo "tpu_pod.sh: started detached; watch with the same command plus --attach"
  exit 0
fi
restarts=0
while true; do
  # stream worker 0's log in the background, reconnecting whenever the connection drops
  ( while true; do
      "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command "tail -n 0 -F ~/raphael_train.log" \
        2>/dev/null | tee -a "$log" || true
      sleep 10
    done ) &
  streamer=$!
  status=running
  while [[ "$status" == running ]]; do
    sleep "$poll"
    state=$(slice_state)
    if [[ "$state" != READY ]]; then
      status="slice-$state"
    else
      status=$(worker0_status)
      if [[ "$status" == unreachable ]]; then
        status=running  # a transient ssh failure: ask again at the next poll
      fi
    fi
  done
  pkill -P "$streamer" 2>/dev/null || true  # the ssh | tee of the streaming loop, then the loop
  kill "$streamer" 2>/dev/null || true
  if [[ "$status" == 0 ]]; then
    echo "tpu_pod.sh: the run finished (exit 0)"
    exit 0
  fi
  if [[ "$status" != 143 && "$status" != slice-* ]]; then
    echo "tpu_pod.sh: the trainer exited with status $status; not relaunching (see $log)" >&2
    exit 1
  fi
  restarts=$((restarts + 1))
  if [[ "$restarts" -gt "$max_restarts" ]]; then
    echo "tpu_pod.sh: $max_restarts relaunches reached; giving up" >&2
    exit 1
  fi
  echo "tpu_pod.sh: $status: relaunching ($restarts/$max_restarts); the run resumes from its newest checkpoint"
  if [[ "$status" == slice-* ]]; then
    if [[ "$status" != slice-MISSING ]]; then
      run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
    fi
  fi
  prepare
  launch
done
