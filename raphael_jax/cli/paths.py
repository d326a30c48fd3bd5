"""``raphael-paths --workdir DIR --out DIR``: the diffusion-path study of a trained run (paper sec. 3.1).

Writes to ``--out``: ``paths.json`` (every word's path in every template, the cross-validated
classification per category), ``routes_<category>.png`` (Fig. 4-style route diagrams),
``time_experts.json`` and ``time_experts.png`` (Fig. 9-style time-expert usage over the DDIM
steps) and ``summary.md``. See ``raphael_jax.analysis.paths`` and docs/ANALYSIS.md.
"""
from __future__ import annotations

import argparse
import os


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="raphael-paths", description=(
        "Diffusion-path analysis of a trained RAPHAEL run: route every colour / kind word in many caption "
        "contexts, classify words from their paths (5-fold CV), plot route diagrams and time-expert usage "
        "over the DDIM steps."))
    p.add_argument("--workdir", required=True, help="trained run (its latest checkpoint, EMA weights)")
    p.add_argument("--out", required=True, help="output folder for PNG + JSON")
    p.add_argument("--categories", default="colour,kind",
                   help="word categories: colour, kind, size, place (comma-separated)")
    p.add_argument("--templates", type=int, default=100, help="caption contexts per category (paper: 100)")
    p.add_argument("--max-objects", type=int, default=3, help="objects per template scene (1..3)")
    p.add_argument("--token", choices=("last", "first"), default="last",
                   help="which token of a multi-token word gives its path")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="template and CV seed")
    p.add_argument("--time-prompts", type=int, default=8, help="prompts sampled to record time routes")
    p.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps (config sample.num_steps)")
    p.add_argument("--guidance", type=float, default=None, help="CFG weight (config sample.guidance)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--no-ema", action="store_true", help="use the raw parameters instead of the EMA")
    args = p.parse_args(argv)
    cats = [c.strip() for c in args.categories.split(",") if c.strip()]

    from raphael_jax.analysis.paths import CATEGORIES, PathRecorder, path_study
    from raphael_jax.sampling import Sampler
    from raphael_jax.train.checkpoint import load_run

    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown or not cats:
        p.error(f"--categories: unknown {unknown}; choose from {list(CATEGORIES)}")
    if not 1 <= args.max_objects <= 3:
        p.error("--max-objects must be 1, 2 or 3")
    if args.templates < args.folds:
        p.error(f"--templates must be at least --folds={args.folds}")
    os.makedirs(args.out, exist_ok=True)
    sampler = Sampler.from_run(load_run(args.workdir, args.step), use_ema=not args.no_ema)
    rec = PathRecorder(sampler)
    print(f"{args.workdir} at step {sampler.step}: {len(rec.space_layers)} space-MoE layers x "
          f"{rec.num_space_experts} experts, {len(rec.time_layers)} time-MoE layers x "
          f"{rec.num_time_experts} experts")
    path_study(rec, args.out, workdir=args.workdir, categories=cats, templates=args.templates,
               max_objects=args.max_objects, token=args.token, folds=args.folds, seed=args.seed,
               time_prompts=args.time_prompts, ddim_steps=args.ddim_steps, guidance=args.guidance,
               ema=not args.no_ema)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
