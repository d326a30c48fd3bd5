"""High-order degradation of HR images into LR ones: (LR, HR) pairs for a super-resolution GAN.

A scaled-down NumPy/SciPy/Pillow version of the recipe of Real-ESRGAN (Wang et al., 2021), Sec. 3.1, with the
sinc filter of its Sec. 3.2. From an HR image of size H x W and an integer `scale`:

1. first round: blur (Gaussian, isotropic or anisotropic) -> resize (random up / down / keep, random mode among
   area, bilinear and bicubic) -> noise (Gaussian or Poisson, colour or grey) -> JPEG;
2. second round (probability `second_order_prob`): blur (probability `blur_prob2`) -> resize -> noise; as in
   Real-ESRGAN this resize is relative to the LR size (H/scale, W/scale), not to the current size;
3. final stage, in random order (1/2 each): [resize to exactly (H//scale, W//scale), sinc, JPEG] or
   [JPEG, resize, sinc]; the sinc (ringing) filter has probability `final_sinc_prob`, the JPEG uses `jpeg_range2`.

Every random resize draws its mode from `resize_modes` and its factor as Real-ESRGAN does: "up" (uniform in
[1, hi]), "down" (uniform in [lo, 1]) or "keep" (1) with probabilities `resize_probs` / `resize_probs2`; the new
size is max(1, round(size * factor)). Values stay float32 in [0, 1] throughout (clipped after every step); JPEG
quantizes to uint8 and back. All randomness comes from the `numpy.random.Generator` passed in, in a fixed order,
so the same generator state gives bit-identical output.

Scaled down vs Real-ESRGAN: Gaussian kernels only (no generalized-Gaussian / plateau kernels, no sinc kernel in
the two rounds: only the final one); kernel sizes are capped at 2*ceil(3*sigma_max)+1; Pillow's resizes (which
antialias when downscaling, unlike torch's `interpolate`) and Pillow's integer-quality JPEG instead of DiffJPEG;
no USM sharpening of the HR target; the Poisson noise uses a fixed 255 photon levels (see `add_poisson_noise`).
Extra switches, all 1 / full by default as in Real-ESRGAN: `noise_prob`, `jpeg_prob`, `resize_modes`,
`resize_probs2`; they let `CLEAN` turn every step off except a bicubic downscale.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image
from scipy import ndimage, special

RESIZE_MODES: dict[str, Image.Resampling] = {
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
POISSON_LEVELS = 255.0  # photon count of a full-white pixel in the Poisson noise
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # RGB -> luma (ITU-R BT.601)


@dataclasses.dataclass(frozen=True)
class DegradeConfig:
    """Parameters of the high-order degradation of Real-ESRGAN (Wang et al., 2021), Sec. 3.1 (defaults: theirs).

    Sigmas of blur kernels are in pixels of the image they blur; noise sigmas in uint8 levels.
    """

    # first order
    blur_prob: float = 1.0
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    blur_kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)  # odd sizes, also used by the sinc filter
    anisotropic_prob: float = 0.5  # else isotropic; anisotropic: two sigmas + random rotation
    resize_range: tuple[float, float] = (0.15, 1.5)  # lo <= 1 <= hi
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    noise_sigma: tuple[float, float] = (1.0, 30.0)
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    gaussian_noise_prob: float = 0.5  # else Poisson
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)
    # second order
    second_order_prob: float = 1.0  # probability of the second round (blur2, resize2, noise2) at all
    blur_prob2: float = 0.8
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    resize_probs2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    noise_sigma2: tuple[float, float] = (1.0, 25.0)
    poisson_scale2: tuple[float, float] = (0.05, 2.5)
    jpeg_range2: tuple[int, int] = (30, 95)  # the final JPEG
    # final stage (Sec. 3.2)
    final_sinc_prob: float = 0.8
    # switches (not in Real-ESRGAN, where they are all on)
    noise_prob: float = 1.0  # probability of each noise step
    jpeg_prob: float = 1.0  # probability of each JPEG step (first round and final)
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")  # drawn uniformly by every resize

    def validate(self) -> DegradeConfig:
        """Return self, or raise ValueError with one line naming the first bad field."""
        for name in ("blur_prob", "anisotropic_prob", "gaussian_noise_prob", "gray_noise_prob", "second_order_prob",
                     "blur_prob2", "final_sinc_prob", "noise_prob", "jpeg_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                _bad(name, "must be a probability in [0, 1]", v)
        for name in ("resize_probs", "resize_probs2"):
            v = tuple(getattr(self, name))
            if len(v) != 3 or not all(0.0 <= p <= 1.0 for p in v) or abs(sum(v) - 1.0) > 1e-6:
                _bad(name, "must be 3 probabilities (up, down, keep) in [0, 1] summing to 1", v)
        for name, low in (("blur_sigma", 0.0), ("blur_sigma2", 0.0), ("noise_sigma", None), ("noise_sigma2", None),
                          ("poisson_scale", None), ("poisson_scale2", None)):
            lo, hi = _range(self, name)
            if lo < 0 or (low is not None and lo <= low):
                _bad(name, "must have a low end > 0" if low is not None else "must have a low end >= 0", (lo, hi))
        for name in ("resize_range", "resize_range2"):
            lo, hi = _range(self, name)
            if not 0.0 < lo <= 1.0 <= hi:
                _bad(name, "must satisfy 0 < low <= 1 <= high (down factors below 1, up factors above)", (lo, hi))
        for name in ("jpeg_range", "jpeg_range2"):
            lo, hi = _range(self, name)
            if lo != int(lo) or hi != int(hi) or not 1 <= lo <= hi <= 100:
                _bad(name, "must be integer JPEG qualities with 1 <= low <= high <= 100", (lo, hi))
        sizes = tuple(self.blur_kernel_sizes)
        if not sizes or not all(isinstance(k, int | np.integer) and k >= 3 and k % 2 == 1 for k in sizes):
            _bad("blur_kernel_sizes", "must be a non-empty tuple of odd integers >= 3", sizes)
        modes = tuple(self.resize_modes)
        if not modes or not all(m in RESIZE_MODES for m in modes):
            _bad("resize_modes", f"must be a non-empty tuple of names from {tuple(RESIZE_MODES)}", modes)
        return self


def _bad(name: str, problem: str, value) -> None:
    raise ValueError(f"DegradeConfig.{name} {problem}, got {value!r}")


def _range(cfg: DegradeConfig, name: str) -> tuple[float, float]:
    v = getattr(cfg, name)
    try:
        lo, hi = (float(x) for x in v)
    except (TypeError, ValueError):
        _bad(name, "must be a (low, high) pair of numbers", v)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        _bad(name, "must be a finite (low, high) range with low <= high", v)
    return lo, hi


# Only a bicubic downscale by the scale factor: the classical "clean" bicubic degradation.
CLEAN = DegradeConfig(blur_prob=0.0, resize_probs=(0.0, 0.0, 1.0), second_order_prob=0.0, blur_prob2=0.0,
                      resize_probs2=(0.0, 0.0, 1.0), final_sinc_prob=0.0, noise_prob=0.0, jpeg_prob=0.0,
                      resize_modes=("bicubic",))


# ----------------------------------------------------------------------------------------------------- kernels

def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float = 0.0) -> np.ndarray:
    """[size, size] float32 bivariate Gaussian with axis sigmas (sigma_x, sigma_y) rotated by theta, sum 1."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    r = np.arange(size) - (size - 1) / 2
    xy = np.stack(np.meshgrid(r, r, indexing="xy"), -1)  # [..., (x, y)]
    k = np.exp(-0.5 * np.einsum("...i,ij,...j->...", xy, np.linalg.inv(cov), xy))
    return (k / k.sum()).astype(np.float32)


