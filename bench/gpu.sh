#!/usr/bin/env bash
# bench/gpu.py on a machine that cannot download: PYTHONPATH = this checkout, carried wheels, then the benchmark.
#
#   bash bench/gpu.sh [--wheels DIR] [bench/gpu.py arguments...]
#   bash bench/gpu.sh --check-imports            # only check the packages (one line naming any missing)
#
# Wheels: every DIR/*.whl (default runs/wheels, git-ignored) is unpacked into DIR-unpacked (a fresh copy each
# run), which goes on PYTHONPATH after the checkout; nothing is installed. Make them where pip can download
# (the docstring of bench/gpu.py has the recipe):
#   pip download --no-deps -d runs/wheels ml-collections
# Installing them instead also works: pip install --no-index --no-deps runs/wheels/*.whl
# XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.90 here (jax's own default is 0.75): the batch search compares
# the compiled step's memory with the pool this sets. PYTHON picks the interpreter (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/runs/wheels"
if [[ "${1:-}" == "--wheels" ]]; then
    [[ $# -ge 2 ]] || { echo "bench/gpu.sh: --wheels needs a folder" >&2; exit 2; }
    WHEELS="$2"
    shift 2
fi
PY="${PYTHON:-python3}"

extra=""
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if [[ ${#wheels[@]} -gt 0 ]]; then
    unpacked="${WHEELS%/}-unpacked"
    rm -rf "$unpacked"
    mkdir -p "$unpacked"
    for w in "${wheels[@]}"; do
        "$PY" -m zipfile -e "$w" "$unpacked"
    done
    extra="$unpacked"
    echo "bench/gpu.sh: ${#wheels[@]} wheel(s) from $WHEELS unpacked onto PYTHONPATH ($unpacked)"
fi

export PYTHONPATH="$ROOT${extra:+:$extra}${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
exec "$PY" "$ROOT/bench/gpu.py" "$@"
