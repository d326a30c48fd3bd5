"""How much of the image each space expert covers, on a trained run.

    python bench/moe_coverage.py --workdir runs/tiny                       # 200 prompts, DDIM and data inputs
    python bench/moe_coverage.py --workdir runs/tiny --source sample --prompts 50 --out /tmp/cov.md

Our space-MoE runs every expert over every image position (the exact efficient form of
``raphael_jax.models.moe.SpaceMoE``); at a position where an expert's token count is zero (no token
routed to it has that position in its thresholded region mask) the expert contributes only its
constant ``e_k(0)``. This script measures, per block and timestep range, the share of positions
where each expert's count is nonzero (its coverage), the union over experts, and the share of
nonzero (position, expert) pairs: the fraction of the exact form's expert FLOPs that a dispatch
computing experts only where needed would still spend (an upper bound on its saving; the
constant terms and the dispatch's own gathers are not counted). See ``raphael_jax.analysis.coverage``.

Sources (``--source``, comma-separated): ``sample``: every step of DDIM sampling with classifier-free
guidance (the run's sampler settings; the empty prompt's half reported apart); ``data``: evaluation-
stream world scenes noised to ``--timesteps-per-range`` timesteps in each range (training's inputs,
without router noise). Prompts: the world's evaluation stream (stream 1), ``--objects`` per scene
(default: the run's training range). Writes ``bench/results/moe_coverage.md`` (and, with ``--json PATH``,
every number and prompt as JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/benchlib.py
from benchlib import ROOT, cpu_model  # noqa: E402


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def parse_objects(spec: str | None):
    if not spec:
        return None
    parts = [int(v) for v in spec.replace("-", ",").split(",") if v.strip()]
    lo, hi = min(parts), max(parts)
    if not 1 <= lo <= hi <= 3:
        raise SystemExit(f"--objects {spec!r}: scenes have 1 to 3 objects")
    return lo, hi


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="trained run (latest checkpoint, EMA weights)")
    p.add_argument("--source", default="sample,data", help="sample, data or both (comma-separated)")
    p.add_argument("--prompts", type=int, default=200, help="evaluation-stream prompts (scenes)")
    p.add_argument("--objects", default=None, help="objects per scene, e.g. 1 or 1-3 (default: the run's range)")
    p.add_argument("--edges", default="0,250,500,750,1000", help="timestep range edges")
    p.add_argument("--timesteps-per-range", type=int, default=4, help="data source: timesteps per range")
    p.add_argument("--ddim-steps", type=int, default=None, help="sample source: DDIM steps (config sample.num_steps)")
    p.add_argument("--guidance", type=float, default=None, help="sample source: CFG weight (config sample.guidance)")
    p.add_argument("--batch", type=int, default=64, help="prompts per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--no-ema", action="store_true", help="the raw parameters instead of the EMA")
    p.add_argument("--note", default="", help="what else ran on the machine, for the report")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "moe_coverage.md"))
    p.add_argument("--json", default=None, help="also write the full results here")
    args = p.parse_args(argv)
    sources = [s.strip() for s in args.source.split(",") if s.strip()]
    t_begin = time.time()

    import jax

    from raphael_jax.analysis.coverage import SOURCES, CoverageRecorder, coverage_markdown, measure_coverage
    from raphael_jax.sampling import Sampler
    from raphael_jax.train.checkpoint import load_run

    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        p.error(f"--source: unknown {bad}; choose from {list(SOURCES)}")
    edges = [int(v) for v in args.edges.split(",")]
    objects = parse_objects(args.objects)
    sampler = Sampler.from_run(load_run(args.workdir, args.step), use_ema=not args.no_ema)
    rec = CoverageRecorder(sampler, args.batch)
    cfg = sampler.config
    print(f"{args.workdir} at step {sampler.step}: {len(rec.layers)} space-MoE layers x {rec.num_experts} experts "
          f"(alpha {cfg.model.space_moe.alpha})", flush=True)
    results = {}
    for src in sources:
        t0 = time.time()
        results[src] = measure_coverage(sampler, num_prompts=args.prompts, seed=args.seed, objects=objects,
                                        source=src, edges=edges, timesteps_per_range=args.timesteps_per_range,
                                        num_steps=args.ddim_steps, guidance=args.guidance, recorder=rec,
                                        verbose=True)
        results[src]["seconds"] = time.time() - t0
        print(f"{src}: {results[src]['seconds']:.0f} s", flush=True)

    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    dev = jax.devices()[0]
    first = next(iter(results.values()))
    lo, hi = first["objects"]
    sm = cfg.model.space_moe
    lines = [
        "# Space-expert coverage of a trained run",
        "",
        f"Generated by `python bench/moe_coverage.py {cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"({time.time() - t_begin:.0f} s).",
        "",
        f"- run: `{args.workdir}` at step {sampler.step}, {'raw' if args.no_ema else 'EMA'} weights; "
        f"{len(rec.layers)} space-MoE layers, {rec.num_experts} experts, region threshold alpha {sm.alpha}, "
        f"average over `{sm.average}` tokens, text length {cfg.text.max_len}",
        f"- prompts: {args.prompts} evaluation-stream world scenes (seed {args.seed}), {lo}-{hi} objects each",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__}, {dev.platform} / {dev.device_kind}"
        + (f"; also running: {args.note}" if args.note else ""),
        "",
        "Coverage of expert k in a block: the share of the block's image positions where k's token count "
        "(text tokens routed to k whose thresholded region mask covers the position; "
        "`raphael_jax/models/moe.py`) is nonzero, averaged over prompts and over the evaluations whose "
        "timestep falls in the range. Union: positions covered by any expert. Nonzero pairs: the mean over "
        "experts, i.e. the share of (position, expert) pairs where the expert's output is needed; elsewhere "
        "the exact form's e_k(h_j) is multiplied by a zero count and only the constant e_k(0) term remains. "
        "So a dispatch that ran each expert only on its covered positions would still spend this share of "
        "the space experts' FLOPs (bound on the saving: 1 minus it; constant terms and gather/scatter cost "
        "not counted). Experts routed: the share of experts taken by at least one token of the prompt.",
    ]
    for src, res in results.items():
        if src == "sample":
            head = (f"## DDIM sampling ({res['ddim_steps']} steps, guidance {res['guidance']}), "
                    f"{res['seconds']:.0f} s")
            note = ("Every step of the sampler's loop (`Sampler.guided_sample`, router noise off); a step counts "
                    "in the range of its timestep. The tables are the prompts' half of the guided batch.")
        else:
            head = f"## World images noised to t (training's inputs), {res['seconds']:.0f} s"
            note = (f"Each scene with its caption at timesteps {res['timesteps']} (`q_sample`, router noise "
                    "off; training adds router noise, which changes routes but not what a route covers).")
        lines += ["", head, "", note, "", coverage_markdown(res)]
    lines += ["", "Blocks: `down`/`mid`/`up` with the index of the module in that path (names as "
              "`raphael-paths`); positions: image positions at that block's resolution."]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_jsonable({"workdir": args.workdir, "command": cmd, "sources": results}), f)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