def sinc_kernel(size: int, omega_c: float) -> np.ndarray:
    """[size, size] float32 circularly-symmetric sinc (jinc) low-pass kernel with cutoff omega_c, sum 1.

    As basicsr's `circular_lowpass_kernel`: k(r) = omega_c * J1(omega_c * r) / (2 pi r), k(0) = omega_c^2 / (4 pi).
    """
    r0 = np.arange(size) - (size - 1) / 2
    r = np.hypot(r0[:, None], r0[None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        k = omega_c * special.j1(omega_c * r) / (2 * np.pi * r)
    k[(size - 1) // 2, (size - 1) // 2] = omega_c**2 / (4 * np.pi)
    return (k / k.sum()).astype(np.float32)


def random_blur_kernel(rng: np.random.Generator, sigma_range: tuple[float, float], sizes: tuple[int, ...],
                       anisotropic_prob: float) -> np.ndarray:
    """A random isotropic or anisotropic (two sigmas, rotation uniform in [-pi, pi]) Gaussian kernel.

    Its size is drawn from `sizes`, capped at 2*ceil(3*sigma_max)+1 (no wider than the Gaussian needs).
    """
    size = int(rng.choice(sizes))
    if rng.random() < anisotropic_prob:
        sx, sy = rng.uniform(*sigma_range, size=2)
        theta = rng.uniform(-np.pi, np.pi)
    else:
        sx = sy = rng.uniform(*sigma_range)
        theta = 0.0
    size = min(size, 2 * math.ceil(3 * max(sx, sy)) + 1)
    return gaussian_kernel(size, sx, sy, theta)


def random_sinc_kernel(rng: np.random.Generator, sizes: tuple[int, ...]) -> np.ndarray:
    """A sinc kernel with size drawn from `sizes` and cutoff uniform in [pi/3, pi] (Real-ESRGAN, Sec. 3.2)."""
    size = int(rng.choice(sizes))
    return sinc_kernel(size, rng.uniform(np.pi / 3, np.pi))


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each channel of float32 [H, W, C] with a 2D kernel (scipy.ndimage, mode "reflect"), clip to [0, 1]."""
    out = ndimage.convolve(img, kernel[:, :, None].astype(np.float32), mode="reflect")
    return np.clip(out, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------- resize

def resize(img: np.ndarray, size: tuple[int, int], mode: str = "bicubic") -> np.ndarray:
    """float32 [H, W, C] in [0, 1] -> float32 [h, w, C], (h, w) = size, Pillow `mode` per channel in 'F' mode,
    clipped to [0, 1]. Modes: "area" (BOX), "bilinear", "bicubic"."""
    if img.ndim != 3:
        raise ValueError(f"resize: image must have shape [H, W, C], got shape {img.shape}")
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"resize: target size must be positive, got {size}")
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize: mode must be one of {tuple(RESIZE_MODES)}, got {mode!r}")
    img = np.asarray(img, np.float32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[:, :, c])).resize((w, h), RESIZE_MODES[mode]))
             for c in range(img.shape[2])]
    return np.clip(np.stack(chans, -1), 0.0, 1.0).astype(np.float32)


def bicubic_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 [H, W, C] in [0, 1] -> float32 [h, w, C], (h, w) = size: Pillow BICUBIC on each channel in float
    mode ('F'), clipped to [0, 1]. The clean degradation, and the evaluation's bicubic (upscaling) baseline."""
    return resize(img, size, "bicubic")


def _random_resize(img: np.ndarray, rng: np.random.Generator, ref: tuple[int, int], scale_range: tuple[float, float],
                   probs: tuple[float, float, float], modes: tuple[str, ...]) -> np.ndarray:
    """Real-ESRGAN's random resize: factor up / down / keep, new size max(1, round(ref * factor))."""
    kind = rng.choice(3, p=np.asarray(probs, np.float64) / sum(probs))
    factor = rng.uniform(1.0, scale_range[1]) if kind == 0 else rng.uniform(scale_range[0], 1.0) if kind == 1 else 1.0
    mode = modes[int(rng.integers(len(modes)))]
    size = (max(1, round(ref[0] * factor)), max(1, round(ref[1] * factor)))
    return resize(img, size, mode)


# ----------------------------------------------------------------------------------------------------- noise, JPEG

def add_gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator, gray: bool = False) -> np.ndarray:
    """img + N(0, (sigma/255)^2), one draw per pixel and channel (or per pixel, shared by channels, if gray);
    clipped to [0, 1]."""
    shape = img.shape[:2] + ((1,) if gray else img.shape[2:])
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma / 255.0)
    return np.clip(img + noise, 0.0, 1.0)


def add_poisson_noise(img: np.ndarray, scale: float, rng: np.random.Generator, gray: bool = False) -> np.ndarray:
    """Poisson (shot) noise: with L = 255 photon levels and x the colour (or, if gray, the luma 0.299 R + 0.587 G
    + 0.114 B, its noise shared by the channels), out = clip(img + scale * (Poisson(L * x) / L - x), 0, 1).

    At level v (uint8) the noise std is scale * sqrt(v) levels. basicsr's `random_add_poisson_noise` sets
    L = 2**ceil(log2(number of distinct levels)), which is 256 on a natural image but 1..8 on a flat or
    few-colour one (shapes-world scenes); the fixed L keeps the strength independent of the content.
    """
    x = (img @ GRAY_WEIGHTS)[:, :, None] if gray else img
    lam = x.astype(np.float64) * POISSON_LEVELS
    noise = (rng.poisson(lam) - lam) / POISSON_LEVELS * scale
    return np.clip(img + noise.astype(np.float32), 0.0, 1.0)


def _random_noise(img: np.ndarray, rng: np.random.Generator, cfg: DegradeConfig, sigma_range: tuple[float, float],
                  poisson_range: tuple[float, float]) -> np.ndarray:
    if rng.random() >= cfg.noise_prob:
        return img
    gaussian = rng.random() < cfg.gaussian_noise_prob
    gray = bool(rng.random() < cfg.gray_noise_prob)
    if gaussian:
        return add_gaussian_noise(img, rng.uniform(*sigma_range), rng, gray)
    return add_poisson_noise(img, rng.uniform(*poisson_range), rng, gray)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8, rounded."""
    return np.clip(np.round(np.asarray(img, np.float32) * 255.0), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of float32 [H, W, 3] in [0, 1]: uint8, Pillow `quality`, in memory, back to float32."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(img), "RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), np.float32) / np.float32(255.0)


def _random_jpeg(img: np.ndarray, rng: np.random.Generator, cfg: DegradeConfig,
                 quality_range: tuple[int, int]) -> np.ndarray:
    if rng.random() >= cfg.jpeg_prob:
        return img
    return jpeg(img, int(rng.integers(quality_range[0], quality_range[1] + 1)))


# ----------------------------------------------------------------------------------------------------- degrade

def _check_image(hr: np.ndarray, scale: int, rank: int, what: str) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    if not isinstance(hr, np.ndarray) or hr.dtype != np.uint8:
        raise ValueError(f"hr must be a uint8 numpy array, got dtype {getattr(hr, 'dtype', type(hr).__name__)}")
    if hr.ndim != rank:
        raise ValueError(f"hr must have rank {rank} with shape {what}, got shape {hr.shape}")
    if hr.shape[-1] != 3:
        raise ValueError(f"hr must have 3 channels (shape {what}), got {hr.shape[-1]} in shape {hr.shape}")
    h, w = hr.shape[-3:-1]
    if h < 1 or w < 1 or h % scale or w % scale:
        raise ValueError(f"hr size {h}x{w} must be a positive multiple of scale {scale} (not divisible)")


def _degrade(hr: np.ndarray, scale: int, rng: np.random.Generator, cfg: DegradeConfig) -> np.ndarray:
    h, w = hr.shape[:2]
    lr_size = (h // scale, w // scale)
    img = hr.astype(np.float32) / np.float32(255.0)
    # first round: blur -> resize -> noise -> JPEG
    if rng.random() < cfg.blur_prob:
        img = blur(img, random_blur_kernel(rng, cfg.blur_sigma, cfg.blur_kernel_sizes, cfg.anisotropic_prob))
    img = _random_resize(img, rng, (h, w), cfg.resize_range, cfg.resize_probs, cfg.resize_modes)
    img = _random_noise(img, rng, cfg, cfg.noise_sigma, cfg.poisson_scale)
    img = _random_jpeg(img, rng, cfg, cfg.jpeg_range)
    # second round: blur -> resize (relative to the LR size, as Real-ESRGAN) -> noise
    if rng.random() < cfg.second_order_prob:
        if rng.random() < cfg.blur_prob2:
            img = blur(img, random_blur_kernel(rng, cfg.blur_sigma2, cfg.blur_kernel_sizes, cfg.anisotropic_prob))
        img = _random_resize(img, rng, lr_size, cfg.resize_range2, cfg.resize_probs2, cfg.resize_modes)
        img = _random_noise(img, rng, cfg, cfg.noise_sigma2, cfg.poisson_scale2)
    # final stage: [resize, sinc, JPEG] or [JPEG, resize, sinc]
    jpeg_first = rng.random() < 0.5
    sinc = random_sinc_kernel(rng, cfg.blur_kernel_sizes) if rng.random() < cfg.final_sinc_prob else None
    if jpeg_first:
        img = _random_jpeg(img, rng, cfg, cfg.jpeg_range2)
    img = resize(img, lr_size, cfg.resize_modes[int(rng.integers(len(cfg.resize_modes)))])
    if sinc is not None:
        img = blur(img, sinc)
    if not jpeg_first:
        img = _random_jpeg(img, rng, cfg, cfg.jpeg_range2)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def degrade(hr: np.ndarray, scale: int, rng: np.random.Generator, cfg: DegradeConfig = DegradeConfig()) -> np.ndarray:
    """hr: uint8 [H, W, 3] (H, W divisible by scale) -> LR float32 [H//scale, W//scale, 3] in [0, 1].

    The high-order degradation of Real-ESRGAN (Wang et al., 2021), Sec. 3.1 (see the module docstring); the
    input is read as hr / 255 in float32. Same generator state -> bit-identical output.
    """
    _check_image(hr, scale, 3, "[H, W, 3]")
    return _degrade(hr, scale, rng, cfg.validate())


def degrade_batch(hr: np.ndarray, scale: int, rng: np.random.Generator,
                  cfg: DegradeConfig = DegradeConfig()) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, H//scale, W//scale, 3]: `degrade` of each image in order, each drawing
    its own degradation from `rng` (Real-ESRGAN (Wang et al., 2021), Sec. 3.1)."""
    _check_image(hr, scale, 4, "[B, H, W, 3]")
    cfg.validate()
    h, w = hr.shape[1:3]
    out = np.empty((hr.shape[0], h // scale, w // scale, 3), np.float32)
    for i in range(hr.shape[0]):
        out[i] = _degrade(hr[i], scale, rng, cfg)
    return out
