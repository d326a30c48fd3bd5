"""``raphael-eval alignment --workdir DIR [--objects 1,2,3] [--num-prompts 200] [--guidance W]``."""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Evaluate a trained RAPHAEL run.")
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("alignment", help="shapes-world text-image alignment of held-out prompts")
    a.add_argument("--workdir", required=True)
    a.add_argument("--objects", default="1,2,3", help="object counts to evaluate, e.g. 1 or 1,2,3")
    a.add_argument("--num-prompts", type=int, default=None, help="prompts per object count (config eval.num_prompts)")
    a.add_argument("--guidance", type=float, default=None, help="CFG weight (config sample.guidance)")
    a.add_argument("--steps", type=int, default=None, help="DDIM steps (config sample.num_steps)")
    a.add_argument("--seed", type=int, default=None, help="prompt and noise seed (config eval.seed)")
    a.add_argument("--set", action="append", default=[], metavar="sample.KEY=VALUE",
                   help="override a sampler setting of the run's config, e.g. sample.timestep_spacing=leading")
    pr = sub.add_parser("probe", help="one-step x0 recovery from noised held-out images, per timestep")
    pr.add_argument("--workdir", required=True)
    pr.add_argument("--timesteps", default="999,950,800,500,200")
    pr.add_argument("--num", type=int, default=64)
    args = p.parse_args(argv)

    from raphael_jax.evaluation.alignment import evaluate_alignment, save_results
    from raphael_jax.sampling import Sampler
    from raphael_jax.train.checkpoint import load_run

    if args.what == "probe":
        from raphael_jax.evaluation.denoise_probe import denoise_probe

        sampler = Sampler.from_run(load_run(args.workdir))
        res = denoise_probe(sampler, tuple(int(t) for t in args.timesteps.split(",")), args.num)
        print(f"one-step x0 from x_t, {args.num} held-out single-object scenes, step {sampler.step}")
        for t, r in res.items():
            print(f"  t={t:4d}: " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()))
        return 0

    sampler = Sampler.from_run(load_run(args.workdir))
    cfg = sampler.config
    if any(not kv.startswith("sample.") for kv in args.set):
        p.error("--set only overrides sample.* settings (the weights fix everything else)")
    from raphael_jax.config import apply_overrides

    try:
        apply_overrides(cfg, args.set)
    except (KeyError, ValueError) as e:
        p.error(f"--set: {e}")
    try:
        objects = tuple(int(x) for x in args.objects.split(","))
    except ValueError:
        p.error(f"--objects must be comma-separated integers, got {args.objects!r}")
    if any(not 1 <= n <= 3 for n in objects):
        p.error("--objects: the shapes world has 1 to 3 objects per scene")
    guidance = cfg.sample.guidance if args.guidance is None else args.guidance
    step = int(sampler.step)
    print(f"alignment of {args.workdir} at step {step}, guidance {guidance}, "
          f"{args.steps or cfg.sample.num_steps} DDIM steps")
    results = evaluate_alignment(sampler, num_prompts=args.num_prompts or cfg.eval.num_prompts,
                                 seed=cfg.eval.seed if args.seed is None else args.seed, objects=objects,
                                 guidance=guidance, num_steps=args.steps)
    tag = "_".join(kv.split(".", 1)[1].replace("=", "-") for kv in args.set)
    print("saved", save_results(args.workdir, step, guidance, results, tag=tag))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
