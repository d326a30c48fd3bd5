"""Real image-text pairs: a tfds builder (array_record, no TensorFlow) and a per-bucket grain pipeline.

Sources (``ImageTextConfig.sources``; each entry a directory, a ``.tar`` file or a glob of them):

- **Image folder.** Every image file under the directory (recursively; ``.jpg .jpeg .png .webp
  .bmp .gif .tif .tiff``) whose caption sits next to it in a ``.txt`` of the same stem
  (``cat.jpg`` + ``cat.txt``). If the directory has a ``metadata.jsonl`` (one JSON object per line)
  or ``metadata.csv`` at its top, its rows list the examples instead: ``file_name`` (path relative
  to the directory) plus ``caption`` (or ``text``; when absent, the side-by-side ``.txt`` is used)
  and optional columns such as ``aesthetic`` / ``AESTHETIC_SCORE`` and ``pwatermark``
  (see :mod:`raphael_jax.data.captions`).
- **webdataset shards.** Every ``*.tar`` at the top of a directory, or given directly: members
  are grouped by key (the path up to the first ``.`` of the file name, as in webdataset), an
  example has an image (``jpg``/``png``/...), a caption in ``txt`` or in ``json["caption"]``, and
  metadata from ``json`` (what img2dataset writes). Shards are streamed, never unpacked.

Each example is filtered (:class:`~raphael_jax.data.captions.CaptionFilter`: aesthetic >= 4.7,
watermark <= 0.5 when those columns exist) and its caption cleaned *before* the image is decoded;
the image is then decoded (EXIF orientation applied, transparency onto white), resized to its
nearest aspect bucket without cropping (:mod:`raphael_jax.data.buckets`), and its edge map is
computed on the resized image with ``edges.get_edge_source(config.edge_source)`` (Canny by
default; register others with ``edges.register_edge_source``). Unreadable images are skipped and
counted, with one warning at the end. Sources are opened read-only; nothing is written next to
them.

Stored features (tfds ``Tensor``/``Text``/``Scalar`` only; ``Image`` would need TensorFlow):

======================  =========================================================================
``image``               bytes: PNG (default), JPEG, or raw uint8 HWC (``image_format="raw"``)
``height``, ``width``   int32: stored size (= the bucket's, at ``scale_divisor``)
``bucket``              int32: bucket id (position in ``buckets.BUCKETS``)
``edges``               bytes: PNG, 8-bit grey, edge strength * 255 (empty when edge_source None)
``caption``             text: cleaned caption
``key``                 text: where it came from (``<source #>.<glob match #>/<relative path or tar/key>``)
``aesthetic``           float32: score from the metadata, NaN if none
``watermark``           float32: watermark probability from the metadata, NaN if none
``orig_height/width``   int32: size of the source image
======================  =========================================================================

The split ``train`` keeps the sources' order (shuffling is disabled; the pipeline shuffles). The
build's ``metadata.json`` holds the skip counts (``stats``), the bucket counts and every
example's bucket id as a string of digits (``bucket_ids``), so the pipeline plans per-bucket
batches without reading the records.

Build with :func:`build_image_text_dataset` (or ``python -m raphael_jax.data.image_text``), read
with :func:`load_image_text`, batch with :func:`make_image_text_iterator`. See docs/DATA_REAL.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import grain
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageOps
from tensorflow_datasets.core import utils as tfds_utils

from raphael_jax.data.buckets import BUCKETS, BucketBatchPlan, resize_to_bucket, scaled_buckets
from raphael_jax.data.captions import CAPTION_COLUMNS, CaptionFilter, find_column
from raphael_jax.data.edges import get_edge_source

__all__ = [
    "ImageText",
    "ImageTextConfig",
    "ImageTextSource",
    "build_image_text_dataset",
    "decode_edges",
    "decode_image",
    "image_text_dataset",
    "iter_source_examples",
    "load_image_text",
    "make_config",
    "make_image_text_iterator",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_COLUMNS = ("file_name", "filename", "file", "image", "path")
IMAGE_FORMATS = ("png", "jpeg", "raw")
SKIP_REASONS = ("unreadable", "no_caption", "missing_file", "empty_caption", "low_aesthetic", "watermark")


# ----------------------------------------------------------------------------------- sources
@dataclasses.dataclass
class RawExample:
    """One candidate pair before filtering: ``read()`` gives the encoded image bytes."""

    key: str
    caption: str | None
    meta: dict
    read: Callable[[], bytes]


def _expand(entry: str) -> list[Path]:
    if any(ch in entry for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(entry))
        if not paths:
            raise FileNotFoundError(f"image_text: no file matches {entry!r}")
        return paths
    p = Path(entry)
    if not p.exists():
        raise FileNotFoundError(f"image_text: source {entry!r} does not exist")
    return [p]


def _read_file(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


def _read_metadata(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
        return rows
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _side_caption(image_path: Path) -> str | None:
    txt = image_path.with_suffix(".txt")
    return txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None


def _iter_folder(root: Path, prefix: str, stats: dict) -> Iterator[RawExample]:
    meta_files = [root / m for m in METADATA_FILES if (root / m).is_file()]
    if meta_files:
        for row in _read_metadata(meta_files[0]):
            col = find_column(row, FILE_COLUMNS)
            if col is None:
                raise ValueError(f"{meta_files[0]}: a row has no file_name column: {row}")
            rel = str(row[col])
            path = root / rel
            if not path.is_file():
                stats["missing_file"] += 1
                continue
            cap_col = find_column(row, CAPTION_COLUMNS)
            caption = row[cap_col] if cap_col is not None else None
            if caption is None:
                caption = _side_caption(path)
            meta = {k: v for k, v in row.items() if k not in (col, cap_col)}
            yield RawExample(f"{prefix}/{rel}", caption, meta, _read_file(path))
        return
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
        caption = _side_caption(path)
        if caption is None:
            stats["no_caption"] += 1
            continue
        yield RawExample(f"{prefix}/{path.relative_to(root).as_posix()}", caption, {}, _read_file(path))


def _wds_key(name: str) -> tuple[str, str]:
    """webdataset split of a member path into (key, extension): 'a/b.c.jpg' -> ('a/b', 'c.jpg')."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), (ext.lower() if dot else "")


