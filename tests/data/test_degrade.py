"""Real-ESRGAN-style high-order degradation (raphael_jax.data.degrade): shapes, determinism, each step."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import ndimage

from raphael_jax.data import degrade as D
from raphael_jax.data.shapes.world import example


def _scenes(n: int, size: int = 128, seed: int = 3) -> np.ndarray:
    return np.stack([example(seed, i, image_size=size)["image"] for i in range(n)])


def _flat(size: int, level: int) -> np.ndarray:
    return np.full((size, size, 3), level, np.uint8)


# Every step off except the noise: Gaussian, colour, sigma exactly 10 levels.
NOISE_ONLY = dataclasses.replace(D.CLEAN, noise_prob=1.0, gaussian_noise_prob=1.0, gray_noise_prob=0.0,
                                 noise_sigma=(10.0, 10.0))


# ----------------------------------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("shape, scale", [((128, 128), 4), ((96, 64), 2), ((40, 24), 1)])
def test_shape_dtype_range(shape, scale):
    hr = _scenes(1, 128)[0][:shape[0], :shape[1]]
    for seed in range(3):
        lr = D.degrade(hr, scale, np.random.default_rng(seed))
        assert lr.shape == (shape[0] // scale, shape[1] // scale, 3) and lr.dtype == np.float32
        assert lr.min() >= 0.0 and lr.max() <= 1.0


def test_batch_shape_and_independent_draws():
    hr = np.repeat(_scenes(1)[:1], 4, axis=0)  # the same image four times
    lr = D.degrade_batch(hr, 4, np.random.default_rng(0))
    assert lr.shape == (4, 32, 32, 3) and lr.dtype == np.float32
    assert all(not np.array_equal(lr[i], lr[j]) for i in range(4) for j in range(i))
    # in order, from the one generator: the same as degrading one image after the other
    rng = np.random.default_rng(0)
    assert np.array_equal(lr, np.stack([D.degrade(x, 4, rng) for x in hr]))
    assert D.degrade_batch(hr[:0], 4, np.random.default_rng(0)).shape == (0, 32, 32, 3)


def test_deterministic_per_seed():
    hr = _scenes(3)
    a = D.degrade_batch(hr, 4, np.random.default_rng(123))
    b = D.degrade_batch(hr, 4, np.random.default_rng(123))
    c = D.degrade_batch(hr, 4, np.random.default_rng(124))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and np.abs(a - c).mean() > 1e-3


def test_clean_is_plain_bicubic_downscale():
    hr = _scenes(3)
    for i, x in enumerate(hr):
        want = D.bicubic_resize(x.astype(np.float32) / 255, (32, 32))
        assert np.array_equal(D.degrade(x, 4, np.random.default_rng(i), D.CLEAN), want)
    # and the default degradation is far from it
    lr = D.degrade_batch(hr, 4, np.random.default_rng(0))
    clean = D.degrade_batch(hr, 4, np.random.default_rng(0), D.CLEAN)
    assert np.abs(lr - clean).mean() > 0.01


def test_bicubic_resize():
    img = np.random.default_rng(0).random((20, 30, 3), dtype=np.float32)
    up = D.bicubic_resize(img, (40, 60))
    assert up.shape == (40, 60, 3) and up.dtype == np.float32 and 0 <= up.min() and up.max() <= 1
    assert np.array_equal(D.bicubic_resize(img, (20, 30)), img)
    flat = np.full((8, 8, 3), 0.25, np.float32)
    assert np.allclose(D.bicubic_resize(flat, (3, 5)), 0.25, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- kernels

def test_gaussian_kernels():
    iso = D.gaussian_kernel(15, 2.0, 2.0)
    aniso = D.gaussian_kernel(15, 3.0, 0.7, theta=0.4)
    for k in (iso, aniso):
        assert k.shape == (15, 15) and k.dtype == np.float32 and math.isclose(k.sum(), 1.0, abs_tol=1e-5)
        assert np.allclose(k, k[::-1, ::-1])  # point-symmetric: convolution == correlation
    assert np.allclose(iso, np.rot90(iso), atol=1e-7)
    assert np.abs(aniso - np.rot90(aniso)).max() > 1e-2  # elongated and rotated: not rotation-symmetric
    assert np.abs(aniso - aniso.T).max() > 1e-3  # the rotation is applied (theta = 0 would be symmetric in x/y)


def test_random_blur_kernels():
    rng = np.random.default_rng(0)
    sizes = (7, 9, 11, 13, 15, 17, 19, 21)
    seen_aniso = seen_iso = seen_oblique = False
    for _ in range(40):
        k = D.random_blur_kernel(rng, (0.2, 3.0), sizes, 0.5)
        assert k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1 and 3 <= k.shape[0] <= 21
        assert math.isclose(k.sum(), 1.0, abs_tol=1e-5)
        symmetric = np.allclose(k, np.rot90(k), atol=1e-6)
        seen_iso |= symmetric
        seen_aniso |= not symmetric
        seen_oblique |= not np.allclose(k, k[:, ::-1], atol=1e-4)  # rotated off the pixel axes
    assert seen_iso and seen_aniso and seen_oblique
    # the size is capped to what the Gaussian needs: 2*ceil(3*0.3)+1 = 3
    assert D.random_blur_kernel(rng, (0.3, 0.3), (21,), 0.0).shape == (3, 3)


def test_sinc_kernel_rings():
    k = D.sinc_kernel(21, np.pi / 3)
    assert k.shape == (21, 21) and math.isclose(k.sum(), 1.0, abs_tol=1e-5)
    assert np.allclose(k, np.rot90(k), atol=1e-7) and np.allclose(k, k.T, atol=1e-7)
    assert k.min() < -1e-3 * k.max()  # negative lobes: the ringing it is there for
    assert k[10, 10] == k.max()


# ----------------------------------------------------------------------------------------------------- noise, JPEG

def test_gaussian_noise_sigma():
    img = np.full((256, 256, 3), 0.5, np.float32)
    out = D.add_gaussian_noise(img, 10.0, np.random.default_rng(0))
    assert math.isclose(np.std(out - img) * 255, 10.0, rel_tol=0.05) and abs(np.mean(out - img)) * 255 < 0.3
    gray = D.add_gaussian_noise(img, 10.0, np.random.default_rng(0), gray=True)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    assert math.isclose(np.std(gray - img) * 255, 10.0, rel_tol=0.05)
    # end to end, through degrade (scale 1, every other step off)
    lr = D.degrade(_flat(256, 128), 1, np.random.default_rng(1), NOISE_ONLY)
    assert math.isclose(np.std(lr - 128 / 255) * 255, 10.0, rel_tol=0.05)
    assert not np.array_equal(lr[..., 0], lr[..., 1])
    lr = D.degrade(_flat(256, 128), 1, np.random.default_rng(1), dataclasses.replace(NOISE_ONLY, gray_noise_prob=1.0))
    assert np.array_equal(lr[..., 0], lr[..., 1]) and np.std(lr) > 5 / 255


def test_poisson_noise_sigma():
    img = np.full((256, 256, 3), 100 / 255, np.float32)
    out = D.add_poisson_noise(img, 2.0, np.random.default_rng(0))
    assert math.isclose(np.std(out - img) * 255, 2.0 * math.sqrt(100), rel_tol=0.05)  # scale * sqrt(level)
    assert abs(np.mean(out - img)) * 255 < 0.5
    gray = D.add_poisson_noise(img, 2.0, np.random.default_rng(0), gray=True)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and math.isclose(np.std(gray - img) * 255, 20, rel_tol=0.05)
    black = np.zeros((32, 32, 3), np.float32)
    assert np.array_equal(D.add_poisson_noise(black, 3.0, np.random.default_rng(0)), black)  # shot noise ~ signal


def test_jpeg_changes_and_quality_orders_error():
    rng = np.random.default_rng(0)
    img = D.bicubic_resize(_scenes(1)[0].astype(np.float32) / 255, (128, 128))
    img = D.add_gaussian_noise(img, 20.0, rng)
    errs = {}
    for q in (20, 50, 95):
        out = D.jpeg(img, q)
        assert out.shape == img.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        errs[q] = np.abs(out - img).mean()
    assert errs[20] > errs[50] > errs[95] > 2 / 255  # every quality changes a noisy image; higher is closer
    assert np.array_equal(D.jpeg(img, 50), D.jpeg(img, 50))


# ----------------------------------------------------------------------------------------------------- blurrier

def _best_sigma(lr: np.ndarray, clean: np.ndarray) -> float:
    """The Gaussian blur (LR pixels) of the clean image that best explains lr (least squares)."""
    sigmas = np.arange(0.0, 3.01, 0.25)
    errs = [np.mean((lr - ndimage.gaussian_filter(clean, (s, s, 0), mode="reflect")) ** 2) for s in sigmas]
    return float(sigmas[int(np.argmin(errs))])


def _grad_energy(x: np.ndarray) -> float:
    """Mean squared finite difference: high-frequency energy (squared, so that a blurred edge has less of it)."""
    return float(np.square(np.diff(x, axis=0)).mean() + np.square(np.diff(x, axis=1)).mean())


def test_degraded_is_blurrier_than_clean():
    hr = _scenes(8)
    clean = D.degrade_batch(hr, 4, np.random.default_rng(0), D.CLEAN)
    # Full recipe: noise and JPEG add high frequencies, so measure blur as the Gaussian that best maps the clean
    # LR onto the degraded one. Noise alone fits sigma <= 0.25 (a near-identity filter; not exactly 0 because
    # the noise is clipped at 0 on the black background, which a slight blur mimics): the measure can say "sharp".
    noisy = D.degrade_batch(hr, 4, np.random.default_rng(5), NOISE_ONLY)
    assert max(_best_sigma(noisy[i], clean[i]) for i in range(len(hr))) <= 0.25
    full = D.degrade_batch(hr, 4, np.random.default_rng(5))
    best = [_best_sigma(full[i], clean[i]) for i in range(len(hr))]
    assert np.median(best) >= 0.75 and min(best) > 0.25, best
    # Blur and resizes alone (no noise, JPEG or sinc): less gradient energy than the clean LR, image by image.
    blur_only = dataclasses.replace(D.DegradeConfig(), noise_prob=0.0, jpeg_prob=0.0, final_sinc_prob=0.0)
    soft = D.degrade_batch(hr, 4, np.random.default_rng(6), blur_only)
    ratios = [_grad_energy(soft[i]) / _grad_energy(clean[i]) for i in range(len(hr))]
    assert max(ratios) < 0.95 and np.mean(ratios) < 0.8, ratios


# ----------------------------------------------------------------------------------------------------- steps

@pytest.mark.parametrize("changes", [
    {"blur_prob": 1.0},  # first-round blur
    {"second_order_prob": 1.0, "blur_prob2": 1.0},  # second-round blur
    {"resize_probs": (0.0, 1.0, 0.0)},  # first-round downscale, then back up to the LR size
    {"second_order_prob": 1.0, "resize_probs2": (0.0, 1.0, 0.0)},  # second-round downscale
])
def test_each_blurring_step_is_applied(changes):
    hr = _scenes(4)
    clean = D.degrade_batch(hr, 2, np.random.default_rng(0), D.CLEAN)
    soft = D.degrade_batch(hr, 2, np.random.default_rng(1), dataclasses.replace(D.CLEAN, **changes))
    ratios = [_grad_energy(soft[i]) / _grad_energy(clean[i]) for i in range(len(hr))]
    assert max(ratios) < 0.99 and np.mean(ratios) < 0.9, ratios


def test_final_sinc_is_applied():
    hr = _scenes(2)
    clean = D.degrade_batch(hr, 2, np.random.default_rng(0), D.CLEAN)
    ringing = D.degrade_batch(hr, 2, np.random.default_rng(0), dataclasses.replace(D.CLEAN, final_sinc_prob=1.0))
    assert np.abs(ringing - clean).mean() > 2e-3


def test_both_jpegs_in_order():
    # scale 1 and no sinc: whichever order the final stage draws, the output is JPEG(JPEG(x, q1), q2)
    x = _scenes(1)[0]
    cfg = dataclasses.replace(D.CLEAN, jpeg_prob=1.0, jpeg_range=(30, 30), jpeg_range2=(90, 90))
    want = D.jpeg(D.jpeg(x.astype(np.float32) / 255, 30), 90)
    for seed in range(4):
        assert np.array_equal(D.degrade(x, 1, np.random.default_rng(seed), cfg), want)


# ----------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("hr, scale, batch, words", [
    (np.zeros((32, 32, 3), np.float32), 4, False, "uint8"),
    (np.zeros((32, 32), np.uint8), 4, False, "rank 3"),
    (np.zeros((32, 32, 4), np.uint8), 4, False, "3 channels"),
    (np.zeros((34, 32, 3), np.uint8), 4, False, "divisible"),
    (np.zeros((32, 30, 3), np.uint8), 4, False, "divisible"),
    (np.zeros((32, 32, 3), np.uint8), 0, False, "scale must be an integer >= 1"),
    (np.zeros((32, 32, 3), np.uint8), 2.0, False, "scale must be an integer >= 1"),
    (np.zeros((32, 32, 3), np.uint8), 4, True, "rank 4"),
    (np.zeros((2, 32, 32, 1), np.uint8), 4, True, "3 channels"),
    (np.zeros((2, 32, 32, 3), np.int32), 4, True, "uint8"),
])
def test_bad_inputs(hr, scale, batch, words):
    fn = D.degrade_batch if batch else D.degrade
    with pytest.raises(ValueError, match=words) as info:
        fn(hr, scale, np.random.default_rng(0))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("field, value", [
    ("blur_prob", 1.5), ("anisotropic_prob", -0.1), ("final_sinc_prob", float("nan")), ("jpeg_prob", 2.0),
    ("resize_probs", (0.5, 0.5, 0.5)), ("resize_probs2", (0.5, 0.5)),
    ("blur_sigma", (3.0, 0.2)), ("blur_sigma2", (0.0, 1.0)), ("noise_sigma", (-1.0, 3.0)), ("poisson_scale", (1.0,)),
    ("resize_range", (1.2, 1.5)), ("resize_range2", (0.0, 1.2)),
    ("jpeg_range", (0, 95)), ("jpeg_range2", (30, 101)), ("jpeg_range", (95, 30)), ("jpeg_range", (30.5, 90)),
    ("blur_kernel_sizes", (8,)), ("blur_kernel_sizes", (1, 3)), ("blur_kernel_sizes", ()),
    ("resize_modes", ("nearest",)), ("resize_modes", ()),
])
def test_validate_rejects_bad_fields(field, value):
    cfg = dataclasses.replace(D.DegradeConfig(), **{field: value})
    with pytest.raises(ValueError, match=rf"DegradeConfig\.{field} ") as info:
        cfg.validate()
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=field):  # degrade checks its config too
        D.degrade(_flat(16, 0), 4, np.random.default_rng(0), cfg)


def test_default_and_clean_configs_are_valid():
    assert D.DegradeConfig().validate() == D.DegradeConfig()
    assert D.CLEAN.validate() is D.CLEAN
    assert D.CLEAN.blur_prob == 0 and D.CLEAN.second_order_prob == 0 and D.CLEAN.resize_modes == ("bicubic",)
