#!/usr/bin/env bash
# Run NPROC local CPU processes of one JAX program, joined by jax.distributed on 127.0.0.1.
#
#   launch/local_multihost.sh [-n NPROC] [-d DEVICES_PER_PROC] [-p PORT] [--log-dir DIR] [--dry-run] -- CMD [ARGS...]
#
# Example (2 processes x 4 virtual CPU devices, experts sharded across the process boundary):
#   launch/local_multihost.sh -n 2 -d 4 -- python -m raphael_jax.cli.train --config configs/tiny.py \
#       --workdir runs/multihost --set parallel.mesh.data=1 --set parallel.mesh.expert=4 \
#       --set parallel.mesh.tensor=2
#
# Every process gets RAPHAEL_COORDINATOR=127.0.0.1:PORT, RAPHAEL_NUM_PROCESSES, RAPHAEL_PROCESS_ID and
# RAPHAEL_LOCAL_DEVICES (read by raphael_jax.parallel.distributed.maybe_initialize, which calls
# jax.distributed.initialize and sets jax_num_cpu_devices), JAX_PLATFORMS=cpu, and the caller's
# XLA_FLAGS minus --xla_force_host_platform_device_count. Output lines are prefixed with [pN]
# (and also written to DIR/pN.log with --log-dir). If one process fails the others are stopped,
# and the script exits with the first failure's status. PORT defaults to a free port.
set -euo pipefail

nproc=2
ndev=4
port=""
log_dir=""
dry_run=0

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) nproc="$2"; shift 2 ;;
    -d|--devices-per-process) ndev="$2"; shift 2 ;;
    -p|--port) port="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local_multihost.sh: unknown option $1 (the command goes after --)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "local_multihost.sh: no command given (put it after --)" >&2
  exit 2
fi
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

xla_flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')

if [[ "$dry_run" -eq 1 ]]; then
  for ((i = 0; i < nproc; i++)); do
    printf 'JAX_PLATFORMS=cpu XLA_FLAGS=%q RAPHAEL_COORDINATOR=127.0.0.1:%s RAPHAEL_NUM_PROCESSES=%s ' \
      "$xla_flags" "$port" "$nproc"
    printf 'RAPHAEL_PROCESS_ID=%s RAPHAEL_LOCAL_DEVICES=%s' "$i" "$ndev"
    printf ' %q' "$@"
    printf ' &\n'
  done
  echo "wait"
  exit 0
fi

if [[ -n "$log_dir" ]]; then
  mkdir -p "$log_dir"
fi

pids=()
cleanup() {
  # SIGTERM first (jax.distributed treats it as a preemption notice), SIGKILL after 5 s
  local pid t
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for ((t = 0; t < 25; t++)); do
    local alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then
        alive=1
      fi
    done
    if [[ "$alive" -eq 0 ]]; then
      return
    fi
    sleep 0.2
  done
  for pid in "${pids[@]}"; do
    kill -9 "$pid" 2>/dev/null || true
  done
}
trap cleanup INT TERM

for ((i = 0; i < nproc; i++)); do
  prefix="[p$i] "
  if [[ -n "$log_dir" ]]; then
    sink="$log_dir/p$i.log"
  else
    sink=/dev/null
  fi
  JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" RAPHAEL_COORDINATOR="127.0.0.1:$port" \
    RAPHAEL_NUM_PROCESSES="$nproc" RAPHAEL_PROCESS_ID="$i" RAPHAEL_LOCAL_DEVICES="$ndev" \
    "$@" > >(tee "$sink" | sed -u "s/^/$prefix/") 2>&1 &
  pids+=("$!")
done

status=0
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  still=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    if [[ "$rc" -ne 0 && "$status" -eq 0 ]]; then
      status=$rc
      echo "local_multihost.sh: process $pid exited with status $rc; stopping the others" >&2
      cleanup
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  sleep 0.2
done
wait
exit "$status"
