"""Reading an image_text build: a random-access source and a per-bucket grain pipeline of host batches."""


from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import grain
import numpy as np
import tensorflow_datasets as tfds

from raphael_jax.data.real.buckets import BucketBatchPlan
from raphael_jax.data.real.sources import decode_edges, decode_image


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
    """MapDataset of this host's per-bucket batches (see :class:`~raphael_jax.data.real.buckets.BucketBatchPlan`).

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
