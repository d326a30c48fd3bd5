"""Scoring an upscaler on held-out shapes-world scenes against bicubic upscaling (``raphael-eval upscale``).

For ``num`` scenes of a test stream (shapes world stream 2, never read by the trainers: training reads
stream 0, the upscaler's validation stream 1), the HR image is the scene rendered at ``hr_size``
and the upscaler's input is one of:

* ``bicubic``: the HR image downscaled with bicubic interpolation (a clean input);
* ``degraded``: Real-ESRGAN's high-order degradation of it (``raphael_jax/data/degrade.py``, the
  training distribution; drawn from ``seed``);
* ``render``: the same scene rendered natively at ``hr_size / scale`` px (what the 32 px diffusion
  model makes; the renderer draws the shapes at their own resolution, so this input is not a
  downscale of the HR image and the upscaler has to redraw it).

For each input the upscaled image (RRDBNet, untiled) and the bicubic upscale of the same input are
compared with the HR image: PSNR in dB over all pixels, the per-image PSNR gain (mean and its
standard error, paired), and the analyzer's accuracy (``raphael_jax/data/shapes/analyzer.py``:
colour, place, kind, size of every object) on the upscaled, bicubic and HR images.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from raphael_jax.data.degrade import CLEAN, DegradeConfig, bicubic_resize, degrade_batch
from raphael_jax.data.shapes import analyzer
from raphael_jax.data.shapes.world import example
from raphael_jax.models.rrdbnet import RRDBNet
from raphael_jax.models.upscale_tiling import to_uint8, upscale
from raphael_jax.train.autoencoder import psnr

__all__ = ["INPUTS", "TEST_STREAM", "evaluate_upscaler", "psnr", "report_markdown", "test_scenes",
           "tiling_agreement"]

INPUTS = ("bicubic", "degraded", "render")
TEST_STREAM = 2
_KEEP = (*analyzer.ATTRIBUTES, "all")


def _per_image_psnr(reference: np.ndarray, images: np.ndarray) -> np.ndarray:
    d = (reference.astype(np.float64) - images.astype(np.float64)) ** 2
    mse = np.maximum(d.reshape(len(d), -1).mean(1), 1e-12)
    return 10.0 * np.log10(255.0**2 / mse)


def test_scenes(seed: int, num: int, size: int, min_objects: int, max_objects: int):
    """(uint8 images [num, size, size, 3], object lists) of the test stream."""
    exs = [example(seed, i, size, min_objects, max_objects, stream=TEST_STREAM) for i in range(num)]
    return np.stack([e["image"] for e in exs]), [e["objects"] for e in exs]


def _inputs(kind: str, hr: np.ndarray, seed: int, scale: int, min_objects: int, max_objects: int) -> np.ndarray:
    if kind == "bicubic":
        return degrade_batch(hr, scale, np.random.default_rng([seed, 1]), CLEAN)
    if kind == "degraded":
        return degrade_batch(hr, scale, np.random.default_rng([seed, 2]), DegradeConfig())
    if kind == "render":
        lr, _ = test_scenes(seed, len(hr), hr.shape[1] // scale, min_objects, max_objects)
        return lr.astype(np.float32) / 255.0
    raise ValueError(f"unknown input kind {kind!r}; expected one of {INPUTS}")


def _scores(images, objects) -> dict:
    s = analyzer.score(images, objects)
    return {k: s[k] for k in _KEEP}


def evaluate_upscaler(model: RRDBNet, *, seed: int = 1234, num: int = 256, hr_size: int = 128,
                      min_objects: int = 1, max_objects: int = 3, inputs=INPUTS, batch_size: int = 16,
                      progress=None) -> dict:
    """The measurement of the module docstring, as a JSON-ready dict (one entry per input kind)."""
    scale = model.scale
    if hr_size % (scale * model.config.unshuffle) or hr_size // scale < 32 and "render" in inputs:
        raise ValueError(f"hr_size {hr_size} must be divisible by the scale {scale} (and hr_size / scale >= 32 "
                         "for the 'render' input, the shapes world's smallest size)")
    for kind in inputs:
        if kind not in INPUTS:
            raise ValueError(f"unknown input kind {kind!r}; expected some of {', '.join(INPUTS)}")
    hr, objects = test_scenes(seed, num, hr_size, min_objects, max_objects)
    out = {"seed": seed, "num": num, "hr_size": hr_size, "scale": scale, "stream": TEST_STREAM,
           "scores_hr": _scores(hr, objects), "inputs": {}}
    for kind in inputs:
        lr = _inputs(kind, hr, seed, scale, min_objects, max_objects)
        sr = np.concatenate([to_uint8(upscale(model, lr[i:i + batch_size]))
                             for i in range(0, num, batch_size)])
        bic = to_uint8(np.stack([bicubic_resize(x, (hr_size, hr_size)) for x in lr]))
        gain = _per_image_psnr(hr, sr) - _per_image_psnr(hr, bic)
        out["inputs"][kind] = {
            "psnr_upscaler": psnr(hr, sr), "psnr_bicubic": psnr(hr, bic),
            "psnr_gain_mean": float(gain.mean()), "psnr_gain_se": float(gain.std(ddof=1) / math.sqrt(num))
            if num > 1 else float("nan"),
            "scores_upscaler": _scores(sr, objects), "scores_bicubic": _scores(bic, objects),
        }
        if progress is not None:
            progress(kind, out["inputs"][kind])
    return out


def tiling_agreement(model: RRDBNet, *, seed: int = 1234, num: int = 8, size: int = 128, tile: int = 48,
                     halo: int = 16, min_objects: int = 1, max_objects: int = 3) -> dict:
    """How far tiled upscaling is from untiled on ``num`` test scenes rendered at ``size`` px (inputs larger
    than the tiles, so every image is cut into several windows): the fraction of uint8 values within one
    level, identical, and the largest difference."""
    from raphael_jax.models.upscale_tiling import upscale_tiled

    images, _ = test_scenes(seed, num, size, min_objects, max_objects)
    diffs = []
    for image in images:
        full = to_uint8(upscale(model, image[None])[0])
        diffs.append(np.abs(upscale_tiled(model, image, tile=tile, halo=halo).astype(int) - full.astype(int)))
    d = np.stack(diffs)
    return {"num": num, "size": size, "tile": tile, "halo": halo, "within_1": float((d <= 1).mean()),
            "identical": float((d == 0).mean()), "max_diff": int(d.max())}


def example_grid(model: RRDBNet, *, seed: int = 1234, num: int = 4, hr_size: int = 128, kind: str = "render",
                 min_objects: int = 1, max_objects: int = 3) -> np.ndarray:
    """uint8 picture: per row one test scene as (input, nearest-upscaled), bicubic, upscaler, HR."""
    hr, _ = test_scenes(seed, num, hr_size, min_objects, max_objects)
    lr = _inputs(kind, hr, seed, model.scale, min_objects, max_objects)
    sr = to_uint8(upscale(model, jnp.asarray(lr)))
    bic = to_uint8(np.stack([bicubic_resize(x, (hr_size, hr_size)) for x in lr]))
    near = to_uint8(np.repeat(np.repeat(lr, model.scale, 1), model.scale, 2))
    rows = [np.concatenate([near[i], bic[i], sr[i], hr[i]], axis=1) for i in range(num)]
    return np.concatenate(rows, axis=0)


def report_markdown(result: dict) -> str:
    """A markdown table of :func:`evaluate_upscaler`'s result."""
    lines = [f"{result['num']} test scenes (stream {result['stream']}, seed {result['seed']}), "
             f"{result['hr_size'] // result['scale']} -> {result['hr_size']} px; analyzer on the HR images: "
             + ", ".join(f"{k} {v:.3f}" for k, v in result["scores_hr"].items()),
             "",
             "| input | method | PSNR dB | gain dB (mean +- SE) | colour | place | kind | size | all |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, r in result["inputs"].items():
        for method in ("bicubic", "upscaler"):
            s = r[f"scores_{method}"]
            gain = f"{r['psnr_gain_mean']:+.2f} +- {r['psnr_gain_se']:.2f}" if method == "upscaler" else ""
            lines.append(f"| {kind} | {method} | {r[f'psnr_{method}']:.2f} | {gain} | "
                         + " | ".join(f"{s[k]:.3f}" for k in _KEEP) + " |")
    if "tiling" in result:
        t = result["tiling"]
        lines += ["", f"Tiled ({t['tile']} px windows, halo {t['halo']}) against untiled on {t['num']} scenes of "
                  f"{t['size']} px: {100 * t['within_1']:.4f}% of values within 1 level, {100 * t['identical']:.4f}% "
                  f"identical, largest difference {t['max_diff']}."]
    return "\n".join(lines)
