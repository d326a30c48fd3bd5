"""Upscaling images far larger than memory with an RRDBNet, tile by tile (the paper's 4096 x 6144 outputs, App. 7.8).

The image is cut into overlapping windows of ONE shape (``tile x tile`` input pixels, or the image's
side where it is shorter), laid out by :func:`raphael_jax.models.vae_tiling.tile_layout`: window ``k``
starts at ``clamp(k (tile - 2 halo), 0, side - tile)`` and owns a *core*; the cores partition the
image and every core lies at least ``halo`` input pixels inside its window except at the image's own
edges. Each window is upscaled whole and only its core (times the scale) is kept: the original
Real-ESRGAN's pad-and-crop (``tile_pad``), with no blending, so there are no seams to blend.

Exactness: a 3x3 conv sees one pixel to either side at its resolution, so an output pixel depends on
input pixels within :func:`raphael_jax.models.rrdbnet.receptive_radius` (348 input pixels for the
23-block x4 model). With ``halo`` at least that, tiled equals untiled up to float rounding (tested);
with a smaller halo a core pixel near a window edge sees the conv's zero padding instead of the
neighbouring image, far away in the network's depth. The default ``halo`` of 16 input pixels is
what that costs in practice: the tests bound it on a 6-block model (at most 1 uint8 level apart on
99.9% of pixels) and docs/RESULTS.md measures it on the trained shapes-world upscaler.

Devices: the windows are processed ``len(devices) * per_device`` at a time, sharded over a 1-D mesh
of the local devices (the weights replicated); one compilation serves every chunk (the last one is
padded with blank windows). The next chunk is dispatched before the previous one is copied back, and
each core is written straight into the uint8 output, so host memory holds the input, the uint8
output and two chunks of windows. ``progress(done, total)`` is called after every chunk.
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from raphael_jax.models.rrdbnet import RRDBNet, receptive_radius
from raphael_jax.models.vae_tiling import TileLayout, tile_layout

__all__ = ["DEFAULT_HALO", "DEFAULT_TILE", "UpscaleProgress", "check_image", "exact_halo", "to_uint8",
           "upscale", "upscale_picture", "upscale_tiled"]

DEFAULT_TILE = 256  # input pixels: 0.5 GiB of XLA:CPU temporaries per window for the 23-block x4 model
DEFAULT_HALO = 16  # input pixels of context around every core (Real-ESRGAN's tile_pad is 10)


def exact_halo(model: RRDBNet) -> int:
    """The smallest halo that makes tiling exact (the receptive radius, rounded up to the unshuffle factor)."""
    u = model.config.unshuffle
    return u * math.ceil(receptive_radius(model.config) / u)


def to_uint8(x) -> np.ndarray:
    """[0, 1] floats -> uint8 (round to nearest, clipped), as Real-ESRGAN writes its outputs."""
    return np.clip(np.round(np.asarray(x, np.float32) * 255.0), 0, 255).astype(np.uint8)


def check_image(image: np.ndarray, model: RRDBNet) -> np.ndarray:
    """``image`` as float32 [H, W, C] in [0, 1] (uint8 is divided by 255); ValueError naming what is wrong."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != model.config.num_in_ch:
        raise ValueError(f"expected an image [H, W, {model.config.num_in_ch}], got shape {image.shape}")
    u = model.config.unshuffle
    if image.shape[0] % u or image.shape[1] % u:
        raise ValueError(f"a x{model.scale} RRDBNet needs sides divisible by {u}, got {image.shape[0]}x"
                         f"{image.shape[1]} (pad the image first; raphael-upscale does)")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected a uint8 or float image, got dtype {image.dtype}")
    return image.astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def upscale(model: RRDBNet, images: np.ndarray) -> np.ndarray:
    """The untiled upscale of a batch [B, H, W, C] (uint8 or [0, 1] floats) -> float32 [B, sH, sW, C]."""
    images = np.stack([check_image(im, model) for im in np.asarray(images)])
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(images)), np.float32)


class UpscaleProgress:
    """``progress`` callback printing ``label: tiles k/n, elapsed, ETA`` to a stream at most every ``every`` s."""

    def __init__(self, label: str = "upscaling", stream=None, every: float = 5.0):
        import sys

        self.label, self.stream, self.every = label, stream or sys.stderr, every
        self.start = time.perf_counter()
        self.last = -math.inf

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(done, 1) * (total - done)
        print(f"{self.label}: tiles {done}/{total}  {elapsed:6.1f} s  ETA {eta:6.1f} s", file=self.stream,
              flush=True)


def _windows_mesh(devices: Sequence[jax.Device]) -> Mesh:
    return Mesh(np.asarray(devices), ("tiles",))


