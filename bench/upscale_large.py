"""The paper's output size: ``raphael-upscale`` from 1024 x 1536 to 4096 x 6144 with the full x4 RRDBNet.

    python bench/upscale_large.py --note "nothing else ran"          # ~25-35 min on the 2-core CPU
    python bench/upscale_large.py --size 64x96 --tile 48 --out /tmp/x.md   # a smoke run

RAPHAEL's showcase images are 4096 x 6144 (the paper, App. 7.8, upscaled by a Real-ESRGAN-style
SR-GAN). This runs the real command (``python -m raphael_jax.cli.upscale``) in a child process on a
``--size`` (W x H) picture, a shapes-world scene rendered at the larger side and cropped, with the
published RealESRGAN_x4plus architecture (23 RRDBs, 64 features). The public weights cannot be
downloaded here, so the generator has its own random initialisation, saved to safetensors first: the
compute and memory are those of the real weights. Reported: wall time of the command (model loading,
compilation and the PNG included), the command's own upscaling time, the number of tiles, and the
child's peak RSS (``getrusage(RUSAGE_CHILDREN)``; the goal is under 6 GiB), written to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ROOT, cpu_model, log, write_lines  # noqa: E402

GOAL_GIB = 6.0


def make_inputs(folder: str, width: int, height: int, preset: str, seed: int = 0) -> tuple[str, str]:
    """(picture path, weights path) under ``folder``."""
    import numpy as np
    from flax import nnx
    from PIL import Image

    from raphael_jax.convert.esrgan import save_rrdbnet
    from raphael_jax.data.shapes.world import example
    from raphael_jax.models.rrdbnet import PRESETS, RRDBNet

    side = max(width, height)
    scene = example(seed, 0, max(side, 32), 3, 3)["image"][:height, :width]
    picture = os.path.join(folder, "in.png")
    Image.fromarray(np.ascontiguousarray(scene)).save(picture)
    weights = os.path.join(folder, "generator.safetensors")
    save_rrdbnet(RRDBNet(PRESETS[preset], rngs=nnx.Rngs(seed)), weights, source=f"random {preset}")
    return picture, weights


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected WxH, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=(1024, 1536), help="input W x H (default 1024x1536)")
    p.add_argument("--tile", type=int, default=544, help="raphael-upscale --tile (default 544: 6 windows)")
    p.add_argument("--halo", type=int, default=16)
    p.add_argument("--preset", default="RealESRGAN_x4plus")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "upscale_large.md"))
    p.add_argument("--note", default="", help="what else ran on the machine")
    args = p.parse_args(argv)
    width, height = args.size
    with tempfile.TemporaryDirectory(prefix="raphael_upscale_") as tmp:
        log(f"writing a {width}x{height} picture and random {args.preset} weights")
        picture, weights = make_inputs(tmp, width, height, args.preset)
        out = os.path.join(tmp, "out.png")
        cmd = [sys.executable, "-u", "-m", "raphael_jax.cli.upscale", picture, out, "--weights", weights,
               "--tile", str(args.tile), "--halo", str(args.halo)]
        log(f"running {shlex.join(cmd)}")
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - t0
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            raise SystemExit(f"raphael-upscale failed with exit status {proc.returncode}")
        from PIL import Image

        with Image.open(out) as im:
            out_size = im.size
    tiles = re.findall(r"tiles (\d+)/(\d+)", proc.stderr)
    inner = re.search(r"in ([\d.]+) s", proc.stdout)
    model_line = proc.stdout.splitlines()[0] if proc.stdout else ""
    lines = [
        f"# raphael-upscale {width}x{height} -> {out_size[0]}x{out_size[1]} (`bench/upscale_large.py`)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, CPU only. {args.note}".rstrip(),
        f"Command: `python bench/upscale_large.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        f"Model: {model_line} (random initialisation; the published weights have the same shapes).",
        f"Tiles: {tiles[-1][1] if tiles else '?'} windows of {args.tile} px with a {args.halo} px halo.",
        "",
        "| wall (command) | upscaling (the command's own timing) | peak RSS | goal |",
        "|---:|---:|---:|---|",
        f"| {wall:.0f} s | {float(inner.group(1)) if inner else float('nan'):.0f} s | {peak_gib:.2f} GiB | "
        f"< {GOAL_GIB:.0f} GiB: {'met' if peak_gib < GOAL_GIB else 'NOT met'} |",
    ]
    write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
