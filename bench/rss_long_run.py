"""Host memory over a long run: the RSS of ``raphael-train`` at step 200 and at step 2,000 of the tiny config.

    python bench/rss_long_run.py --note "nothing else ran"      # configs/tiny.py, 2,000 steps (~25 min, 2 cores)

Runs the real command (``python -m raphael_jax.cli.train``) in a fresh temporary workdir with
``train.num_steps=--steps`` (everything else as the config has it: logging every 100 steps, checkpoints,
the final preview) and reads the child's ``VmRSS`` from ``/proc/<pid>/status`` every 0.2 s. The RSS
at a step is the one read when the trainer prints that step's log line. The goal (docs/RELIABILITY.md):
RSS at ``--steps`` at most 5% above the RSS at ``--at``. RSS is not a timing: other jobs on the machine
change how long the run takes, not what it holds.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ROOT, cpu_model, log, write_lines  # noqa: E402

_STEP = re.compile(r"^step\s+(\d+)/(\d+)\s")


def rss_mib(pid: int) -> float | None:
    """Resident set size of process ``pid`` in MiB (``VmRSS``), None once it is gone."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def logged_step(line: str) -> int | None:
    """The step of a trainer log line (``step    200/2000  loss ...``), else None."""
    m = _STEP.match(line)
    return int(m.group(1)) if m else None


def growth(at_start: float, at_end: float) -> float:
    """Relative growth from ``at_start`` to ``at_end`` (0.05 = 5%)."""
    return at_end / at_start - 1.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"))
    p.add_argument("--set", action="append", default=[], help="extra config overrides")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--at", type=int, default=200, help="the reference step (after warm-up and the first saves)")
    p.add_argument("--limit", type=float, default=0.05, help="the goal: growth at most this fraction")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "rss_long_run.md"))
    p.add_argument("--no-trim", action="store_true",
                   help="RAPHAEL_NO_TRIM=1: the trainer does not return freed heap pages (the comparison)")
    p.add_argument("--note", default="", help="what else ran on the machine")
    args = p.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="raphael_rss_")
    cmd = [sys.executable, "-u", "-m", "raphael_jax.cli.train", "--config", args.config, "--workdir", workdir,
           "--set", f"train.num_steps={args.steps}"] + [a for s in args.set for a in ("--set", s)]
    log(f"running {shlex.join(cmd)}")
    t0 = time.time()
    env = dict(os.environ, **({"RAPHAEL_NO_TRIM": "1"} if args.no_trim else {}))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0.0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            r = rss_mib(proc.pid)
            if r is not None:
                peak[0] = max(peak[0], r)
            time.sleep(0.2)

    threading.Thread(target=poll, daemon=True).start()
    at_step: dict[int, float] = {}
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        step = logged_step(line)
        if step is not None:
            r = rss_mib(proc.pid)
            if r is not None:
                at_step[step] = r
                log(f"step {step}: RSS {r:.0f} MiB")
    proc.wait()
    done.set()
    if proc.returncode != 0 or args.at not in at_step or args.steps not in at_step:
        print("".join(tail), file=sys.stderr)
        raise SystemExit(f"the run failed (exit {proc.returncode}) or did not log steps {args.at} and {args.steps}")
    g = growth(at_step[args.at], at_step[args.steps])
    verdict = "met" if g <= args.limit else "NOT met"
    lines = [
        f"# RSS over a {args.steps}-step run (`bench/rss_long_run.py`)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores. {args.note}".rstrip(),
        f"Command: `python bench/rss_long_run.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        f"Run: `{os.path.relpath(args.config, ROOT)}` with `train.num_steps={args.steps}`"
        + (f" and {', '.join(args.set)}" if args.set else "") + f"; {time.time() - t0:.0f} s wall; "
        + ("**without** returning freed heap pages (`RAPHAEL_NO_TRIM=1`)." if args.no_trim else
           "freed heap pages returned at log steps (`raphael_jax/train/host_memory.py`)."),
        "",
        f"RSS at step {args.at}: **{at_step[args.at]:.0f} MiB**; "
        f"at step {args.steps}: **{at_step[args.steps]:.0f} MiB**; growth **{100 * g:+.1f}%** "
        f"(goal at most {100 * args.limit:.0f}%: {verdict}). Peak RSS over the run "
        f"(read every 0.2 s, the final preview included): {peak[0]:.0f} MiB.",
        "",
        "| step | RSS (MiB) |",
        "|---:|---:|",
        *[f"| {s} | {r:.0f} |" for s, r in sorted(at_step.items())],
    ]
    write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
