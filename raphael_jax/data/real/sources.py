"""Real image-text pairs: the sources (image folders, webdataset shards), filtering and image encoding.

Sources (``ImageTextConfig.sources``; each entry a directory, a ``.tar`` file or a glob of them):

- **Image folder.** Every image file under the directory (recursively; ``.jpg .jpeg .png .webp
  .bmp .gif .tif .tiff``) whose caption sits next to it in a ``.txt`` of the same stem
  (``cat.jpg`` + ``cat.txt``). If the directory has a ``metadata.jsonl`` (one JSON object per line)
  or ``metadata.csv`` at its top, its rows list the examples instead: ``file_name`` (path relative
  to the directory) plus ``caption`` (or ``text``; when absent, the side-by-side ``.txt`` is used)
  and optional columns such as ``aesthetic`` / ``AESTHETIC_SCORE`` and ``pwatermark``
  (see :mod:`raphael_jax.data.real.captions`).
- **webdataset shards.** Every ``*.tar`` at the top of a directory, or given directly: members
  are grouped by key (the path up to the first ``.`` of the file name, as in webdataset), an
  example has an image (``jpg``/``png``/...), a caption in ``txt`` or in ``json["caption"]``, and
  metadata from ``json`` (what img2dataset writes). Shards are streamed, never unpacked.

Each example is filtered (:class:`~raphael_jax.data.real.captions.CaptionFilter`: aesthetic >= 4.7,
watermark <= 0.5 when those columns exist) and its caption cleaned *before* the image is decoded;
the image is then decoded (EXIF orientation applied, transparency onto white), resized to its
nearest aspect bucket without cropping (:mod:`raphael_jax.data.real.buckets`), and its edge map is
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

This module reads the sources; :mod:`raphael_jax.data.real.builder` builds the tfds dataset
(:func:`~raphael_jax.data.real.builder.build_image_text_dataset`, or ``raphael-data image-text``) and
:mod:`raphael_jax.data.real.pipeline` reads and batches it. See docs/DATA_REAL.md.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from raphael_jax.data.real.captions import CAPTION_COLUMNS, find_column

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
    origin: str = ""  # where the image is, for messages: a file path or ``shard.tar:member``


def _expand(entry: str) -> list[Path]:
    if any(ch in entry for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(entry))
        if not paths:
            raise FileNotFoundError(f"image_text: no file matches {entry!r}: check the pattern")
        return paths
    p = Path(entry)
    if not p.exists():
        raise FileNotFoundError(f"image_text: source {entry!r} does not exist: give an image folder, a .tar "
                                "shard or a glob of them")
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
            yield RawExample(f"{prefix}/{rel}", caption, meta, _read_file(path), str(path))
        return
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
        caption = _side_caption(path)
        if caption is None:
            stats["no_caption"] += 1
            continue
        yield RawExample(f"{prefix}/{path.relative_to(root).as_posix()}", caption, {}, _read_file(path), str(path))


def _wds_key(name: str) -> tuple[str, str]:
    """webdataset split of a member path into (key, extension): 'a/b.c.jpg' -> ('a/b', 'c.jpg')."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), (ext.lower() if dot else "")


def _tar_sample(prefix: str, key: str, files: dict, stats: dict, tar: str = "") -> RawExample | None:
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
    return RawExample(f"{prefix}/{key}", caption, meta, lambda: data, f"{tar}:{key}.{img_ext}")


def _iter_tar(path: Path, prefix: str, stats: dict) -> Iterator[RawExample]:
    wanted = {e.lstrip(".") for e in IMAGE_EXTS} | {"txt", "json"}
    key, files = None, {}
    with tarfile.open(path, mode="r|*") as tar:  # streaming, read-only
        for m in tar:
            if not m.isfile():
                continue
            k, ext = _wds_key(m.name)
            if k != key:
                if key is not None and (ex := _tar_sample(prefix, key, files, stats, str(path))) is not None:
                    yield ex
                key, files = k, {}
            if ext.rsplit(".", 1)[-1] in wanted:
                f = tar.extractfile(m)
                files[ext] = f.read() if f is not None else b""
        if key is not None and (ex := _tar_sample(prefix, key, files, stats, str(path))) is not None:
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
