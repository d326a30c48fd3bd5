"""``raphael-upscale IN OUT --weights W [--scale 4] [--tile N]``: Real-ESRGAN-style upscaling, tiled.

    raphael-upscale sample.png sample_x4.png --weights weights/RealESRGAN_x4plus.safetensors
    raphael-upscale samples/ samples_x4/ --weights runs/sr_shapes/generator.safetensors --tile 128

``--weights``: an RRDBNet in safetensors, either public Real-ESRGAN weights converted with
``raphael-convert esrgan`` (docs/CONVERT.md) or a generator trained with ``raphael-train-upscaler``.
IN is an image file (OUT: a new file) or a folder (every PNG / JPEG / WebP / BMP in it; OUT: a new or
empty folder). Tiles of ``--tile`` input pixels with ``--halo`` pixels of context
(:mod:`raphael_jax.models.upscale_tiling`) run over every local device, with progress and ETA on
stderr; ``--tile 0`` runs each image in one piece. ``--scale`` other than the model's resizes its
output with Lanczos. Nothing is ever overwritten; bad input is one line and exit status 2
(``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from raphael_jax.cli import add_debug_flag, run_guarded

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def build_parser() -> argparse.ArgumentParser:
    from raphael_jax.models.upscale_tiling import DEFAULT_HALO, DEFAULT_TILE

    p = argparse.ArgumentParser(prog="raphael-upscale",
                                description="Upscale images with a Real-ESRGAN-style RRDBNet, tile by tile.")
    p.add_argument("input", metavar="IN", help="an image file, or a folder of images")
    p.add_argument("output", metavar="OUT", help="a new image file (IN a file) or a new or empty folder (IN a folder)")
    p.add_argument("--weights", required=True, help="RRDBNet safetensors (raphael-convert esrgan, or "
                   "raphael-train-upscaler's generator.safetensors)")
    p.add_argument("--scale", type=float, default=None, help="output scale (default: the model's, 4 or 2)")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE,
                   help=f"tile side in input pixels (default {DEFAULT_TILE}; 0: the whole image at once)")
    p.add_argument("--halo", type=int, default=DEFAULT_HALO,
                   help=f"context around each tile in input pixels (default {DEFAULT_HALO})")
    return add_debug_flag(p)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.scale is not None and not args.scale > 0:
        p.error(f"--scale must be positive, got {args.scale}")
    if args.tile < 0 or args.halo < 0:
        p.error("--tile and --halo must be >= 0")
    if args.tile and args.tile <= 2 * args.halo:
        p.error(f"--tile {args.tile} must exceed 2 x --halo ({2 * args.halo}), or be 0 for no tiling")
    return run_guarded(p.prog, args.debug, lambda: _upscale(args), system_exit=True)


def _jobs(src: Path, dst: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs; FileNotFoundError / FileExistsError / ValueError before anything is read."""
    if not src.exists():
        raise FileNotFoundError(f"IN {src} does not exist")
    if src.is_dir():
        files = sorted(f for f in src.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"IN {src} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise FileExistsError(f"OUT {dst} exists and is not an empty folder; refusing to overwrite it")
        stems = [f.stem for f in files]
        clash = sorted({s for s in stems if stems.count(s) > 1})
        if clash:
            raise ValueError(f"IN {src}: several images share the name {clash[0]!r} (e.g. .png and .jpg); they "
                             "would be written to the same OUT/<name>.png: rename one")
        return [(f, dst / (f.stem + ".png")) for f in files]
    if dst.exists():
        raise FileExistsError(f"OUT {dst} exists; refusing to overwrite it: give a new file name")
    if dst.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"OUT {dst}: unknown image type {dst.suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}")
    return [(src, dst)]


def read_picture(path: Path):
    """A uint8 array [H, W, C] (C 1-4) of an image file; ValueError naming a file that is no readable image."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "LA", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None


def _upscale(args) -> int:
    from PIL import Image, PngImagePlugin

    from raphael_jax.convert.esrgan import load_rrdbnet
    from raphael_jax.models.upscale_tiling import UpscaleProgress, upscale_picture

    jobs = _jobs(Path(args.input), Path(args.output))
    pictures = [(src, read_picture(src), dst) for src, dst in jobs[:1]]  # the first is checked before loading
    model = load_rrdbnet(args.weights)
    cfg = model.config
    print(f"RRDBNet x{cfg.scale} ({cfg.num_block} blocks, {cfg.num_feat} features) from {args.weights}", flush=True)
    if jobs[0][1].parent != Path(""):
        os.makedirs(jobs[0][1].parent, exist_ok=True)
    for k, (src, dst) in enumerate(jobs):
        picture = pictures[0][1] if k == 0 else read_picture(src)
        t0 = time.perf_counter()
        out = upscale_picture(model, picture, scale=args.scale, tile=args.tile, halo=args.halo,
                              progress=UpscaleProgress(f"{src.name}"))
        if dst.suffix.lower() in (".jpg", ".jpeg") and out.ndim == 3 and out.shape[-1] in (2, 4):
            print(f"note: {dst.name}: JPEG has no alpha channel; it is dropped", flush=True)
            out = out[..., :-1] if out.shape[-1] == 4 else out[..., 0]
        info = PngImagePlugin.PngInfo()
        info.add_text("upscaled_by", f"raphael-upscale --weights {args.weights} --tile {args.tile} --halo {args.halo}")
        Image.fromarray(out).save(dst, **({"pnginfo": info} if dst.suffix.lower() == ".png" else {}))
        print(f"{src} ({picture.shape[1]}x{picture.shape[0]}) -> {dst} ({out.shape[1]}x{out.shape[0]}) "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