def _tar_sample(prefix: str, key: str, files: dict, stats: dict) -> RawExample | None:
    img_ext = next((e for e in files if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
    if img_ext is None:
        return None
    meta = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
    caption = files["txt"].decode("utf-8", errors="replace") if "txt" in files else None
    if caption is None:
        col = find_column(meta, CAPTION_COLUMNS)
        caption = meta.get(col) if col is not None else None
    if caption is None:
        stats["no_caption"] += 1
        return None
    meta = {k: v for k, v in meta.items() if str(k).lower() not in CAPTION_COLUMNS}
    data = files[img_ext]
    return RawExample(f"{prefix}/{key}", caption, meta, lambda: data)


def _iter_tar(path: Path, prefix: str, stats: dict) -> Iterator[RawExample]:
    wanted = {e.lstrip(".") for e in IMAGE_EXTS} | {"txt", "json"}
    key, files = None, {}
    with tarfile.open(path, mode="r|*") as tar:  # streaming, read-only
        for m in tar:
            if not m.isfile():
                continue
            k, ext = _wds_key(m.name)
            if k != key:
                if key is not None and (ex := _tar_sample(prefix, key, files, stats)) is not None:
                    yield ex
                key, files = k, {}
            if ext.rsplit(".", 1)[-1] in wanted:
                f = tar.extractfile(m)
                files[ext] = f.read() if f is not None else b""
        if key is not None and (ex := _tar_sample(prefix, key, files, stats)) is not None:
            yield ex


def iter_source_examples(sources, stats: dict | None = None) -> Iterator[RawExample]:
    """Every candidate example of ``sources`` in order; ``stats`` (a dict) counts what was skipped."""
    stats = stats if stats is not None else {}
    for r in SKIP_REASONS:
        stats.setdefault(r, 0)
    for i, entry in enumerate(sources):
        for j, p in enumerate(_expand(str(entry))):
            prefix = f"{i}.{j}"  # source number . glob match number: keys stay unique
            if p.is_dir():
                yield from _iter_folder(p, prefix, stats)
                for t in sorted(p.glob("*.tar")):
                    yield from _iter_tar(t, f"{prefix}/{t.name}", stats)
            elif p.suffix == ".tar":
                yield from _iter_tar(p, f"{prefix}/{p.name}", stats)
            else:
                raise ValueError(f"image_text: source {str(p)!r} is neither a directory nor a .tar shard")


# ----------------------------------------------------------------------------------- encoding
def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """uint8 HWC -> bytes in ``fmt`` (png | jpeg | raw)."""
    if fmt == "raw":
        return np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality), subsampling=0)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {fmt!r}")
    return buf.getvalue()


