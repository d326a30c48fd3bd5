"""The image_text tfds builder (array_record, no TensorFlow): sources -> filtered, bucketed, edge-mapped records.

Sources, filters and the stored features: :mod:`raphael_jax.data.real.sources`. The buckets are the
paper's nine (Sec. 4, :data:`~raphael_jax.data.real.buckets.BUCKETS`) divided by ``scale_divisor``,
or a custom list of [h, w] pixel sizes (``buckets=[(64, 64)]``,
:func:`~raphael_jax.data.real.buckets.check_buckets`); either way the build's ``metadata.json``
records the sizes used under ``"buckets"`` (bucket id = position), which is what
:mod:`raphael_jax.tools.precompute` reads.
"""


from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import UnidentifiedImageError
from tensorflow_datasets.core import utils as tfds_utils

from raphael_jax.data.edges import get_edge_source
from raphael_jax.data.real.buckets import check_buckets, resize_to_bucket, scaled_buckets
from raphael_jax.data.real.captions import CaptionFilter
from raphael_jax.data.real.sources import IMAGE_FORMATS, encode_edges, encode_image, iter_source_examples, load_image


# ----------------------------------------------------------------------------------- builder
@dataclasses.dataclass(eq=False)
class ImageTextConfig(tfds.core.BuilderConfig):
    """What a build holds; the name should identify it (``make_config`` derives one)."""

    sources: tuple = ()
    scale_divisor: int = 1
    buckets: tuple | None = None  # custom ((h, w), ...) in pixels; None: the nine / scale_divisor
    min_aesthetic: float | None = 4.7
    max_watermark: float | None = 0.5
    edge_source: str | None = "canny"
    image_format: str = "png"
    jpeg_quality: int = 95


def make_config(sources, name: str | None = None, scale_divisor: int = 1,
                min_aesthetic: float | None = 4.7, max_watermark: float | None = 0.5,
                edge_source: str | None = "canny", image_format: str = "png",
                jpeg_quality: int = 95, buckets=None) -> ImageTextConfig:
    """A validated config. ``sources``: a path / glob or a list of them. The default name is
    ``<first source's name>_d<divisor>_<hash of all settings>``, or with a custom ``buckets`` list
    (e.g. ``[(64, 64)]``; only with ``scale_divisor`` 1) ``<first source's name>_b<sizes>_<hash>``."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = tuple(os.path.abspath(os.fspath(s)) for s in sources)
    if not sources:
        raise ValueError("image_text: need at least one source")
    scaled_buckets(scale_divisor)  # validates
    if buckets is not None:
        buckets = check_buckets(buckets)
        if int(scale_divisor) != 1:
            raise ValueError(f"give either buckets or a scale_divisor other than 1, not both "
                             f"(got scale_divisor={scale_divisor})")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if edge_source is not None:
        get_edge_source(edge_source)  # validates
    settings = dict(sources=sources, scale_divisor=int(scale_divisor), min_aesthetic=min_aesthetic,
                    max_watermark=max_watermark, edge_source=edge_source, image_format=image_format,
                    jpeg_quality=int(jpeg_quality))
    if buckets is not None:  # only then, so the names of builds with the nine buckets stay as they were
        settings["buckets"] = buckets
    if name is None:
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        stem = re.sub(r"[^a-z0-9]+", "_", Path(sources[0].rstrip("/*")).name.lower()).strip("_") or "data"
        if buckets is None:
            scale = f"d{int(scale_divisor)}"
        elif len(buckets) <= 3:
            scale = "b" + "-".join(f"{h}x{w}" for h, w in buckets)
        else:
            scale = f"b{len(buckets)}"
        name = f"{stem}_{scale}_{digest}"
    if not re.fullmatch(r"[a-zA-Z0-9_][a-zA-Z0-9_.-]*", name):
        raise ValueError(f"invalid config name {name!r} (letters, digits, _ . -)")
    return ImageTextConfig(name=name, version=ImageText.VERSION, **settings)


class ImageText(tfds.core.GeneratorBasedBuilder):
    """Image-text pairs from local folders / webdataset shards, resized to aspect buckets."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = []  # always built from a make_config(...) config

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' default resolves package modules through `importlib_resources`, which is not installed.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        blob = tfds.features.Tensor(shape=(), dtype=np.object_)
        i32, f32 = tfds.features.Scalar(dtype=np.int32), tfds.features.Scalar(dtype=np.float32)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image-text pairs resized to RAPHAEL's nine aspect buckets or a custom list (no crop), "
                        "with edges.",
            features=tfds.features.FeaturesDict({
                "image": blob, "height": i32, "width": i32, "bucket": i32, "edges": blob,
                "caption": tfds.features.Text(), "key": tfds.features.Text(),
                "aesthetic": f32, "watermark": f32, "orig_height": i32, "orig_width": i32,
            }),
            supervised_keys=None,
            disable_shuffling=True,  # keep the sources' order: bucket_ids in the metadata index it
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        c = self.builder_config
        buckets = tuple(c.buckets) if c.buckets is not None else scaled_buckets(c.scale_divisor)
        edge_fn = get_edge_source(c.edge_source) if c.edge_source else None
        filt = CaptionFilter(c.min_aesthetic, c.max_watermark)
        stats: dict = {}
        bucket_ids: list[str] = []
        bad: list[str] = []
        for raw in iter_source_examples(c.sources, stats):
            ready = _prepare(raw, filt, buckets, stats, bad)
            if ready is None:
                continue
            caption, arr, b, (orig_h, orig_w) = ready
            edges = encode_edges(edge_fn(arr)) if edge_fn is not None else b""
            aesthetic, watermark = CaptionFilter.scores(raw.meta)
            bucket_ids.append(str(b))
            yield raw.key, {
                "image": encode_image(arr, c.image_format, c.jpeg_quality), "height": arr.shape[0],
                "width": arr.shape[1], "bucket": b, "edges": edges, "caption": caption, "key": raw.key,
                "aesthetic": aesthetic, "watermark": watermark, "orig_height": orig_h, "orig_width": orig_w,
            }
        if stats["unreadable"]:
            warnings.warn(f"image_text: skipped {stats['unreadable']} unreadable image(s), e.g. "
                          + "; ".join(bad), stacklevel=2)
        counts = {str(b): bucket_ids.count(str(b)) for b in range(len(buckets))}
        self.info.metadata.update({
            "stats": {"kept": len(bucket_ids), **stats}, "bucket_counts": counts,
            "bucket_ids": "".join(bucket_ids), "buckets": [list(hw) for hw in buckets],
            "image_format": c.image_format, "edge_source": c.edge_source, "scale_divisor": c.scale_divisor,
            "unreadable": bad,  # the first few skipped images: path (error)
        })
        self.stats = {"kept": len(bucket_ids), **stats}


