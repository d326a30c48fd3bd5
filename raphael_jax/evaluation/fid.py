"""Frechet Inception Distance: pool3 features, their mean/covariance statistics, and the distance.

For features X_1 (generated) and X_2 (reference) with means mu_i and covariances C_i,

    FID = ||mu_1 - mu_2||^2 + Tr(C_1 + C_2 - 2 (C_1 C_2)^(1/2))

computed as pytorch-fid does (:func:`frechet_distance`): ``scipy.linalg.sqrtm`` of C_1 C_2; if the
result is not finite, ``eps`` is added to both diagonals and it is retried; a small imaginary part
from round-off is dropped (a large one raises). Covariances use ``np.cov`` (N - 1).

Statistics files are ``.npz`` with ``mu``, ``sigma`` (as pytorch-fid writes them) and ``num``;
they are read with ``np.load(allow_pickle=False)``. Reference statistics come from a folder of
images (:func:`folder_statistics`) or a tfds split (:func:`tfds_statistics`). The feature network
is any callable ``uint8 [B, H, W, 3] -> [B, D]``; :class:`FeatureExtractor` wraps an NNX module
(the FID :class:`~raphael_jax.evaluation.inception.InceptionV3`, or the shapes-world net) in one
compiled function, batch-padded and sharded over the local devices.

Commands (``raphael_jax.cli.eval``)::

    raphael-eval fid stats SRC OUT.npz --weights fid_inception.safetensors
    raphael-eval fid distance A B --weights fid_inception.safetensors

SRC / A / B: a folder of images, ``tfds:NAME[:SPLIT]`` (A/B: also a ``.npz``). ``--size 256
--center-crop`` resizes reference images the way generated 256x256 ones are compared.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image
from scipy import linalg

__all__ = [
    "IMAGE_EXTENSIONS",
    "FeatureExtractor",
    "allgather_rows",
    "compute_features",
    "feature_statistics",
    "fid_from_features",
    "folder_statistics",
    "frechet_distance",
    "list_images",
    "load_image",
    "load_stats",
    "save_stats",
    "statistics_of",
    "tfds_statistics",
]

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid's set


# ------------------------------------------------------------------------------------- statistics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` in float64: mean and ``np.cov(rowvar=False)`` (N - 1)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (pytorch-fid's computation)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # near-singular products are handled below
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            print(
                f"frechet_distance: singular product; adding {eps} to the diagonal of both covariances",
                file=sys.stderr,
            )
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, num: int | None = None, **meta) -> Path:
    """Writes ``mu``, ``sigma`` (and ``num``, and ``meta`` as a JSON string) to an ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"meta": np.array(json.dumps(meta))} if meta else {}
    np.savez(path, mu=np.asarray(mu), sigma=np.asarray(sigma), num=np.int64(-1 if num is None else num), **extra)
    return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from an ``.npz`` (ours or pytorch-fid's), never unpickling."""
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {sorted(f.files)}")
        return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)


# ----------------------------------------------------------------------------------------- images


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files of ``folder`` (pytorch-fid's extensions, any case), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def center_crop_resize(image: np.ndarray, size: int | None, center_crop: bool = True) -> np.ndarray:
    """uint8 HWC -> square crop of the shorter side (if ``center_crop``) -> ``size`` (PIL bicubic)."""
    if center_crop:
        h, w = image.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        image = image[top : top + s, left : left + s]
    if size is not None and image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return image


def load_image(path: str | Path, size: int | None = None, center_crop: bool = False) -> np.ndarray:
    """uint8 RGB [H, W, 3] as pytorch-fid reads it (``convert("RGB")``), optionally cropped and resized."""
    with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))
    if size is not None or center_crop:
        image = center_crop_resize(image, size, center_crop)
    return image


def batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]


# --------------------------------------------------------------------------------------- features


_COMPILED: dict = {}


def _features_uint8(m, x):
    return m.features_uint8(x)


def _compiled(graphdef, fn, sharding):
    """One jitted function per (network structure, fn, sharding): extractors of the same network share it."""
    key = (graphdef, fn, sharding)
    if key not in _COMPILED:
        call = fn or _features_uint8
        _COMPILED[key] = jax.jit(lambda s, x: call(nnx.merge(graphdef, s), x), out_shardings=sharding)
    return _COMPILED[key]


class FeatureExtractor:
    """A feature network as one compiled function ``uint8 [B, H, W, 3] -> float32 [B, D]`` (numpy).

    Batches are padded to ``batch_size`` (rounded up to a multiple of the local device count) so
    one program serves every batch of a given image size; the batch axis is sharded over the local
    devices and the weights replicated. ``fn(module, images_uint8)`` defaults to
    ``module.features_uint8`` (the FID Inception and the shapes-world net both have it).
    """

    def __init__(
        self,
        module: nnx.Module,
        batch_size: int = 50,
        fn: Callable | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.devices = list(devices or jax.local_devices())
        n = len(self.devices)
        self.batch_size = -(-max(1, batch_size) // n) * n
        mesh = jax.sharding.Mesh(np.array(self.devices), ("batch",))
        self._data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        graphdef, state = nnx.split(module)
        self._state = jax.device_put(state, replicated)
        self._fn = _compiled(graphdef, fn, self._data)
        self.dim: int | None = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
        out = []
        for chunk in batches(images, self.batch_size):
            n = len(chunk)
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, *chunk.shape[1:]), np.uint8)
                chunk = np.concatenate([chunk, pad])
            feats = self._fn(self._state, jax.device_put(chunk, self._data))
            out.append(np.asarray(feats, np.float32)[:n])
        if not out:
            return np.zeros((0, self.dim or 0), np.float32)
        res = np.concatenate(out)
        self.dim = res.shape[1]
        return res