def _as_bytes(x) -> bytes:
    """tfds gives string tensors as bytes (or as a 0-d object array)."""
    if isinstance(x, np.ndarray):
        x = x.item()
    return bytes(x)


def decode_image(data: bytes, height: int, width: int, fmt: str = "png") -> np.ndarray:
    """Stored ``image`` bytes -> uint8 [height, width, 3]."""
    data = _as_bytes(data)
    if fmt == "raw":
        return np.frombuffer(data, np.uint8).reshape(int(height), int(width), 3)
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"), np.uint8)
    if arr.shape != (height, width, 3):
        raise ValueError(f"decoded image has shape {arr.shape}, expected {(height, width, 3)}")
    return arr


def encode_edges(edges: np.ndarray) -> bytes:
    e = np.clip(np.asarray(edges, np.float32), 0.0, 1.0)
    buf = io.BytesIO()
    Image.fromarray(np.round(e * 255.0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def decode_edges(data: bytes) -> np.ndarray | None:
    """Stored ``edges`` bytes -> float32 [H, W] in [0, 1] (None when the build has no edges)."""
    data = _as_bytes(data)
    if not data:
        return None
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im, np.float32) / 255.0


def load_image(data: bytes) -> Image.Image:
    """Decode (fully, so truncated files fail here) and apply the EXIF orientation."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return ImageOps.exif_transpose(im)


# ----------------------------------------------------------------------------------- builder
@dataclasses.dataclass(eq=False)
class ImageTextConfig(tfds.core.BuilderConfig):
    """What a build holds; the name should identify it (``make_config`` derives one)."""

    sources: tuple = ()
    scale_divisor: int = 1
    min_aesthetic: float | None = 4.7
    max_watermark: float | None = 0.5
    edge_source: str | None = "canny"
    image_format: str = "png"
    jpeg_quality: int = 95


def make_config(sources, name: str | None = None, scale_divisor: int = 1,
                min_aesthetic: float | None = 4.7, max_watermark: float | None = 0.5,
                edge_source: str | None = "canny", image_format: str = "png",
                jpeg_quality: int = 95) -> ImageTextConfig:
    """A validated config. ``sources``: a path / glob or a list of them. The default name is
    ``<first source's name>_d<divisor>_<hash of all settings>``."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = tuple(os.path.abspath(os.fspath(s)) for s in sources)
    if not sources:
        raise ValueError("image_text: need at least one source")
    scaled_buckets(scale_divisor)  # validates
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if edge_source is not None:
        get_edge_source(edge_source)  # validates
    settings = dict(sources=sources, scale_divisor=int(scale_divisor), min_aesthetic=min_aesthetic,
                    max_watermark=max_watermark, edge_source=edge_source, image_format=image_format,
                    jpeg_quality=int(jpeg_quality))
    if name is None:
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        stem = re.sub(r"[^a-z0-9]+", "_", Path(sources[0].rstrip("/*")).name.lower()).strip("_") or "data"
        name = f"{stem}_d{int(scale_divisor)}_{digest}"
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
            description="Image-text pairs resized to RAPHAEL's nine aspect buckets (no crop), with edges.",
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
        buckets = scaled_buckets(c.scale_divisor)
        edge_fn = get_edge_source(c.edge_source) if c.edge_source else None
        filt = CaptionFilter(c.min_aesthetic, c.max_watermark)
        stats: dict = {}
        bucket_ids: list[str] = []
        bad: list[str] = []
        for raw in iter_source_examples(c.sources, stats):
            if raw.caption is None:
                stats["no_caption"] += 1
                continue
            caption, reason = filt.check(raw.caption, raw.meta)
            if caption is None:
                stats[reason] += 1
                continue
            try:
                im = load_image(raw.read())
                orig_w, orig_h = im.size
                arr, b = resize_to_bucket(im, buckets)
            except Exception as e:  # noqa: BLE001 (PIL raises many kinds for bad files)
                stats["unreadable"] += 1
                if len(bad) < 5:
                    bad.append(f"{raw.key} ({type(e).__name__}: {e})")
                continue
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
        counts = {str(b): bucket_ids.count(str(b)) for b in range(len(BUCKETS))}
        self.info.metadata.update({
            "stats": {"kept": len(bucket_ids), **stats}, "bucket_counts": counts,
            "bucket_ids": "".join(bucket_ids), "buckets": [list(hw) for hw in buckets],
            "image_format": c.image_format, "edge_source": c.edge_source, "scale_divisor": c.scale_divisor,
        })
        self.stats = {"kept": len(bucket_ids), **stats}


def build_image_text_dataset(data_dir, sources, name: str | None = None, **kwargs) -> ImageText:
    """Build (offline; a no-op when already built) under ``data_dir`` and return the builder.

    ``kwargs`` go to :func:`make_config` (scale_divisor, min_aesthetic, max_watermark, edge_source,
    image_format, jpeg_quality). The build lands in ``data_dir/image_text/<name>/1.0.0``.
    """
    config = make_config(sources, name=name, **kwargs)
    builder = ImageText(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


# ----------------------------------------------------------------------------------- reading
def resolve_dataset_dir(path) -> Path:
    """The build directory (holding dataset_info.json) at or below ``path`` (at most 3 levels down)."""
    p = Path(path)
    if (p / "dataset_info.json").is_file():
        return p
    found = sorted({f.parent for depth in ("*", "*/*", "*/*/*")
                    for f in p.glob(f"{depth}/dataset_info.json")})
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"no built dataset (dataset_info.json) at or below {os.fspath(path)!r}")
    raise ValueError(f"several builds below {os.fspath(path)!r}; pass one of: {[str(f) for f in found]}")


class ImageTextSource:
    """Random-access source over a build: item i is ``{image uint8 [h,w,3], edges float32 [h,w] (if
    built with edges), caption str, bucket int, key str}``. Picklable (grain workers reopen it)."""

    def __init__(self, path, split: str = "train"):
        self.path, self.split = resolve_dataset_dir(path), split
        meta_path = self.path / "metadata.json"
        self.metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.image_format = self.metadata.get("image_format", "png")
        self._open()

    def _open(self):
        builder = tfds.builder_from_directory(os.fspath(self.path))
        self._source = builder.as_data_source(split=self.split)
        ids = self.metadata.get("bucket_ids")
        if ids is not None and len(ids) == len(self._source):
            self.bucket_ids = np.frombuffer(ids.encode("ascii"), np.uint8).astype(np.int64) - ord("0")
        else:  # older / foreign build: read the bucket column (reads every record once)
            self.bucket_ids = np.array([int(self._source[i]["bucket"]) for i in range(len(self._source))],
                                       np.int64)

    def __getstate__(self):
        return {"path": self.path, "split": self.split, "metadata": self.metadata,
                "image_format": self.image_format}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._source)

    def raw(self, index) -> dict:
        """The record as stored (bytes for image and edges)."""
        return self._source[int(index)]

    def __getitem__(self, index) -> dict:
        r = self._source[int(index)]
        h, w = int(r["height"]), int(r["width"])
        out = {"image": decode_image(r["image"], h, w, self.image_format), "caption": _text(r["caption"]),
               "bucket": int(r["bucket"]), "key": _text(r["key"])}
        edges = decode_edges(r["edges"])
        if edges is not None:
            out["edges"] = edges
        return out


