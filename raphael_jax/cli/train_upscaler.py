"""``raphael-train-upscaler``: train the Real-ESRGAN-style upscaler (Real-ESRNet, then Real-ESRGAN stage).

    raphael-train-upscaler --config configs/upscaler/sr_shapes.py --workdir runs/sr_shapes
    raphael-train-upscaler --config configs/upscaler/sr_shapes.py --workdir runs/sr_ft \\
        --set train.init_from=weights/RealESRGAN_x4plus.safetensors --set model.num_feat=64 --set model.num_block=23

Running the same command again resumes from the newest intact checkpoint; a workdir trained with another
config is refused naming the keys (``--allow-config-change`` accepts them). The EMA generator is written
to ``WORKDIR/generator.safetensors`` (Real-ESRGAN's layout) after every checkpoint: give it to
``raphael-upscale --weights`` or ``raphael-sample --upscale``. See :mod:`raphael_jax.train.upscaler`.
Bad arguments and config values: one line, exit status 2 (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import os

from raphael_jax.cli import add_debug_flag, run_guarded


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="raphael-train-upscaler",
                                description="Train a Real-ESRGAN-style upscaler (RRDBNet + U-Net discriminator).")
    p.add_argument("--config", default="configs/upscaler/sr_shapes.py",
                   help="config file (default configs/upscaler/sr_shapes.py)")
    p.add_argument("--workdir", required=True, help="run folder (checkpoints, metrics, generator.safetensors)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--steps", type=int, default=None, help="stop at this step (default train.num_steps)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a workdir even though the config changed outside the safe keys")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")
    if os.path.isfile(args.workdir):
        p.error(f"--workdir {args.workdir} is a file, not a folder")
    return run_guarded(p.prog, args.debug, lambda: _train(args), system_exit=True)


def _train(args) -> int:
    from raphael_jax.config import load_config
    from raphael_jax.train.upscaler import GENERATOR_FILE, train_upscaler, validate_config

    config = load_config(args.config, args.set, validator=validate_config)
    if config.train.init_from and not os.path.isfile(config.train.init_from):
        raise FileNotFoundError(f"train.init_from {config.train.init_from}: no such file (give an RRDBNet "
                                ".safetensors)")
    last = train_upscaler(config, args.workdir, steps=args.steps, allow_config_change=args.allow_config_change)
    psnr = last.get("val_psnr", float("nan"))
    print(f"done: {os.path.join(args.workdir, GENERATOR_FILE)} (validation PSNR {psnr:.2f} dB); score it with "
          "raphael-eval upscale --weights that file", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