def upscale_tiled(
    model: RRDBNet,
    image: np.ndarray,
    *,
    tile: int = DEFAULT_TILE,
    halo: int = DEFAULT_HALO,
    devices: Sequence[jax.Device] | None = None,
    per_device: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Upscale one image [H, W, C] (uint8 or [0, 1] floats) tile by tile -> uint8 [s H, s W, C].

    Args:
      model: the generator (its weights are replicated on ``devices``).
      image: the input; sides divisible by the model's unshuffle factor (2 for x2, 1 for x4).
      tile: window side in input pixels (a shorter image side uses its own length); a multiple of the
        unshuffle factor, more than ``2 * halo``.
      halo: context in input pixels around every core (see the module docstring; :func:`exact_halo`
        gives the exact value).
      devices: where the windows run (default: the local devices); ``per_device`` windows each per call.
      progress: called as ``progress(windows done, windows in all)`` after every chunk.
    """
    x = check_image(image, model)
    u = model.config.unshuffle
    if tile % u or halo % u:
        raise ValueError(f"tile ({tile}) and halo ({halo}) must be multiples of {u} for a x{model.scale} RRDBNet")
    if halo < 0 or tile <= 2 * halo:
        raise ValueError(f"tile ({tile}) must exceed 2 * halo ({2 * halo}) with halo >= 0")
    if per_device < 1:
        raise ValueError(f"per_device must be >= 1, got {per_device}")
    h, w, _ = x.shape
    layout = tile_layout(h, w, tile=tile, halo=halo)
    devices = list(devices or jax.local_devices())
    mesh = _windows_mesh(devices)
    data = NamedSharding(mesh, PartitionSpec("tiles"))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    chunk = len(devices) * per_device
    return _run_windows(graphdef, state, x, layout, chunk, data, model.scale, progress)


def _run_windows(graphdef, state, x: np.ndarray, layout: TileLayout, chunk: int, data: NamedSharding,
                 scale: int, progress) -> np.ndarray:
    th, tw = layout.tile_h, layout.tile_w
    tiles = list(layout.tiles())
    total = len(tiles)
    out = np.empty((layout.height * scale, layout.width * scale, x.shape[-1]), np.uint8)

    def collect(batch, result):
        result = np.asarray(result)
        for (wy, wx, (y0, y1, x0, x1)), y in zip(batch, result):
            s = scale
            out[(wy + y0) * s:(wy + y1) * s, (wx + x0) * s:(wx + x1) * s] = to_uint8(y[y0 * s:y1 * s, x0 * s:x1 * s])

    pending, done = None, 0
    for start in range(0, total, chunk):
        batch = tiles[start:start + chunk]
        windows = np.zeros((chunk, th, tw, x.shape[-1]), np.float32)
        for i, (wy, wx, _) in enumerate(batch):
            windows[i] = x[wy:wy + th, wx:wx + tw]
        result = _forward(graphdef, state, jax.device_put(windows, data))
        if pending is not None:
            collect(*pending)
            done += len(pending[0])
            if progress is not None:
                progress(done, total)
        pending = (batch, result)
    collect(*pending)
    if progress is not None:
        progress(total, total)
    return out


def upscale_picture(
    model: RRDBNet,
    picture: np.ndarray,
    *,
    scale: float | None = None,
    tile: int = DEFAULT_TILE,
    halo: int = DEFAULT_HALO,
    devices: Sequence[jax.Device] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Upscale a uint8 picture [H, W] or [H, W, 1-4] as a file holds it -> uint8 [round(s H), round(s W), C].

    Grey pictures go through the model as RGB and come back grey; an alpha channel is upscaled with
    bicubic interpolation (Real-ESRGAN offers the same); sides the model cannot take (odd sides for
    x2) are reflect-padded and the padding cropped from the output. ``tile`` 0 runs the image in one
    piece. ``scale`` other than the model's resizes the model's output with Lanczos, as Real-ESRGAN's
    ``--outscale`` does.
    """
    from PIL import Image

    pic = np.asarray(picture)
    if pic.dtype != np.uint8:
        raise ValueError(f"expected a uint8 picture, got dtype {pic.dtype} (8-bit images only)")
    if pic.ndim == 2:
        pic = pic[..., None]
    if pic.ndim != 3 or pic.shape[-1] not in (1, 2, 3, 4) or min(pic.shape[:2]) < 1:
        raise ValueError(f"expected a picture [H, W] or [H, W, 1-4], got shape {np.asarray(picture).shape}")
    h, w, c = pic.shape
    grey, alpha = c in (1, 2), c in (2, 4)
    rgb = np.repeat(pic[..., :1], 3, axis=-1) if grey else pic[..., :3]
    u, s = model.config.unshuffle, model.scale
    ph, pw = (-h) % u, (-w) % u
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
    if tile == 0:
        out = to_uint8(upscale(model, rgb[None])[0])
        if progress is not None:
            progress(1, 1)
    else:
        out = upscale_tiled(model, rgb, tile=tile, halo=halo, devices=devices, progress=progress)
    out = out[:h * s, :w * s]
    if grey:
        out = out[..., :1]
    if alpha:
        a = Image.fromarray(pic[..., -1]).resize((w * s, h * s), Image.Resampling.BICUBIC)
        out = np.concatenate([out, np.asarray(a)[..., None]], axis=-1)
    if scale is not None and scale != s:
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        out = np.stack([np.asarray(Image.fromarray(out[..., k]).resize(size, Image.Resampling.LANCZOS))
                        for k in range(out.shape[-1])], axis=-1)
    return out[..., 0] if np.asarray(picture).ndim == 2 else out
