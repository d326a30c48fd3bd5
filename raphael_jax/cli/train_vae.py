"""``raphael-train-vae``: train a small KL autoencoder on the shapes world, saved as a diffusers AutoencoderKL.

    raphael-train-vae --out runs/vae64                  # the defaults: 64 px, latents 16x16x4
    raphael-train-vae --out runs/vae32 --image-size 32 --channels 16,32 --steps 500
    raphael-train-vae --evaluate runs/vae64 --max-objects 1       # score a saved one (no training)

Writes OUT/config.json + OUT/diffusion_pytorch_model.safetensors (read by
``raphael_jax.convert.load_autoencoder``, ``raphael-precompute --vae`` and diffusers) and OUT/report.json
(losses, measured scaling factor, held-out PSNR and analyzer scores); see
:func:`raphael_jax.train.autoencoder.train_autoencoder`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

# Defaults: 12 minutes on the 2-core CPU (716 s with JAX 0.10.2; README "The latent shapes world").
DEFAULTS = dict(image_size=64, steps=1000, batch_size=4, channels="16,32,64", latent_channels=4,
                layers_per_block=1, lr=2e-3, kl_weight=1e-6, reconstruction="mse", l1_weight=0.1,
                edge_weight=4.0, min_objects=1, max_objects=3, seed=0, num_eval=512, log_every=100)


def _channels(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"channel counts must be positive, got {text!r}")
    return values


def main(argv=None) -> int:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="raphael-train-vae",
        description="Train a KL autoencoder (diffusers AutoencoderKL architecture) on shapes-world images and "
        "save it as a diffusers save_pretrained directory, with the measured latent scaling factor.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="new or empty output directory (never overwritten)")
    what.add_argument("--evaluate", metavar="VAE_DIR",
                      help="only score a saved autoencoder on held-out scenes (--num-eval, --seed, --min/max-objects, "
                      "--image-size if given); prints JSON")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"image side in pixels (>= 32; default {d['image_size']}, or the saved VAE's sample_size)")
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--channels", type=_channels, default=_channels(d["channels"]),
                   help="block_out_channels, comma-separated; latents are image-size / 2**(n-1) square "
                   f"(default {d['channels']})")
    p.add_argument("--latent-channels", type=int, default=d["latent_channels"])
    p.add_argument("--layers-per-block", type=int, default=d["layers_per_block"])
    p.add_argument("--norm-groups", type=int, default=None,
                   help="GroupNorm groups (default: the largest power of two <= 32 dividing every channel count)")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak AdamW learning rate (warm-up, cosine decay)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--kl-weight", type=float, default=d["kl_weight"], help="weight of the KL term (LDM: 1e-6)")
    p.add_argument("--reconstruction", choices=("mse", "l1"), default=d["reconstruction"],
                   help="reconstruction error: squared (+ --l1-weight x absolute) or absolute")
    p.add_argument("--l1-weight", type=float, default=d["l1_weight"], help="absolute-error weight added to mse")
    p.add_argument("--edge-weight", type=float, default=d["edge_weight"],
                   help="extra weight of pixels at shape edges (weight 1 + this; 0 for none)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--min-objects", type=int, default=d["min_objects"], help="objects per training/held-out scene")
    p.add_argument("--max-objects", type=int, default=d["max_objects"])
    p.add_argument("--num-eval", type=int, default=d["num_eval"], help="held-out images for the scaling factor, "
                   "PSNR and analyzer scores")
    p.add_argument("--log-every", type=int, default=d["log_every"])
    a = p.parse_args(argv)
    if not 1 <= a.min_objects <= a.max_objects <= 9:
        p.error(f"need 1 <= --min-objects <= --max-objects <= 9, got {a.min_objects}, {a.max_objects}")
    if a.evaluate is not None:
        return _evaluate(p, a)
    a.image_size = d["image_size"] if a.image_size is None else a.image_size
    for flag, value, low in (("--image-size", a.image_size, 32), ("--steps", a.steps, 1),
                             ("--batch-size", a.batch_size, 1), ("--latent-channels", a.latent_channels, 1),
                             ("--layers-per-block", a.layers_per_block, 1), ("--num-eval", a.num_eval, 1),
                             ("--log-every", a.log_every, 1), ("--warmup-steps", a.warmup_steps, 0)):
        if value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    if not a.lr > 0:
        p.error(f"--lr must be positive, got {a.lr}")
    for flag, value in (("--kl-weight", a.kl_weight), ("--l1-weight", a.l1_weight), ("--edge-weight", a.edge_weight)):
        if not value >= 0:
            p.error(f"{flag} must be >= 0, got {value}")
    factor = 2 ** (len(a.channels) - 1)
    if a.image_size % factor:
        p.error(f"--image-size {a.image_size} is not divisible by the downsampling factor {factor} of "
                f"{len(a.channels)} blocks")
    groups = a.norm_groups
    if groups is not None and (groups < 1 or any(c % groups for c in a.channels)):
        p.error(f"--norm-groups {groups} must divide every channel count {list(a.channels)}")
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        p.error(f"--out {out} exists and is not an empty directory; refusing to overwrite it")

    from raphael_jax.train.autoencoder import train_autoencoder

    train_autoencoder(out, image_size=a.image_size, block_out_channels=a.channels,
                      layers_per_block=a.layers_per_block, latent_channels=a.latent_channels,
                      norm_num_groups=groups, steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr,
                      warmup_steps=a.warmup_steps, kl_weight=a.kl_weight, seed=a.seed,
                      min_objects=a.min_objects, max_objects=a.max_objects, reconstruction=a.reconstruction,
                      l1_weight=a.l1_weight, edge_weight=a.edge_weight, num_eval=a.num_eval,
                      log_every=a.log_every, verbose=True)
    return 0


def _evaluate(p: argparse.ArgumentParser, a) -> int:
    import json

    vae = Path(a.evaluate)
    if not (vae / "config.json").is_file():
        p.error(f"--evaluate {vae}: no config.json there (expected a diffusers AutoencoderKL directory)")
    if a.num_eval < 1 or (a.image_size is not None and a.image_size < 32):
        p.error("--evaluate needs --num-eval >= 1 and --image-size >= 32")
    from raphael_jax.train.autoencoder import evaluate_autoencoder

    try:
        result = evaluate_autoencoder(vae, seed=a.seed, num_eval=a.num_eval, min_objects=a.min_objects,
                                      max_objects=a.max_objects, image_size=a.image_size)
    except ValueError as e:
        p.error(f"--evaluate {vae}: {e}")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
