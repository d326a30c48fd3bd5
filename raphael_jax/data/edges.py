"""Edge-map targets for RAPHAEL's edge supervision: a numpy Canny detector and a registry of sources.

`canny` works on colour images channel by channel: at each pixel the channel with the strongest
Sobel gradient decides magnitude and direction, so edges between equally bright colours are kept.
Thresholds are in units of intensity change per pixel, with intensities scaled to [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_TIE = 1e-5  # magnitudes closer than this count as equal in non-maximum suppression


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _filter_rows_cols(x: np.ndarray, ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
    """Separable correlation over the first two axes with edge padding."""
    ry, rx = len(ky) // 2, len(kx) // 2
    pad = [(ry, ry), (rx, rx)] + [(0, 0)] * (x.ndim - 2)
    p = np.pad(x, pad, mode="edge")
    h, w = x.shape[:2]
    tmp = sum(ky[i] * p[i:i + h] for i in range(len(ky)))
    return sum(kx[j] * tmp[:, j:j + w] for j in range(len(kx)))


def _dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= p[dy:dy + h, dx:dx + w]
    return out


def canny(image, low: float = 0.1, high: float = 0.2, sigma: float = 1.0) -> np.ndarray:
    """Canny edges of a uint8 [H, W, C] or [H, W] image: float32 [H, W] with values in {0, 1}.

    Steps: Gaussian blur (sigma; 0 disables), Sobel gradients (per channel, strongest channel wins),
    non-maximum suppression along the gradient direction, double threshold (low, high) and
    hysteresis (weak pixels 8-connected to a strong one are kept).
    """
    x = np.asarray(image)
    if x.ndim not in (2, 3) or x.shape[0] < 3 or x.shape[1] < 3:
        raise ValueError(f"canny: expected an [H, W] or [H, W, C] image of at least 3x3, got shape {x.shape}")
    if not 0 <= low <= high:
        raise ValueError(f"canny: need 0 <= low <= high, got low={low}, high={high}")
    x = x.astype(np.float32)
    if np.asarray(image).dtype == np.uint8:
        x = x / 255.0
    if x.ndim == 2:
        x = x[:, :, None]
    if sigma > 0:
        g = _gaussian_kernel(sigma)
        x = _filter_rows_cols(x, g, g)
    smooth = np.array([1, 2, 1], np.float32) / 4
    diff = np.array([-1, 0, 1], np.float32) / 2
    gx = _filter_rows_cols(x, smooth, diff)  # d/dx, intensity per pixel
    gy = _filter_rows_cols(x, diff, smooth)
    mag_c = np.hypot(gx, gy)
    best = mag_c.argmax(-1)[..., None]
    mag = np.take_along_axis(mag_c, best, -1)[..., 0]
    gx = np.take_along_axis(gx, best, -1)[..., 0]
    gy = np.take_along_axis(gy, best, -1)[..., 0]

    # Non-maximum suppression with the direction quantised to 0, 45, 90 or 135 degrees.
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = (np.floor((angle + 22.5) / 45.0).astype(np.int32)) % 4
    offsets = [(0, 1), (1, 1), (1, 0), (1, -1)]  # (dy, dx) for 0, 45, 90, 135 degrees (y down)
    p = np.pad(mag, 1)
    h, w = mag.shape
    keep = np.zeros((h, w), bool)
    for s, (dy, dx) in enumerate(offsets):
        fwd = p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        bwd = p[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
        uphill = gx * dx + gy * dy >= 0  # does the gradient point towards `fwd`?
        ahead, behind = np.where(uphill, fwd, bwd), np.where(uphill, bwd, fwd)
        # Ties (within float noise) go to the brighter pixel: a step edge keeps exactly one pixel,
        # on the bright side.
        keep |= (sector == s) & (mag >= ahead + _TIE) & (mag >= behind - _TIE)
    mag = np.where(keep, mag, 0.0)

    strong = mag >= high
    weak = mag >= max(low, 1e-6)
    edges = strong
    while True:
        grown = _dilate(edges) & weak
        if np.array_equal(grown, edges):
            break
        edges = grown
    return edges.astype(np.float32)


def pool_edges(edges, factor: int) -> np.ndarray:
    """Max-pool [..., H, W] edge maps by an integer factor (for targets at attention-map resolution)."""
    e = np.asarray(edges)
    h, w = e.shape[-2:]
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"pool_edges: factor {factor} must divide the map size {h}x{w}")
    return e.reshape(*e.shape[:-2], h // factor, factor, w // factor, factor).max(axis=(-3, -1))


# Name -> function(uint8 image [H, W, 3]) -> float32 [H, W] in {0, 1}. Register others (e.g. HED) here.
def outline(image, threshold: int = 30) -> np.ndarray:
    """Exact one-pixel outlines of shapes on a black background (the shapes world's edges).

    A pixel is an edge when it is foreground (any channel > ``threshold``) and one of its four
    neighbours is not. On rendered shapes this equals Canny's outline at a fraction of the cost.
    """
    img = np.asarray(image)
    fg = (img.max(axis=-1) if img.ndim == 3 else img) > threshold
    p = np.pad(fg, 1)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return (fg & ~interior).astype(np.float32)


EDGE_SOURCES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"canny": canny, "outline": outline}


def register_edge_source(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Add an edge source under `name` (overwrites an existing one)."""
    EDGE_SOURCES[name] = fn


def get_edge_source(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The edge function registered as `name`; ValueError listing the known names otherwise."""
    try:
        return EDGE_SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown edge source {name!r}; known: {sorted(EDGE_SOURCES)}") from None