def _text(x) -> str:
    if isinstance(x, np.ndarray):
        x = x.item()
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def load_image_text(path, split: str = "train") -> ImageTextSource:
    """Open a build (its directory, or any parent up to 3 levels up when it holds just one)."""
    return ImageTextSource(path, split)


class CollateBatch(grain.transforms.Map):
    """Host batch of example indices (one bucket) -> model-ready numpy arrays."""

    def __init__(self, source, tokenizer=None, max_len: int = 77, include_captions: bool = False):
        self.source, self.tokenizer, self.max_len = source, tokenizer, int(max_len)
        self.include_captions = include_captions

    def map(self, indices) -> dict:
        exs = [self.source[int(i)] for i in indices]
        captions = [e["caption"] for e in exs]
        out = {"image": np.stack([e["image"] for e in exs]).astype(np.float32) / 127.5 - 1.0,
               "bucket": np.asarray([e["bucket"] for e in exs], np.int32)}
        if "edges" in exs[0]:
            out["edges"] = np.stack([e["edges"] for e in exs]).astype(np.float32)
        if self.tokenizer is not None:
            ids, mask = self.tokenizer.encode(captions, self.max_len)
            out["tokens"], out["mask"] = np.asarray(ids, np.int32), np.asarray(mask).astype(bool)
        if self.include_captions:
            out["caption"] = captions
        return out


