"""The paper's nine aspect buckets, resizing without cropping, and per-bucket batching.

RAPHAEL trains at multiple scales: each image is resized to the nearest of nine [h, w] pixel
buckets and never cropped (the paper, Sec. 4: multi-scale training on nine aspect buckets)::

    [448,832] [512,768] [512,704] [640,640] [576,640] [640,576] [704,512] [768,512] [832,448]

Bucket ids are positions in :data:`BUCKETS` (this order).

**Nearest bucket.** An image of size h x w goes to the bucket whose aspect ratio is closest in
log space: ``argmin_b |log(h/w) - log(h_b/w_b)|``, ties to the lower bucket id. Log distance
treats a 2:1 and a 1:2 image alike (linear distance on h/w would favour tall buckets). Example:
h/w = 1.675 lies between 768/512 = 1.5 and 832/448 = 1.857; linearly it is closer to 1.5, in log
space (0.110 vs 0.103) to 1.857, so it goes to bucket 8. Only the aspect ratio decides, not the
size: small images are upscaled to their bucket.

**Resizing** (:func:`resize_to_bucket`) scales the whole image to exactly [h_b, w_b] with PIL
(bicubic by default), so the aspect ratio changes by at most the gap to the bucket's ratio.

**Small sizes for tests and small runs.** ``scale_divisor`` d divides every side (all sides are
multiples of 64, so d in 1, 2, 4, 8, 16, 32, 64): d = 8 gives 56x104 ... 104x56, d = 16 gives
28x52 ... 52x28. Every side stays an exact multiple, so bucket assignment is unchanged.

**Custom bucket lists** (:func:`check_buckets`). A build may instead use its own list of [h, w]
pixel sizes, e.g. ``[(64, 64)]`` for a square toy world (the shapes folder of
:mod:`raphael_jax.data.shapes.folder`); bucket ids are then positions in that list and the
nearest-bucket rule is the same. At most :data:`MAX_BUCKETS` (ids are stored as one digit each in
the build's ``bucket_ids``, see :mod:`raphael_jax.data.real.builder`).

**Per-bucket batching** (:class:`BucketBatchPlan`). Every batch holds examples of one bucket only.
Per epoch e, with ``rng = default_rng([seed, e])``, each bucket's example indices are shuffled
and cut into *global* batches of ``batch_size * shard_count`` (a bucket's last incomplete batch is
dropped), then the order of all batches is shuffled. Host ``shard_index`` takes the
``shard_index``-th slice of ``batch_size`` of each global batch, so all hosts see the same bucket
(the same array shapes) at the same step and together read disjoint examples. Bucket frequencies
follow the bucket sizes, which is the paper's "GPUs allocated to buckets in proportion to the
number of images" in expectation. Batch ``k`` is a pure function of (seed, k), so a grain
``MapDataset`` over the plan is random-access and its iterator checkpoints as one integer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "BUCKETS",
    "BucketBatchPlan",
    "MAX_BUCKETS",
    "bucket_name",
    "check_buckets",
    "nearest_bucket",
    "resize_to_bucket",
    "scaled_buckets",
    "to_rgb",
]

BUCKETS: tuple[tuple[int, int], ...] = (
    (448, 832), (512, 768), (512, 704), (640, 640), (576, 640),
    (640, 576), (704, 512), (768, 512), (832, 448),
)

# Bucket ids are written as one decimal digit per example (builder's ``bucket_ids``).
MAX_BUCKETS = 10

# Effectively infinite number of batches (epochs repeat with fresh shuffles).
STREAM_SIZE = 2**40


def scaled_buckets(scale_divisor: int = 1) -> tuple[tuple[int, int], ...]:
    """:data:`BUCKETS` with every side divided by ``scale_divisor`` (which must divide all sides)."""
    d = int(scale_divisor)
    if d < 1 or any(s % d for hw in BUCKETS for s in hw):
        raise ValueError(f"scale_divisor must divide 64 (1, 2, 4, ..., 64), got {scale_divisor}")
    return tuple((h // d, w // d) for h, w in BUCKETS)


def check_buckets(buckets) -> tuple[tuple[int, int], ...]:
    """A custom bucket list as a tuple of (h, w) int pairs; one-line ValueError unless it is non-empty,
    of at most :data:`MAX_BUCKETS` unique pairs of positive ints."""
    if isinstance(buckets, (str, bytes)):
        raise ValueError(f"buckets must be a list of (h, w) pairs, got {buckets!r}")
    try:
        items = list(buckets)
    except TypeError:
        raise ValueError(f"buckets must be a list of (h, w) pairs, got {buckets!r}") from None
    if not items:
        raise ValueError("buckets must hold at least one (h, w) pair")
    out = []
    for hw in items:
        if (isinstance(hw, (str, bytes)) or not hasattr(hw, "__len__") or len(hw) != 2
                or not all(isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_)) and s > 0
                           for s in hw)):
            raise ValueError(f"each bucket must be an (h, w) pair of positive ints, got {hw!r}")
        out.append((int(hw[0]), int(hw[1])))
    if len(set(out)) != len(out):
        raise ValueError(f"buckets must be unique, got {out}")
    if len(out) > MAX_BUCKETS:
        raise ValueError(f"at most {MAX_BUCKETS} buckets (ids are stored as one digit each), got {len(out)}")
    return tuple(out)


def bucket_name(bucket: int, scale_divisor: int = 1) -> str:
    """'HxW' of a bucket id at a scale, e.g. bucket_name(0) == '448x832'."""
    h, w = scaled_buckets(scale_divisor)[bucket]
    return f"{h}x{w}"


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]] = BUCKETS) -> int:
    """Id of the bucket nearest in log aspect ratio to an image of ``height`` x ``width``."""
    if height <= 0 or width <= 0:
        raise ValueError(f"nearest_bucket: image size must be positive, got {height}x{width}")
    r = math.log(height / width)
    dists = [abs(r - math.log(h / w)) for h, w in buckets]
    return int(min(range(len(dists)), key=lambda i: (dists[i], i)))


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An RGB copy; transparent pixels (RGBA, LA, palette with transparency) go onto ``background``."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def resize_to_bucket(image: Image.Image, buckets: Sequence[tuple[int, int]] = BUCKETS,
                     resample: int = Image.Resampling.BICUBIC) -> tuple[np.ndarray, int]:
    """Resize (no crop) an image to its nearest bucket: ``(uint8 [h_b, w_b, 3], bucket id)``."""
    b = nearest_bucket(image.height, image.width, buckets)
    h, w = buckets[b]
    rgb = to_rgb(image)
    if rgb.size != (w, h):
        rgb = rgb.resize((w, h), resample=resample)
    return np.asarray(rgb, dtype=np.uint8), b


class BucketBatchPlan:
    """Deterministic per-bucket batches of example indices (see the module docstring).

    Args:
      bucket_ids: bucket id of every example (int sequence, length N).
      batch_size: examples per host batch.
      seed: shuffling seed (the same on every host).
      shard_index, shard_count: this host and the number of hosts.
      shuffle: False keeps each bucket's examples and the batches in index / bucket order
        (every epoch is then the same).
      size: number of batches the plan pretends to have (default: effectively infinite, epochs
        repeat); ``plan[k]`` is host batch k as an int64 array of ``batch_size`` example indices.
    """

    def __init__(self, bucket_ids, batch_size: int, seed: int = 0, shard_index: int = 0,
                 shard_count: int = 1, shuffle: bool = True, size: int = STREAM_SIZE):
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        if self.bucket_ids.ndim != 1:
            raise ValueError("bucket_ids must be one-dimensional")
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.shuffle, self.size = bool(shuffle), int(size)
        self.global_batch = self.batch_size * self.shard_count
        self.buckets = sorted(int(b) for b in np.unique(self.bucket_ids))
        self.counts = {b: int(np.sum(self.bucket_ids == b)) for b in self.buckets}
        self.batches_per_bucket = {b: n // self.global_batch for b, n in self.counts.items()}
        self.batches_per_epoch = sum(self.batches_per_bucket.values())
        if self.batches_per_epoch == 0:
            raise ValueError(f"no bucket holds a full global batch of {self.global_batch} examples "
                             f"(batch_size {batch_size} x {shard_count} hosts); bucket sizes: {self.counts}")

    @property
    def unused_buckets(self) -> list[int]:
        """Buckets with fewer examples than one global batch (never served)."""
        return [b for b, n in self.batches_per_bucket.items() if n == 0]

    @functools.lru_cache(maxsize=2)  # noqa: B019 (a plan lives as long as its pipeline)
    def epoch(self, e: int) -> np.ndarray:
        """Global batches of epoch ``e``: int64 [batches_per_epoch, global_batch]."""
        rng = np.random.default_rng([self.seed, e])
        rows = []
        for b in self.buckets:
            idx = np.flatnonzero(self.bucket_ids == b)
            if self.shuffle:
                idx = rng.permutation(idx)
            n = self.batches_per_bucket[b] * self.global_batch
            rows.append(idx[:n].reshape(-1, self.global_batch))
        batches = np.concatenate(rows, axis=0)
        if self.shuffle:
            batches = batches[rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, k) -> np.ndarray:
        k = int(k)
        if not 0 <= k < self.size:
            raise IndexError(f"BucketBatchPlan: batch {k} out of range [0, {self.size})")
        e, j = divmod(k, self.batches_per_epoch)
        g = self.epoch(e)[j]
        return g[self.shard_index * self.batch_size:(self.shard_index + 1) * self.batch_size]


    def __repr__(self) -> str:
        return (f"BucketBatchPlan(n={len(self.bucket_ids)}, counts={self.counts}, "
                f"batch_size={self.batch_size}, seed={self.seed}, "
                f"shard={self.shard_index}/{self.shard_count})")
