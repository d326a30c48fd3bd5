"""Where our train step's time goes: one step traced with ``jax.profiler``, XLA:CPU thunks grouped by kind.

    python bench/profile_step.py --note "nothing else ran"             # vs_diffusers' 32 x 32 batch 32 shape
    python bench/profile_step.py --shape 64x64:4 --out bench/results/profile_step_64.md
    python bench/profile_step.py --small --shape 16x16:2 --out /tmp/p.md  # smoke test (tests/bench)

The step is ``bench/vs_diffusers.py``'s (our dense U-Net at diffusers' shape, the project's jitted
train step). After ``--warmup`` calls, one call runs under ``jax.profiler.trace`` with a Perfetto trace;
every XLA:CPU thunk event of it (a fusion, a custom call, a copy) is matched by name to its instruction
in the compiled HLO and put in one group by what its computation contains: ``convolution`` (any
convolution: forward, input or weight gradient), ``matmul`` (a dot), ``reduction`` (a reduce), ``exp``
(element-wise with an exponential: softmax, GELU), ``layout`` (copies, transposes, pads, slices,
concatenations only), ``element-wise`` (the rest). Each group's summed thunk time and its share are
reported with its three costliest thunks. Thunk times add up to more than the wall time when XLA runs
thunks concurrently; the shares are of the summed time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ROOT, cpu_model, log, write_lines  # noqa: E402

LAYOUT_OPS = {"copy", "bitcast", "transpose", "parameter", "slice", "concatenate", "pad", "reshape", "broadcast",
              "dynamic-slice", "dynamic-update-slice", "tuple", "get-tuple-element", "constant", "reverse"}
_INSTR = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def parse_hlo(text: str) -> tuple[dict, dict]:
    """(computations: name -> instruction lines, instructions: name -> (opcode, called computation or None))."""
    comps, instrs, cur = {}, {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            m = re.match(r"^(?:ENTRY )?%?([\w.\-]+)", line)
            cur = m.group(1) if m else None
            if cur:
                comps[cur] = []
            continue
        if cur is None:
            continue
        comps[cur].append(line)
        m = _INSTR.match(line)
        if m:
            c = _CALLS.search(line)
            instrs[m.group(1)] = (m.group(2), c.group(1) if c else None)
    return comps, instrs


def ops_in(comps: dict, comp: str, depth: int = 0) -> collections.Counter:
    out = collections.Counter()
    for line in comps.get(comp, ()):
        m = _INSTR.match(line)
        if m:
            out[m.group(2)] += 1
            c = _CALLS.search(line)
            if c and depth < 4:
                out.update(ops_in(comps, c.group(1), depth + 1))
    return out


def group_of(name: str, comps: dict, instrs: dict) -> str | None:
    """The group of the thunk ``name`` (an HLO instruction name), or None when it is not one."""
    if name not in instrs:
        return None
    op, called = instrs[name]
    ops = ops_in(comps, called) if called else collections.Counter({op: 1})
    if "convolution" in ops:
        return "convolution"
    if "dot" in ops:
        return "matmul"
    if "reduce" in ops or "reduce-window" in ops:
        return "reduction"
    if "exponential" in ops:
        return "exp"
    if set(ops) <= LAYOUT_OPS:
        return "layout"
    return "element-wise"


def thunk_times(trace_path: str) -> collections.Counter:
    data = json.load(gzip.open(trace_path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    out = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            out[e["name"]] += float(e["dur"]) / 1e3  # ms
    return out


def profile(compiled_call, hlo_text: str, warmup: int) -> tuple[dict, float]:
    import jax

    for _ in range(warmup):
        compiled_call()
    with tempfile.TemporaryDirectory() as logdir:
        t0 = time.perf_counter()
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            compiled_call()
        wall = (time.perf_counter() - t0) * 1e3
        traces = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
        if not traces:
            raise SystemExit(f"jax.profiler wrote no Perfetto trace under {logdir}")
        times = thunk_times(traces[0])
    comps, instrs = parse_hlo(hlo_text)
    groups: dict = collections.defaultdict(collections.Counter)
    for name, ms in times.items():
        g = group_of(name, comps, instrs)
        if g is not None:
            groups[g][name] += ms
    return groups, wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="32x32:32", help="HxW:BATCH (square), as bench/vs_diffusers.py")
    p.add_argument("--small", action="store_true", help="channels (32, 64) (smoke tests)")
    p.add_argument("--attention", default=None, help="our model.attention; default: config (auto)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--note", default="", help="what else ran on the machine, for the report")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "profile_step.md"))
    args = p.parse_args(argv)
    import importlib.util

    spec = importlib.util.spec_from_file_location("vs_diffusers", os.path.join(os.path.dirname(__file__),
                                                                                "vs_diffusers.py"))
    vsd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vsd)
    (size, batch), = vsd.parse_shapes(args.shape)
    d = vsd.dims(args.small)
    log(f"{size}x{size}:{batch}: building and compiling our train step")
    train = vsd.OursTrain(vsd.our_config(size, d, args.attention), vsd.fake_inputs(size, batch, d))
    groups, wall = profile(train, train.compiled.as_text(), args.warmup)
    total = sum(sum(c.values()) for c in groups.values())
    if total <= 0:
        raise SystemExit("the trace held no XLA thunk of the compiled step")
    lines = [f"# Where the train step's time goes: {size} x {size}, batch {batch}"
             + (" (--small)" if args.small else ""), "",
             f"Machine: {cpu_model()}; {os.cpu_count()} cores. {args.note}", "",
             f"Command: `python bench/profile_step.py {shlex.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"One traced step: {wall:.0f} ms wall, {total:.0f} ms summed over XLA thunks "
             f"(attention: `model.attention={args.attention or 'auto'}`).", "",
             "| group | ms | share | costliest thunks (ms) |", "|---|---|---|---|"]
    for g, c in sorted(groups.items(), key=lambda kv: -sum(kv[1].values())):
        ms = sum(c.values())
        top = ", ".join(f"{n} {v:.0f}" for n, v in c.most_common(3))
        lines.append(f"| {g} | {ms:.0f} | {100 * ms / total:.1f}% | {top} |")
    write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