def _prepare(raw, filt: CaptionFilter, buckets, stats: dict, bad: list[str]):
    """``(caption, resized uint8 image, bucket id, (orig_h, orig_w))`` of one candidate, or None when it is
    skipped (the reason counted in ``stats``; an unreadable image also named in ``bad``, at most 5)."""
    if raw.caption is None:
        stats["no_caption"] += 1
        return None
    caption, reason = filt.check(raw.caption, raw.meta)
    if caption is None:
        stats[reason] += 1
        return None
    try:
        im = load_image(raw.read())
        orig_w, orig_h = im.size
        arr, b = resize_to_bucket(im, buckets)
    except Exception as e:  # noqa: BLE001 (PIL raises many kinds for bad files)
        stats["unreadable"] += 1
        if len(bad) < 5:
            why = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else \
                (str(e).strip().splitlines() or [""])[0]
            bad.append(f"{raw.origin or raw.key} ({type(e).__name__}: {why})")
        return None
    return caption, arr, b, (orig_h, orig_w)


def check_sources(config: ImageTextConfig) -> None:
    """Raises before a build writes anything unless the sources hold at least one usable example (an image
    that decodes, with a caption the filters keep); reads up to the first one. The error names what was
    skipped and why (e.g. every image unreadable, no ``.txt`` captions)."""
    buckets = tuple(config.buckets) if config.buckets is not None else scaled_buckets(config.scale_divisor)
    filt = CaptionFilter(config.min_aesthetic, config.max_watermark)
    stats: dict = {}
    bad: list[str] = []
    for raw in iter_source_examples(config.sources, stats):
        if _prepare(raw, filt, buckets, stats, bad) is not None:
            return
    where = ", ".join(config.sources)
    skipped = {k: v for k, v in stats.items() if v}
    if not skipped:
        raise ValueError(f"image_text: no images in {where}: put image files with a caption (.txt of the same "
                         "name, or a metadata.jsonl) there, or give .tar shards")
    detail = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items())
    example = f"; e.g. {bad[0]}" if bad else ""
    raise ValueError(f"image_text: no usable image-caption pair in {where} (skipped: {detail}{example}): "
                     "fix or replace those files, add captions, or relax --min-aesthetic / --max-watermark")


def build_image_text_dataset(data_dir, sources, name: str | None = None, **kwargs) -> ImageText:
    """Build (offline; a no-op when already built) under ``data_dir`` and return the builder.

    ``kwargs`` go to :func:`make_config` (scale_divisor or buckets, min_aesthetic, max_watermark,
    edge_source, image_format, jpeg_quality). The build lands in ``data_dir/image_text/<name>/1.0.0``.
    Before a new build writes anything, ``data_dir`` must not be a file and the sources must hold a usable
    example (:func:`check_sources`); otherwise nothing is created.
    """
    config = make_config(sources, name=name, **kwargs)
    data_dir = os.fspath(data_dir)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise NotADirectoryError(f"image_text: data_dir {data_dir} is a file, not a folder: give a tfds data folder")
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # tfds' notes on custom configs and not-yet-built folders: noise here
    try:
        builder = ImageText(config=config, data_dir=data_dir, file_format="array_record")
        prepared = builder.is_prepared()
    finally:
        absl.setLevel(level)
    if not prepared:
        check_sources(config)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder
