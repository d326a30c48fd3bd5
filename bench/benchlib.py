"""What the scripts in bench/ share: the machine's CPU name, timestamped progress lines, XLA's FLOP count.

Each script puts its own folder on ``sys.path`` and imports this module (the scripts are run as
``python bench/<name>.py``, and the tests load them from their files).
"""
from __future__ import annotations

import os
import platform
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# XLA:CPU without LLVM's expensive passes, as raphael_jax/train/state.py compiles the init program
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_T_START = time.time()
_PREFIX = ""


def cpu_model() -> str:
    """The ``model name`` of /proc/cpuinfo (else ``platform.processor()``)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def set_clock(t_start: float, prefix: str = "") -> None:
    """Count from ``t_start`` (a parent process's start, in a child) and prefix every progress line."""
    global _T_START, _PREFIX
    _T_START, _PREFIX = t_start, prefix


def start_time() -> float:
    """When the clock started (to hand to a child process's :func:`set_clock`)."""
    return _T_START


def elapsed() -> float:
    """Seconds since the script started (since this module was imported)."""
    return time.time() - _T_START


def log(msg: str) -> None:
    """A progress line with the seconds since the script started."""
    print(f"[{elapsed():6.1f}s] {_PREFIX}{msg}", flush=True)


def xla_flops(compiled) -> float:
    """``cost_analysis()['flops']`` of a compiled program (a dict, or a list of dicts in some jax
    versions); nan when XLA gives none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return float("nan")
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def run_child(target, args) -> object:
    """Run ``target(*args, queue)`` in a spawned process and return what it puts on the queue; a string
    (the child's error, or why it gave no answer: killed for memory, say) when it failed."""
    import multiprocessing as mp
    from queue import Empty

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    res = None
    while res is None:  # poll, so a child killed for memory is noticed instead of waited on
        try:
            res = queue.get(timeout=5)
        except Empty:
            if not proc.is_alive():
                try:
                    res = queue.get(timeout=1)
                except Empty:
                    res = f"exited with code {proc.exitcode} and no answer (killed for memory?)"
    proc.join(timeout=60)
    return res


def write_lines(path: str, lines: list[str]) -> None:
    """Write a markdown report (creating its folder) and print it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
