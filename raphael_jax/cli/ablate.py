"""``raphael-ablate``: train and evaluate the paper's Fig. 6 ablations on the shapes world (resumable).

    raphael-ablate --root runs/ablate --config configs/tiny.py --variants fig6b,dense,experts \\
        --steps 2200 --docs docs/ablations

See :mod:`raphael_jax.analysis.ablate` and docs/ANALYSIS.md.
"""
from __future__ import annotations

import argparse
import sys

from raphael_jax.analysis.ablate import GROUP_ORDER, GUIDANCE, run


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="raphael-ablate",
                                description="Train and evaluate the paper's Fig. 6 ablations on the shapes "
                                "world (resumable: re-run the same command to continue).")
    p.add_argument("--root", required=True, help="one workdir per variant under this folder")
    p.add_argument("--config", default="configs/tiny.py", help="base config (file.py[:switches])")
    p.add_argument("--variants", default="fig6b",
                   help="comma-separated groups (" + ", ".join(GROUP_ORDER) + ", all) or variants "
                   "(e.g. full, experts=6, alpha=0.3, no_edge+experts=2)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every variant (config train.num_steps)")
    p.add_argument("--seed", type=int, default=None, help="model seed of every variant (config seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for all variants")
    p.add_argument("--init-from-root", default=None,
                   help="curriculum: start each variant from its trained run under this root "
                   "(e.g. tiny.py runs for configs/tiny_multi.py)")
    p.add_argument("--guidance", default=",".join(f"{g:g}" for g in GUIDANCE), help="guidance weights")
    p.add_argument("--objects", default="1,2,3", help="object counts of the evaluation prompts")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="prompts per object count (config eval.num_prompts)")
    p.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps (config sample.num_steps)")
    p.add_argument("--seed-eval", type=int, default=None,
                   help="evaluation prompt/noise seed (config eval.seed)")
    p.add_argument("--sfd-net", default=None,
                   help="feature net for the shapes Frechet distance (SFD, "
                   "raphael_jax.evaluation.shapes_fd); without it no SFD")
    p.add_argument("--sfd-samples", type=int, default=None,
                   help="held-out scenes for SFD (default 3 x --num-prompts)")
    p.add_argument("--docs", default="docs/ablations", help="where the table and plots go")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="show the plan and what is done, run nothing")
    mode.add_argument("--train-only", action="store_true")
    mode.add_argument("--eval-only", action="store_true", help="evaluate finished runs, train nothing")
    mode.add_argument("--report-only", action="store_true",
                      help="tables and plots from cached evaluations only")
    args = p.parse_args(argv)
    try:
        objects = tuple(int(x) for x in args.objects.split(","))
        guidance = tuple(float(x) for x in args.guidance.split(","))
    except ValueError:
        p.error("--objects and --guidance take comma-separated numbers")
    if any(not 1 <= n <= 3 for n in objects):
        p.error("--objects: the shapes world has 1 to 3 objects per scene")
    mode = ("list" if args.list else "train" if args.train_only else "eval" if args.eval_only
            else "report" if args.report_only else "all")
    try:
        run(root=args.root, config=args.config, variants=args.variants, steps=args.steps, seed=args.seed,
            overrides=args.set, init_from_root=args.init_from_root, guidance=guidance, objects=objects,
            num_prompts=args.num_prompts, ddim_steps=args.ddim_steps, seed_eval=args.seed_eval,
            sfd_net=args.sfd_net, sfd_samples=args.sfd_samples, docs=args.docs, mode=mode,
            command="raphael-ablate " + " ".join(argv))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"raphael-ablate: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
