"""``raphael-convert``: convert public PyTorch weights once (safetensors or orbax; nothing unpickles on load).

    raphael-convert clip weights/clip-vit-g-14 converted/clip-vit-g-14-text [--variant fp16] [--param-dtype bfloat16]
    raphael-convert vae  weights/sd-vae-ft-mse converted/sd-vae-ft-mse [--from-pickle]
    raphael-convert inception weights/pt_inception-2015-12-05-6726825d.pth weights/fid_inception.safetensors
    raphael-convert esrgan weights/RealESRGAN_x4plus.pth weights/RealESRGAN_x4plus.safetensors [--key params_ema]

``clip`` / ``vae``: a transformers / diffusers ``save_pretrained`` directory -> an orbax checkpoint that
``raphael_jax.convert.load_converted`` restores (:func:`raphael_jax.convert.orbax.convert`, docs/CONVERT.md).
``inception``: pytorch-fid's Inception ``.pth`` -> safetensors for FID
(:func:`raphael_jax.evaluation.inception.convert_pytorch_fid_weights`, docs/EVALUATION.md).
``esrgan``: a Real-ESRGAN generator ``.pth`` (RRDBNet) -> safetensors for the upscaler
(:func:`raphael_jax.convert.esrgan.convert_esrgan_weights`, docs/CONVERT.md).

Everything is checked before anything is written: a missing, truncated or corrupt source (config.json,
safetensors, .bin, .pth) or an existing output is refused with one line and exit status 2, leaving the
output as it was (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse

from raphael_jax.cli import add_debug_flag, run_guarded


def build_parser() -> argparse.ArgumentParser:
    from raphael_jax.evaluation.inception import FID_WEIGHTS_FILE, FID_WEIGHTS_URL

    p = argparse.ArgumentParser(
        prog="raphael-convert",
        description="Convert a transformers CLIP text model or a diffusers AutoencoderKL directory "
        "(safetensors) into an orbax checkpoint that raphael_jax.convert.load_converted restores, or "
        "pytorch-fid's Inception weights (.pth) to safetensors for raphael_jax FID, or a Real-ESRGAN generator "
        "(.pth) to safetensors for the upscaler.",
    )
    sub = p.add_subparsers(dest="kind", required=True)
    for kind, what in (("clip", "CLIP text tower"), ("vae", "AutoencoderKL")):
        c = sub.add_parser(kind, help=f"{what}: save_pretrained directory -> orbax checkpoint")
        c.add_argument("src_dir", help="save_pretrained directory (config.json + *.safetensors)")
        c.add_argument("out_dir", help="new or empty output directory (never overwritten)")
        c.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
        c.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        c.add_argument(
            "--from-pickle",
            action="store_true",
            help="read pytorch_model.bin / diffusion_pytorch_model.bin with torch.load(weights_only=True) "
            "(needs torch) and also write a safetensors copy to OUT_DIR/source",
        )
    i = sub.add_parser("inception", help=f"{FID_WEIGHTS_FILE} -> safetensors (download: {FID_WEIGHTS_URL})")
    i.add_argument("src", help="pytorch-fid state dict, e.g. " + FID_WEIGHTS_FILE)
    i.add_argument("out", help="new .safetensors file (never overwritten)")
    i.add_argument("--channel-divisor", type=int, default=1, help=argparse.SUPPRESS)  # tests only
    e = sub.add_parser("esrgan", help="Real-ESRGAN generator (RRDBNet) .pth -> safetensors, e.g. RealESRGAN_x4plus.pth "
                       "(download: https://github.com/xinntao/Real-ESRGAN/releases)")
    e.add_argument("src", help="Real-ESRGAN / ESRGAN .pth, e.g. RealESRGAN_x4plus.pth or RealESRGAN_x2plus.pth")
    e.add_argument("out", help="new .safetensors file (never overwritten)")
    e.add_argument("--key", default=None,
                   help="the .pth's key holding the state dict (default: params_ema if present, else params, "
                   "else the file itself)")
    return add_debug_flag(p)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    return run_guarded(p.prog, args.debug, lambda: _convert(args))


def _convert(args) -> int:
    if args.kind == "esrgan":
        from raphael_jax.convert.esrgan import convert_esrgan_weights, describe, infer_rrdbnet_config
        from raphael_jax.convert.safetensors_io import safetensors_shapes

        out = convert_esrgan_weights(args.src, args.out, key=args.key)
        arch = describe(infer_rrdbnet_config(safetensors_shapes([out])))
        print(f"wrote {out}: {arch}; upscale with `raphael-upscale IN OUT --weights {out}`")
        return 0
    if args.kind == "inception":
        from raphael_jax.evaluation.inception import InceptionConfig, convert_pytorch_fid_weights

        out = convert_pytorch_fid_weights(args.src, args.out, InceptionConfig(channel_divisor=args.channel_divisor))
        print(f"wrote {out}; load with raphael_jax.evaluation.inception.load_inception({str(out)!r})")
        return 0
    import jax.numpy as jnp

    from raphael_jax.convert.orbax import convert

    out = convert(args.kind, args.src_dir, args.out_dir, from_pickle=args.from_pickle, variant=args.variant,
                  param_dtype=jnp.dtype(args.param_dtype))
    print(f"wrote {out} ({args.kind}); restore with raphael_jax.convert.load_converted({str(out)!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
