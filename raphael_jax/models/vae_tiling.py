"""Decoding large images with the KL VAE in spatial tiles, equal to the untiled decode.

RAPHAEL diffuses in the latent space of an image autoencoder (the paper, Sec. 3, following LDM);
``raphael_jax/models/autoencoder.py`` holds that VAE. Decoding a large latent in one piece needs
the activations of the decoder's widest, full-resolution layers for the whole image at once; this
module decodes it in tiles so the device only ever holds a few tiles, and the result equals
``AutoencoderKL.decode`` up to float rounding (the same arithmetic, in another order).

Decoding each tile on its own (and blending the overlaps) is not the same function: every GroupNorm
would normalise with per-tile statistics and the mid-block attention would only see the tile.
Here:

* ``post_quant_conv``, ``decoder.conv_in`` and ``decoder.mid_block`` (which holds the global
  attention) run untiled at latent resolution, where they are cheap.
* The rest of the decoder (up blocks, ``conv_norm_out``, SiLU, ``conv_out``) runs on windows of one
  fixed latent shape ``T x T`` (a side shorter than ``T`` uses the image size), overlapping by a halo
  of ``R >= receptive_radius(cfg)`` latent pixels. Each window owns a *core*; the cores partition the
  image and every core lies at least ``R`` latent pixels from any window edge that is not an image
  edge, so the SAME zero padding of the convolutions never reaches a core value (at an image edge
  the window edge is the image edge and the padding is the decoder's own).
* Every GroupNorm uses the statistics of the whole image: the up path runs segment by segment, each
  segment ending where a GroupNorm begins. A segment returns, per window, the mean and the centred
  sum of squares of its output over the core only (a core mask built inside the jitted function
  keeps the reduction shape-static); the host merges them in float64 (mean = count-weighted mean of
  the core means; variance = (sum of centred squares + sum of count * (core mean - mean)^2) / count)
  into per-sample, per-group mean and variance, which the next segment applies with the module's own
  scale, bias and epsilon.
* The output image is the union of the cores (times the VAE factor); no blending is needed, because
  nothing is approximate.

Memory: between segments the windows' activations live in host (numpy) memory (up to three
window-stacked arrays of the current layer: a resnet's input, its inner activation and its output);
the device holds the weights, the latent-resolution part (including the mid-block attention over all
h * w latent positions, untiled) and, per segment, ``chunk`` windows, at most two chunks in flight.
Compilation: each segment function is jitted with the module's graph definition as a static argument
and its weights as ordinary arguments, so modules of equal structure and shape (e.g. the resnets of
one up block) share one compilation. Segment shapes depend only on the window shape and the chunk
(``min(chunk, B * windows)``), so another image size with the same window shape recompiles only the
latent-resolution part.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raphael_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig

__all__ = ["TileLayout", "decode_latents_tiled", "decode_tiled", "receptive_radius", "tile_layout"]


def receptive_radius(cfg: AutoencoderKLConfig) -> int:
    """Latent pixels a value of the decoder's up path (after the mid block) can see to either side.

    Every 3x3 convolution at resolution scale ``s = 2^k`` (relative to the latent) widens the
    dependence by ``1/s`` latent pixels: ``2 (layers_per_block + 1)`` of them per up block, the
    upsampler conv of every block but the last (at the next scale), and ``conv_out`` at the final
    scale. Nearest upsampling and the 1x1 shortcuts add nothing. The sum, rounded up, is exact for
    windows aligned to latent pixels (a wrong value at distance ``< sum`` from a zero-padded window
    edge never reaches a core at distance ``ceil(sum)``), so no extra margin is needed.
    """
    n = len(cfg.block_out_channels)
    r = Fraction(0)
    for i in range(n):
        r += Fraction(2 * (cfg.layers_per_block + 1), 2**i)
        if i < n - 1:
            r += Fraction(1, 2 ** (i + 1))
    r += Fraction(1, 2 ** (n - 1))
    return math.ceil(r)


def _axis_tiles(n: int, tile: int, halo: int) -> tuple[tuple[int, int, int], ...]:
    """(window start, core start, core stop) along one axis of length n, absolute latent pixels."""
    t = min(tile, n)
    if t == n:
        return ((0, 0, n),)
    stride = t - 2 * halo
    starts = [min(k * stride, n - t) for k in range(1 + -(-(n - t) // stride))]
    # Any boundary in [s_{k+1} + halo, s_k + t - halo] keeps both cores halo px inside; take the middle.
    bounds = [0] + [(starts[k] + starts[k + 1] + t) // 2 for k in range(len(starts) - 1)] + [n]
    return tuple((s, bounds[k], bounds[k + 1]) for k, s in enumerate(starts))


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """The windows of a tiled decode, in latent pixels.

    ``rows`` / ``cols``: per window row / column ``(window start, core start, core stop)``; every
    window is ``tile_h x tile_w``; the cores partition the ``height x width`` latent.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    halo: int
    rows: tuple[tuple[int, int, int], ...]
    cols: tuple[tuple[int, int, int], ...]

    @property
    def n_tiles(self) -> int:
        return len(self.rows) * len(self.cols)

    def tiles(self) -> Iterator[tuple[int, int, tuple[int, int, int, int]]]:
        """Per window: (row start, col start, core (y0, y1, x0, x1) relative to the window)."""
        for wy, cy0, cy1 in self.rows:
            for wx, cx0, cx1 in self.cols:
                yield wy, wx, (cy0 - wy, cy1 - wy, cx0 - wx, cx1 - wx)


