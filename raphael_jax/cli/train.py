"""``raphael-train --config configs/tiny.py[:variant] --workdir DIR [--set key=value ...]``.

Trains (resuming from the workdir's latest checkpoint) with :func:`raphael_jax.train.loop.train_and_evaluate`;
``jax.distributed`` is initialized from the environment first (pods, SLURM, launch/local_multihost.sh).
"""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="raphael-train",
                                description="Train RAPHAEL (resumes from the workdir's latest checkpoint).")
    p.add_argument("--config", default="configs/tiny.py", help="config file, optionally :variant (ablations)")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, tokenizer, TensorBoard)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.num_steps=100")
    p.add_argument("--steps", type=int, default=None, help="stop at this step (default train.num_steps)")
    args = p.parse_args(argv)
    from raphael_jax.config import load_config
    from raphael_jax.parallel.distributed import maybe_initialize
    from raphael_jax.train.loop import train_and_evaluate

    maybe_initialize()
    config = load_config(args.config, args.set)
    train_and_evaluate(config, args.workdir, num_steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
