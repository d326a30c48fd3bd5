"""The captioned-shapes world written as a LAION-style image folder, for the real image-text path.

``write_shapes_folder(out_dir, num, ...)`` renders examples 0..num-1 of the world's stream
(:func:`raphael_jax.data.shapes.world.example`) as::

    out_dir/000000.png  000000.txt  000001.png  000001.txt  ...  metadata.jsonl

- ``{i:06d}.png``: the RGB image, image_size x image_size, written with PIL (lossless);
- ``{i:06d}.txt``: its caption (UTF-8, no trailing newline), the side-car layout;
- ``metadata.jsonl``: one row per image, in index order: ``file_name``, ``caption``, ``objects``
  (the scene as a list of ``{colour, kind, size, place}``, so evaluation can recover it without
  parsing the caption) and ``seed`` / ``stream`` / ``index`` (the row is ``example(seed, index,
  stream=stream)``).

This is the layout the image_text build reads (docs/DATA_REAL.md, "The data folder"; the reader is
``raphael_jax/data/real/sources.py``). The rows carry no aesthetic or watermark column: the build's
filters (the paper, Sec. 4: aesthetic >= 4.7, watermarks removed) act only on examples whose
metadata holds that column, so every row passes them, and world captions hold no URL, HTML or
e-mail for the caption cleaning to remove. Build it with a custom square bucket of the image size,
``build_image_text_dataset(data_dir, out_dir, buckets=[(S, S)])``, so images are stored unresized.

The folder is a pure function of its arguments (PNGs carry no timestamps). An existing non-empty
``out_dir`` is refused, never overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from PIL import Image

from raphael_jax.data.shapes.world import check_image_size, example

__all__ = ["METADATA_FILE", "write_shapes_folder"]

METADATA_FILE = "metadata.jsonl"


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"write_shapes_folder: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def write_shapes_folder(out_dir, num: int, *, image_size: int = 64, seed: int = 0, min_objects: int = 1,
                        max_objects: int = 1, stream: int = 0) -> dict:
    """Render ``num`` world examples into ``out_dir`` (created; refused if it exists and is not empty).

    Returns ``{"out_dir", "num", "image_size", "seed", "min_objects", "max_objects", "stream",
    "metadata"}`` (``metadata``: the path of metadata.jsonl).
    """
    num = _check_int("num", num, 1)
    image_size = check_image_size(image_size)
    seed, stream = _check_int("seed", seed, 0), _check_int("stream", stream, 0)
    min_objects, max_objects = _check_int("min_objects", min_objects, 1), _check_int("max_objects", max_objects, 1)
    if not min_objects <= max_objects <= 9:
        raise ValueError(f"write_shapes_folder: need 1 <= min_objects <= max_objects <= 9, "
                         f"got {min_objects}, {max_objects}")
    out = Path(os.fspath(out_dir))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"write_shapes_folder: {out} exists and is not an empty directory; give a new one")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num):
        ex = example(seed, i, image_size=image_size, min_objects=min_objects, max_objects=max_objects,
                     stream=stream)
        stem = f"{i:06d}"
        Image.fromarray(ex["image"]).save(out / f"{stem}.png", format="PNG")
        (out / f"{stem}.txt").write_text(ex["caption"], encoding="utf-8")
        rows.append({"file_name": f"{stem}.png", "caption": ex["caption"],
                     "objects": [dataclasses.asdict(o) for o in ex["objects"]],
                     "seed": seed, "stream": stream, "index": i})
    meta = out / METADATA_FILE
    meta.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    return {"out_dir": str(out), "num": num, "image_size": image_size, "seed": seed,
            "min_objects": min_objects, "max_objects": max_objects, "stream": stream, "metadata": str(meta)}