def tile_layout(height: int, width: int, *, tile: int, halo: int) -> TileLayout:
    """Windows of ``min(tile, side)`` latent pixels starting at ``clamp(k (tile - 2 halo), 0, side - tile)``."""
    if halo < 0 or tile <= 2 * halo:
        raise ValueError(f"tile ({tile}) must exceed 2 * halo ({2 * halo}) with halo >= 0")
    return TileLayout(
        height=height,
        width=width,
        tile_h=min(tile, height),
        tile_w=min(tile, width),
        halo=halo,
        rows=_axis_tiles(height, tile, halo),
        cols=_axis_tiles(width, tile, halo),
    )


# --------------------------------------------------------------------------- jitted segments


def _split(module: nnx.Module | None):
    return (None, None) if module is None else nnx.split(module)


def _merge(graphdef, state):
    return None if graphdef is None else nnx.merge(graphdef, state)


def _group_norm(norm: nnx.GroupNorm, x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """``norm(x)`` with given per-unit statistics ``mean``, ``var`` [n, groups] (as flax's GroupNorm applies them)."""
    scale = norm.scale[...] if norm.scale is not None else None
    bias = norm.bias[...] if norm.bias is not None else None
    x, scale, bias = norm.promote_dtype((x, scale, bias), dtype=norm.dtype)
    per_group = x.shape[-1] // norm.num_groups
    mean = jnp.repeat(mean, per_group, axis=-1)[:, None, None, :]
    var = jnp.repeat(var, per_group, axis=-1)[:, None, None, :]
    y = x - mean
    mul = jax.lax.rsqrt(var + norm.epsilon)
    if scale is not None:
        mul = mul * scale
    y = y * mul
    if bias is not None:
        y = y + bias
    return y.astype(norm.dtype if norm.dtype is not None else x.dtype)


def _core_stats(y: jax.Array, core: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """Per unit and group: mean and centred sum of squares of ``y`` [n, H, W, C] over its core.

    ``core`` [n, 4] int32 is (y0, y1, x0, x1) in ``y``'s pixels; an empty core gives zeros.
    """
    n, h, w, c = y.shape
    y = y.astype(jnp.promote_types(y.dtype, jnp.float32)).reshape(n, h, w, groups, c // groups)
    iy = jnp.arange(h)[None, :, None]
    ix = jnp.arange(w)[None, None, :]
    c0, c1, c2, c3 = (core[:, i, None, None] for i in range(4))
    mask = ((iy >= c0) & (iy < c1) & (ix >= c2) & (ix < c3)).astype(y.dtype)[..., None, None]
    count = jnp.maximum(mask.sum((1, 2, 3, 4)) * (c // groups), 1.0)[:, None]
    mean = (y * mask).sum((1, 2, 4)) / count
    m2 = (mask * jnp.square(y - mean[:, None, None, :, None])).sum((1, 2, 4))
    return mean, m2


@functools.partial(jax.jit, static_argnums=(0, 2, 4))
def _head(gd_pq, st_pq, gd_in, st_in, gd_mid, st_mid, z):
    pq = _merge(gd_pq, st_pq)
    if pq is not None:
        z = pq(z)
    return _merge(gd_mid, st_mid)(_merge(gd_in, st_in)(z))


@functools.partial(jax.jit, static_argnums=(0,))
def _full_decode(gd, st, z):
    return _merge(gd, st).decode(z)


@functools.partial(jax.jit, static_argnames=("gd", "groups"))
def _resnet_first(gd, st, x, mean, var, core, groups):
    """conv1(silu(norm1(x))) and its core statistics (for norm2)."""
    r = _merge(gd, st)
    h = r.conv1(jax.nn.silu(_group_norm(r.norm1, x, mean, var)))
    return (h, *_core_stats(h, core, groups))


@functools.partial(jax.jit, static_argnames=("gd", "gd_up", "groups"))
def _resnet_second(gd, st, gd_up, st_up, x, h, mean, var, core, groups):
    """shortcut(x) + conv2(silu(norm2(h))), then the upsampler if any, and its core statistics."""
    r = _merge(gd, st)
    y = r.conv2(jax.nn.silu(_group_norm(r.norm2, h, mean, var)))
    if r.conv_shortcut is not None:
        x = r.conv_shortcut(x)
    y = x + y
    up = _merge(gd_up, st_up)
    if up is not None:
        y = up(y)
    return (y, *_core_stats(y, core, groups))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _output(gd_norm, st_norm, gd_conv, st_conv, x, mean, var):
    """conv_out(silu(conv_norm_out(x)))."""
    h = jax.nn.silu(_group_norm(_merge(gd_norm, st_norm), x, mean, var))
    return (_merge(gd_conv, st_conv)(h),)


# --------------------------------------------------------------------------- host-side driver


def _map_chunks(call: Callable[..., tuple], inputs: Sequence[np.ndarray], chunk: int) -> list[np.ndarray]:
    """Runs ``call`` over fixed-size chunks of the leading (unit) axis; the last chunk is zero-padded.

    At most two chunks are in flight on the device: the next is dispatched before the previous is
    copied back to the host.
    """
    n = inputs[0].shape[0]
    chunk = min(chunk, n)
    outs: list[np.ndarray] | None = None

    def collect(start, res):
        nonlocal outs
        k = min(chunk, n - start)
        res = [np.asarray(r)[:k] for r in res]
        if outs is None:
            outs = [np.empty((n,) + r.shape[1:], r.dtype) for r in res]
        for o, r in zip(outs, res):
            o[start : start + k] = r

    pending = None
    for start in range(0, n, chunk):
        parts = []
        for a in inputs:
            p = a[start : start + chunk]
            if len(p) < chunk:
                p = np.concatenate([p, np.zeros((chunk - len(p),) + p.shape[1:], p.dtype)])
            parts.append(p)
        res = call(*parts)
        if pending is not None:
            collect(*pending)
        pending = (start, res)
    collect(*pending)
    return outs


def _merge_stats(mean: np.ndarray, m2: np.ndarray, count: np.ndarray, sample: np.ndarray, batch: int):
    """Per-unit (mean, centred sum of squares, count) -> per-sample mean and variance [B, G], float64."""
    mean, m2 = mean.astype(np.float64), m2.astype(np.float64)
    out_mean = np.zeros((batch, mean.shape[1]))
    out_var = np.zeros((batch, mean.shape[1]))
    for b in range(batch):
        sel = sample == b
        n = count[sel][:, None]
        total = n.sum()
        mu = (n * mean[sel]).sum(0) / total
        out_mean[b] = mu
        out_var[b] = (m2[sel].sum(0) + (n * np.square(mean[sel] - mu)).sum(0)) / total
    return out_mean, out_var


def _full_stats(x: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, groups, c // groups).astype(np.float64)
    return g.mean((1, 3)), g.var((1, 3))


def decode_tiled(
    vae: AutoencoderKL,
    z: jax.Array | np.ndarray,
    *,
    tile: int = 64,
    halo: int | None = None,
    chunk: int = 4,
) -> np.ndarray:
    """``vae.decode(z)`` computed in tiles: unscaled latents [B, h, w, C] -> images [B, f h, f w, 3] float32.

    Args:
      vae: the autoencoder.
      z: unscaled latents (as ``AutoencoderKL.decode`` takes them), NHWC.
      tile: window side in latent pixels (a shorter image side uses its own length).
      halo: overlap margin in latent pixels; None: ``receptive_radius(vae.config)``, the smallest
        exact value. Must be at least that and below ``tile / 2``.
      chunk: windows (over batch and space together) per device call.

    Equal to the untiled decode up to float rounding (see the module docstring). If both latent
    sides fit in one tile, it runs the untiled decoder.
    """
    cfg = vae.config
    radius = receptive_radius(cfg)
    halo = radius if halo is None else int(halo)
    if np.ndim(z) != 4:
        raise ValueError(f"z must be [B, h, w, C] latents, got shape {np.shape(z)}")
    if np.shape(z)[-1] != cfg.latent_channels:
        raise ValueError(f"z has {np.shape(z)[-1]} channels, the VAE expects {cfg.latent_channels}")
    if halo < radius:
        raise ValueError(f"halo ({halo}) is below the decoder's receptive radius ({radius}); tiles would not be exact")
    if tile <= 2 * halo:
        raise ValueError(f"tile ({tile}) must exceed 2 * halo ({2 * halo})")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    z = jnp.asarray(z)
    batch, h, w, _ = z.shape
    if h <= tile and w <= tile:
        return np.asarray(_full_decode(*nnx.split(vae), z), np.float32)

    dec = vae.decoder
    mid = np.asarray(_head(*_split(vae.post_quant_conv), *nnx.split(dec.conv_in), *nnx.split(dec.mid_block), z))
    layout = tile_layout(h, w, tile=tile, halo=halo)
    return _decode_up_path(vae, mid, layout, chunk)


def _decode_up_path(vae: AutoencoderKL, mid: np.ndarray, layout: TileLayout, chunk: int) -> np.ndarray:
    """The tiled up path on the mid-block output ``mid`` [B, h, w, C] (host), per ``layout``."""
    cfg, dec = vae.config, vae.decoder
    groups = cfg.norm_num_groups
    batch = mid.shape[0]
    th, tw = layout.tile_h, layout.tile_w
    tiles = list(layout.tiles())
    sample = np.repeat(np.arange(batch), len(tiles))
    core = np.array([c for _, _, c in tiles] * batch, np.int32)  # [U, 4], latent px within the window
    core_px = (core[:, 1] - core[:, 0]) * (core[:, 3] - core[:, 2])
    x = np.stack([mid[b, wy : wy + th, wx : wx + tw] for b in range(batch) for wy, wx, _ in tiles])

    mean_b, var_b = _full_stats(mid, groups)  # the first GroupNorm sees the whole mid-block output

    def per_unit(stats):
        return tuple(np.asarray(s[sample], np.float32) for s in stats)

    def merged(res, scale):
        per_group = res[0].shape[-1] // groups
        return _merge_stats(res[1], res[2], core_px * scale * scale * per_group, sample, batch)

    scale = 1
    for block in dec.up_blocks:
        for i, resnet in enumerate(block.resnets):
            gd, st = nnx.split(resnet)
            res = _map_chunks(
                functools.partial(_resnet_first, gd, st, groups=groups),
                [x, *per_unit((mean_b, var_b)), core * scale],
                chunk,
            )
            h_stats = merged(res, scale)
            up = block.upsamplers[0] if i == len(block.resnets) - 1 and len(block.upsamplers) else None
            new_scale = 2 * scale if up is not None else scale
            res = _map_chunks(
                functools.partial(_resnet_second, gd, st, *_split(up), groups=groups),
                [x, res[0], *per_unit(h_stats), core * new_scale],
                chunk,
            )
            x, scale = res[0], new_scale
            mean_b, var_b = merged(res, scale)

    (y,) = _map_chunks(
        functools.partial(_output, *nnx.split(dec.conv_norm_out), *nnx.split(dec.conv_out)),
        [x, *per_unit((mean_b, var_b))],
        chunk,
    )
    f = scale
    out = np.empty((batch, layout.height * f, layout.width * f, y.shape[-1]), np.float32)
    for u, (b, (wy, wx, (y0, y1, x0, x1))) in enumerate((b, t) for b in range(batch) for t in tiles):
        out[b, (wy + y0) * f : (wy + y1) * f, (wx + x0) * f : (wx + x1) * f] = y[u, y0 * f : y1 * f, x0 * f : x1 * f]
    return out


def decode_latents_tiled(vae: AutoencoderKL, z_scaled: jax.Array | np.ndarray, **kw) -> np.ndarray:
    """Diffusion latents -> images: ``decode_tiled(vae, z / scale + shift, **kw)`` (cf. ``decode_latents``)."""
    return decode_tiled(vae, z_scaled / vae.scaling_factor + vae.shift_factor, **kw)
