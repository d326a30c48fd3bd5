"""COCO captions for the zero-shot FID-30k (:mod:`raphael_jax.evaluation.coco_fid`): read, draw, split.

Captions come from ``captions_val2014.json`` (:func:`load_coco_captions`) or a prepared tfds
``coco_captions`` split (:func:`load_coco_captions_tfds`), as entries ``{image_id, ann_id, caption,
file_name}`` sorted by (image id, annotation id). :func:`draw_captions` draws ``num`` of them with
``np.random.default_rng(seed)``: by default ``num`` distinct images and one caption of each
(``one_per_image=False``: ``num`` distinct captions, several per image possible). The draw is the same
on every host and every run. :func:`host_slice` is each host's contiguous share of the drawn captions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["draw_captions", "host_slice", "load_coco_captions", "load_coco_captions_tfds"]


def load_coco_captions(annotations: str | Path) -> list[dict[str, Any]]:
    """Entries ``{image_id, ann_id, caption, file_name}`` of a COCO captions json, sorted by
    (image_id, ann_id)."""
    data = json.loads(Path(annotations).read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    out = [
        {
            "image_id": int(a["image_id"]),
            "ann_id": int(a["id"]),
            "caption": " ".join(a["caption"].split()),
            "file_name": files[a["image_id"]],
        }
        for a in data["annotations"]
    ]
    return sorted(out, key=lambda e: (e["image_id"], e["ann_id"]))


def load_coco_captions_tfds(name: str = "coco_captions", split: str = "val", data_dir: str | None = None):
    """The same entries from a prepared tfds ``coco_captions`` split (``tfds.data_source``, no TF).

    ``file_name`` is ``image/filename``; reference images then come from tfds as well."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, split=split or "val", data_dir=data_dir)
    out = []
    for i in range(len(source)):
        ex = source[i]
        fname = ex.get("image/filename", b"")
        fname = fname.decode() if isinstance(fname, bytes) else str(fname)
        caps = ex["captions"]
        for ann_id, text in zip(np.asarray(caps["id"]).tolist(), list(caps["text"])):
            text = text.decode() if isinstance(text, bytes) else str(text)
            out.append(
                {
                    "image_id": int(ex["image/id"]),
                    "ann_id": int(ann_id),
                    "caption": " ".join(text.split()),
                    "file_name": fname,
                }
            )
    return sorted(out, key=lambda e: (e["image_id"], e["ann_id"]))


def draw_captions(entries: Sequence[dict], num: int, seed: int = 0, one_per_image: bool = True) -> list[dict]:
    """``num`` entries drawn with ``np.random.default_rng(seed)`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if not one_per_image:
        if num > len(entries):
            raise ValueError(f"asked for {num} captions, the annotations hold {len(entries)}")
        return [entries[i] for i in rng.choice(len(entries), num, replace=False)]
    by_image: dict[int, list[dict]] = {}
    for e in entries:
        by_image.setdefault(e["image_id"], []).append(e)
    ids = sorted(by_image)
    if num > len(ids):
        raise ValueError(
            f"asked for {num} images with one caption each, the annotations hold {len(ids)} "
            "images (use --any-caption for several captions per image)"
        )
    chosen = rng.choice(len(ids), num, replace=False)
    return [by_image[ids[i]][int(rng.integers(len(by_image[ids[i]])))] for i in chosen]


def host_slice(num: int, process_index: int | None = None, process_count: int | None = None) -> np.ndarray:
    """This host's contiguous slice of ``range(num)`` (``np.array_split`` over the processes)."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    return np.array_split(np.arange(num), pc)[pi]