def image_text_dataset(source: ImageTextSource, batch_size: int, tokenizer=None, max_len: int = 77,
                       seed: int = 0, shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
                       include_captions: bool = False) -> grain.MapDataset:
    """MapDataset of this host's per-bucket batches (see :class:`~raphael_jax.data.buckets.BucketBatchPlan`).

    Batches: image float32 [B,h,w,3] in [-1,1], edges float32 [B,h,w], bucket int32 [B], tokens
    int32 [B,L] and mask bool [B,L] (with a tokenizer, e.g. ``clip_tokenizer.load_clip_tokenizer``),
    caption list (with include_captions). ``batch_size`` is per host.
    """
    plan = BucketBatchPlan(source.bucket_ids, batch_size, seed, shard_index, shard_count, shuffle)
    if plan.unused_buckets:
        warnings.warn(f"buckets {plan.unused_buckets} hold fewer than {plan.global_batch} examples and are "
                      "never served", stacklevel=2)
    return grain.MapDataset.source(plan).map(CollateBatch(source, tokenizer, max_len, include_captions))


def make_image_text_iterator(path, batch_size: int, tokenizer=None, max_len: int = 77, seed: int = 0,
                             shard_index: int = 0, shard_count: int = 1, num_threads: int = 2,
                             prefetch_buffer_size: int = 4,
                             include_captions: bool = False) -> grain.DatasetIterator:
    """Checkpointable iterator (``get_state``/``set_state``) of per-bucket host batches of a build."""
    ds = image_text_dataset(load_image_text(path), batch_size, tokenizer, max_len, seed, shard_index,
                            shard_count, include_captions=include_captions)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                     prefetch_buffer_size=prefetch_buffer_size)))


# ----------------------------------------------------------------------------------- command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m raphael_jax.data.image_text",
        description="Build the image_text tfds dataset (array_record) from image folders / wds shards.")
    p.add_argument("sources", nargs="+", help="directories, .tar shards or globs of them")
    p.add_argument("--data-dir", required=True,
                   help="tfds data_dir; the build lands in DATA_DIR/image_text/NAME/1.0.0")
    p.add_argument("--name", default=None, help="config name (default: derived from the sources and options)")
    p.add_argument("--scale-divisor", type=int, default=1, help="divide the bucket sizes (1, 2, 4, ..., 64)")
    p.add_argument("--min-aesthetic", type=float, default=4.7, help="keep aesthetic >= this (negative: off)")
    p.add_argument("--max-watermark", type=float, default=0.5,
                   help="keep watermark probability <= this (negative: off)")
    p.add_argument("--edge-source", default="canny", help="edge map source name, or 'none'")
    p.add_argument("--image-format", default="png", choices=IMAGE_FORMATS)
    p.add_argument("--jpeg-quality", type=int, default=95)
    a = p.parse_args(argv)
    b = build_image_text_dataset(
        a.data_dir, a.sources, name=a.name, scale_divisor=a.scale_divisor,
        min_aesthetic=None if a.min_aesthetic < 0 else a.min_aesthetic,
        max_watermark=None if a.max_watermark < 0 else a.max_watermark,
        edge_source=None if a.edge_source.lower() == "none" else a.edge_source,
        image_format=a.image_format, jpeg_quality=a.jpeg_quality)
    meta = json.loads((Path(b.data_dir) / "metadata.json").read_text())
    print(f"built {b.data_dir}: {meta['stats']}")
    print(f"bucket counts: {meta['bucket_counts']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
