"""``raphael-paths --workdir DIR --out DIR``: the diffusion-path study of a trained run (paper sec. 3.1).

Writes to ``--out``: ``paths.json`` (every word's path in every template, the cross-validated
classification per category), ``routes_<category>.png`` (Fig. 4-style route diagrams),
``time_experts.json`` and ``time_experts.png`` (Fig. 9-style time-expert usage over the DDIM
steps) and ``summary.md``. See ``raphael_jax.analysis.paths`` and docs/ANALYSIS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def _summary_table(results: dict) -> str:
    lines = ["| words | n words | paths | distinct paths | accuracy (5-fold) | chance |",
             "|---|---|---|---|---|---|"]
    for cat, r in results.items():
        c = r["classification"]
        lines.append(f"| {cat} | {c['num_words']} | {c['num_paths']} | {c['distinct_paths']} | "
                     f"{c['accuracy']:.3f} +- {c['accuracy_std']:.3f} | {c['chance']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=(
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

    from raphael_jax.analysis.paths import (
        CATEGORIES,
        PathRecorder,
        analyze_category,
        plot_route_diagram,
        plot_time_usage,
    )
    from raphael_jax.data.shapes.world import make_caption, sample_prompts
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
    meta = {"workdir": os.path.abspath(args.workdir), "step": int(sampler.step), "ema": not args.no_ema,
            "space_layers": rec.space_layers, "num_space_experts": rec.num_space_experts,
            "token": args.token, "templates": args.templates, "max_objects": args.max_objects,
            "folds": args.folds, "seed": args.seed,
            "classifier": "sklearn HistGradientBoostingClassifier (layers as categorical features)"}
    results = {}
    if rec.space_layers:
        for cat in cats:
            t0 = time.time()
            r = analyze_category(rec, cat, args.templates, args.seed, args.max_objects, args.token,
                                 args.folds)
            c = r["classification"]
            print(f"{cat:>7}: {c['num_words']} words x {args.templates} contexts, {c['distinct_paths']} "
                  f"distinct paths, accuracy {c['accuracy']:.3f} +- {c['accuracy_std']:.3f} "
                  f"(chance {c['chance']:.3f})  [{time.time() - t0:.1f}s]", flush=True)
            png = plot_route_diagram(r["words"], r["paths"], rec.num_space_experts, rec.space_layers,
                                     os.path.join(args.out, f"routes_{cat}.png"),
                                     title=f"{cat} words: space expert per layer over {args.templates} "
                                     f"contexts (step {sampler.step}; line: most frequent)")
            r["plot"] = os.path.basename(png)
            results[cat] = r
        with open(os.path.join(args.out, "paths.json"), "w") as f:
            json.dump({**meta, "categories": results}, f)
    else:
        print("no space-MoE layers: skipping the path study")
    time_summary = None
    if rec.time_layers:
        objs = sample_prompts(args.time_prompts, seed=args.seed, min_objects=1, max_objects=args.max_objects)
        prompts = [make_caption(o) for o in objs]
        tr = rec.time_routes_over_ddim(prompts, num_steps=args.ddim_steps, guidance=args.guidance,
                                       seed=args.seed)
        plot_time_usage(tr, os.path.join(args.out, "time_experts.png"))
        time_summary = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in tr.items()
                        if k != "routes"}
        time_summary["prompts"] = prompts
        with open(os.path.join(args.out, "time_experts.json"), "w") as f:
            json.dump(time_summary, f, indent=1)
        print(f"time routes over {len(tr['timesteps'])} DDIM steps: {tr['agreement']:.3f} of samples on the "
              "step's mode route (the time gate sees only t)")
    else:
        print("no time-MoE layers: skipping the time-expert plot")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"# Diffusion paths of `{args.workdir}` (step {sampler.step})\n\n")
        if results:
            f.write(f"Word classification from paths ({args.folds}-fold CV, {args.templates} contexts per "
                    f"word, token: {args.token}).\n\n{_summary_table(results)}\n\n")
            f.write("".join(f"![{c}]({r['plot']})\n" for c, r in results.items()))
        if time_summary:
            f.write("\nTime-expert share of DDIM steps per block:\n\n| block | "
                    + " | ".join(f"expert {e}" for e in range(time_summary["num_experts"])) + " |\n|---|"
                    + "---|" * time_summary["num_experts"] + "\n")
            for name, u in zip(time_summary["layers"], time_summary["usage"]):
                f.write(f"| {name} | " + " | ".join(f"{x:.2f}" for x in u) + " |\n")
            f.write("\n![time experts](time_experts.png)\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