def compute_features(
    extract: Callable[[np.ndarray], np.ndarray],
    images: Iterable[np.ndarray],
    batch_size: int = 50,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Features of a stream of uint8 HWC images (all of one size), in batches of ``batch_size``."""
    feats, buf, done = [], [], 0
    for im in images:
        buf.append(im)
        if len(buf) == batch_size:
            feats.append(extract(np.stack(buf)))
            done += len(buf)
            buf = []
            if progress:
                progress(done)
    if buf:
        feats.append(extract(np.stack(buf)))
        done += len(buf)
        if progress:
            progress(done)
    if not feats:
        raise ValueError("compute_features: no images")
    return np.concatenate(feats)


def allgather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenates every host's rows ``[n_host, ...]`` in process order (identity on one host)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    x = np.asarray(x)
    counts = np.asarray(multihost_utils.process_allgather(np.array([x.shape[0]], np.int32))).reshape(-1)
    padded = np.zeros((int(counts.max()), *x.shape[1:]), x.dtype)
    padded[: x.shape[0]] = x
    everything = np.asarray(multihost_utils.process_allgather(padded))  # [P, max_n, ...]
    return np.concatenate([everything[i, :c] for i, c in enumerate(counts)])


def _progress(what: str, total: int | None):
    def report(done: int):
        if jax.process_index() == 0:
            print(
                f"\r{what}: {done}{'/' + str(total) if total else ''} images",
                end="",
                file=sys.stderr,
                flush=True,
            )

    return report


def folder_statistics(
    folder: str | Path,
    extract: Callable[[np.ndarray], np.ndarray],
    *,
    size: int | None = None,
    center_crop: bool = False,
    batch_size: int = 50,
    max_images: int | None = None,
    files: Sequence[Path] | None = None,
    shard: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, num)`` of the images of ``folder`` (or of ``files``).

    Images must share one size unless ``size`` is given (then: optional square center crop, PIL
    bicubic resize). With ``shard`` every host reads its contiguous slice and the features are
    gathered, so all hosts return the same statistics.
    """
    files = list(files) if files is not None else list_images(folder)
    if max_images is not None:
        files = files[:max_images]
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    mine = (
        np.array_split(np.arange(len(files)), jax.process_count())[jax.process_index()] if shard else range(len(files))
    )
    images = (load_image(files[i], size, center_crop) for i in mine)
    feats = compute_features(extract, images, batch_size, _progress(str(folder), len(files)))
    feats = allgather_rows(feats) if shard else feats
    mu, sigma = feature_statistics(feats)
    return mu, sigma, len(feats)


def tfds_statistics(
    name: str,
    extract: Callable[[np.ndarray], np.ndarray],
    *,
    split: str = "validation",
    image_key: str = "image",
    data_dir: str | None = None,
    size: int | None = None,
    center_crop: bool = True,
    batch_size: int = 50,
    max_images: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, num)`` over a prepared tfds split, read with ``tfds.data_source`` (no TensorFlow;
    needs the dataset prepared in array_record format). Hosts split the examples and gather."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, split=split, data_dir=data_dir)
    n = len(source) if max_images is None else min(len(source), max_images)
    mine = np.array_split(np.arange(n), jax.process_count())[jax.process_index()]

    def images():
        for i in mine:
            im = np.asarray(source[int(i)][image_key])
            if im.ndim == 2:
                im = np.repeat(im[:, :, None], 3, axis=2)
            im = im[:, :, :3]
            yield center_crop_resize(im, size, center_crop) if (size or center_crop) else im

    feats = allgather_rows(compute_features(extract, images(), batch_size, _progress(name, n)))
    mu, sigma = feature_statistics(feats)
    return mu, sigma, len(feats)


def statistics_of(
    src: str,
    extract,
    *,
    data_dir: str | None = None,
    size: int | None = None,
    center_crop: bool = False,
    batch_size: int = 50,
    max_images: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, num)`` of ``src``: a ``.npz`` statistics file (num -1), ``tfds:NAME[:SPLIT]`` (split
    default ``validation``) or a folder of images. Every host must call it (features are gathered)."""
    if src.endswith(".npz"):
        mu, sigma = load_stats(src)
        return mu, sigma, -1
    if src.startswith("tfds:"):
        parts = src[5:].split(":")
        return tfds_statistics(
            parts[0],
            extract,
            split=parts[1] if len(parts) > 1 else "validation",
            data_dir=data_dir,
            size=size,
            center_crop=center_crop,
            batch_size=batch_size,
            max_images=max_images,
        )
    return folder_statistics(
        src,
        extract,
        size=size,
        center_crop=center_crop,
        batch_size=batch_size,
        max_images=max_images,
    )
