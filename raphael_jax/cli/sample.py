"""``raphael-sample --workdir DIR --prompt "..." --num 8 --out DIR``: PNGs with the prompt in their metadata.

Samples with the run's EMA weights (DDIM + CFG, :class:`raphael_jax.sampling.Sampler`); writes
``sample_{i:04d}.png`` per image and ``grid.png`` (one row per prompt), never overwriting a file.
"""
from __future__ import annotations

import argparse
import os


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="raphael-sample",
                                description="Sample images from a trained RAPHAEL run (EMA weights, DDIM + CFG).")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", action="append", required=True, help="a caption; repeat for several")
    p.add_argument("--num", type=int, default=8, help="images per prompt")
    p.add_argument("--out", required=True, help="output folder (files are never overwritten)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("--num must be at least 1")
    for prompt in args.prompt:
        if not prompt.strip():
            p.error("--prompt must not be empty (use a caption such as 'a big red circle at the top left')")

    from raphael_jax.sampling import Sampler, image_grid, save_png
    from raphael_jax.train.checkpoint import load_run

    sampler = Sampler.from_run(load_run(args.workdir))
    prompts = [pr for pr in args.prompt for _ in range(args.num)]
    images = sampler.sample(prompts, seed=args.seed, num_steps=args.steps, guidance=args.guidance, eta=args.eta)
    os.makedirs(args.out, exist_ok=True)
    g = sampler.config.sample.guidance if args.guidance is None else args.guidance
    meta = {"guidance": g, "seed": args.seed, "step": sampler.step, "workdir": os.path.abspath(args.workdir)}
    written = []
    for i, (pr, im) in enumerate(zip(prompts, images)):
        path = _free_path(args.out, f"sample_{i:04d}.png")
        save_png(im, path, pr, meta)
        written.append(path)
    grid_path = _free_path(args.out, "grid.png")
    save_png(image_grid(images, cols=args.num), grid_path, " | ".join(args.prompt), meta)
    print(f"wrote {len(written)} images and {grid_path}")
    return 0


def _free_path(folder: str, name: str) -> str:
    """``folder/name``, or ``name`` with a numeric suffix when that file exists (never overwrite)."""
    path = os.path.join(folder, name)
    stem, ext = os.path.splitext(name)
    k = 1
    while os.path.exists(path):
        path = os.path.join(folder, f"{stem}_{k}{ext}")
        k += 1
    return path


if __name__ == "__main__":
    raise SystemExit(main())
