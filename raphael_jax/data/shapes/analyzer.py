"""Checks whether an image shows what a shapes-world caption says, object by object.

Pixels are classified to the nearest palette colour (black included) if within `tolerance` in RGB;
each object's colour is present if that colour forms a connected blob (8-connectivity) of at least
`min_area` pixels. The chosen blob (the largest one in the named cell, else the largest one) then
decides place (centroid cell), kind (bounding-box fill and top/bottom mass asymmetry) and size
(bounding-box extent against the midpoint of the small and big sizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from raphael_jax.data.shapes.world import ALL_KINDS, COLOURS, KINDS, PLACES, ShapeObject, shape_pixels

ATTRIBUTES = ("colour", "place", "kind", "size")
_NAMES = list(COLOURS)
_PALETTE = np.array([(0, 0, 0)] + [COLOURS[c] for c in _NAMES], np.float32)  # index 0 = background
_EIGHT = np.ones((3, 3), bool)

# Kind rule: triangle if the lower half of the bounding box holds clearly more mass than the upper
# half; otherwise square if the box is nearly full, else circle. When rings are among the kinds scored
# (the fine-tuning measurement, ``kinds=ALL_KINDS``), a blob whose enclosed holes cover at least RING_HOLE
# of its filled area is a ring (a rendered ring's hole is 0.2-0.25 of it at 32 px; other kinds have none).
TRIANGLE_ASYMMETRY = 0.2
SQUARE_FILL = 0.92
RING_HOLE = 0.08


def to_uint8(images) -> np.ndarray:
    """Map model outputs in [-1, 1] (float) to uint8 [0, 255]."""
    x = np.asarray(images, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def classify_pixels(image: np.ndarray, tolerance: float = 64.0) -> np.ndarray:
    """int [H, W] map: 0 background or unmatched, k >= 1 the k-th colour of COLOURS."""
    x = image.astype(np.float32)
    d2 = ((x[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    label = d2.argmin(-1)
    label[d2.min(-1) > tolerance * tolerance] = 0
    return label


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"analyze: expected a square uint8 [H, W, 3] image, got {image.dtype} {image.shape} "
                         "(use analyzer.to_uint8 for model outputs in [-1, 1])")
    return image


def _blob_features(mask: np.ndarray) -> dict:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    area = len(ys)
    rel = ys - y0  # row within the bounding box
    top = np.sum(rel < h // 2)
    bottom = np.sum(rel >= h - h // 2)  # centre row (odd h) counts for neither half
    filled = int(ndimage.binary_fill_holes(mask[y0:y1, x0:x1]).sum())
    return {"area": area, "cy": ys.mean() + 0.5, "cx": xs.mean() + 0.5, "h": h, "w": w,
            "fill": area / (h * w), "asym": (bottom - top) / area, "hole": (filled - area) / filled}


def classify_kind(fill: float, asym: float, hole: float = 0.0, kinds: Sequence[str] = KINDS) -> str:
    """Kind from bounding-box fill ratio, (bottom - top) / area mass asymmetry and, when "ring" is in
    ``kinds``, the fraction of the filled blob that is hole."""
    if "ring" in kinds and hole >= RING_HOLE:
        return "ring"
    if asym > TRIANGLE_ASYMMETRY:
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def find_blobs(image: np.ndarray, tolerance: float = 64.0, min_area: int | None = None) -> dict:
    """Colour name -> list of blob feature dicts (area, cy, cx, h, w, fill, asym), largest first."""
    image = _check_image(image)
    s = image.shape[0]
    if min_area is None:
        min_area = default_min_area(s)
    labels = classify_pixels(image, tolerance)
    out = {}
    for k, name in enumerate(_NAMES, start=1):
        comp, n = ndimage.label(labels == k, structure=_EIGHT)
        if n == 0:
            continue
        areas = np.bincount(comp.ravel(), minlength=n + 1)
        blobs = [_blob_features(comp == i) for i in range(1, n + 1) if areas[i] >= min_area]
        if blobs:
            out[name] = sorted(blobs, key=lambda b: -b["area"])
    return out


def default_min_area(image_size: int) -> int:
    """Smallest blob counted as a shape: about a third of the small size's bounding box."""
    return max(4, int(math.ceil(0.35 * shape_pixels("small", image_size) ** 2)))


def place_of(cy: float, cx: float, image_size: int) -> str:
    """Grid-cell name of a point in continuous pixel coordinates."""
    row = min(2, max(0, int(cy * 3 // image_size)))
    col = min(2, max(0, int(cx * 3 // image_size)))
    return PLACES[3 * row + col]


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    if not set(KINDS) <= set(kinds) <= set(ALL_KINDS):
        raise ValueError(f"kinds must hold {list(KINDS)} and may add {[k for k in ALL_KINDS if k not in KINDS]}, "
                         f"got {list(kinds)}")
    return kinds


def analyze(image, objects: Sequence[ShapeObject], tolerance: float = 64.0,
            min_area: int | None = None, kinds: Sequence[str] = KINDS) -> list[dict]:
    """Per object: {colour, place, kind, size} booleans; place/kind/size are False without a colour blob.

    ``kinds``: the kinds a blob may be classified as (the base world's by default; ALL_KINDS adds the ring).
    """
    image = _check_image(image)
    kinds = _check_kinds(kinds)
    s = image.shape[0]
    blobs = find_blobs(image, tolerance, min_area)
    size_threshold = 0.5 * (shape_pixels("small", s) + shape_pixels("big", s))
    results = []
    for obj in objects:
        if not isinstance(obj, ShapeObject):
            raise ValueError(f"analyze: expected ShapeObject, got {type(obj).__name__}")
        candidates = blobs.get(obj.colour, [])
        if not candidates:
            results.append(dict.fromkeys(ATTRIBUTES, False))
            continue
        in_cell = [b for b in candidates if place_of(b["cy"], b["cx"], s) == obj.place]
        b = (in_cell or candidates)[0]
        size = "big" if max(b["h"], b["w"]) > size_threshold else "small"
        results.append({
            "colour": True,
            "place": place_of(b["cy"], b["cx"], s) == obj.place,
            "kind": classify_kind(b["fill"], b["asym"], b["hole"], kinds) == obj.kind,
            "size": size == obj.size,
        })
    return results


def score(images, object_lists: Sequence[Sequence[ShapeObject]], tolerance: float = 64.0,
          min_area: int | None = None, kinds: Sequence[str] = KINDS) -> dict:
    """Alignment accuracies over a batch of uint8 images and their prompts' objects.

    Returns per-attribute accuracy over all objects ('colour', 'place', 'kind', 'size'), 'all' (objects
    with every attribute right), 'colour_and_place_all' (fraction of multi-object prompts whose every
    object is right in colour and place; NaN if there are none), and counts 'num_objects',
    'num_prompts', 'num_multi'.
    """
    if len(images) != len(object_lists):
        raise ValueError(f"score: {len(images)} images but {len(object_lists)} object lists")
    rows, multi = [], []
    for image, objects in zip(images, object_lists):
        res = analyze(image, objects, tolerance, min_area, kinds)
        rows.extend(res)
        if len(objects) > 1:
            multi.append(all(r["colour"] and r["place"] for r in res))
    if not rows:
        raise ValueError("score: no objects to score")
    out = {a: float(np.mean([r[a] for r in rows])) for a in ATTRIBUTES}
    out["all"] = float(np.mean([all(r.values()) for r in rows]))
    out["colour_and_place_all"] = float(np.mean(multi)) if multi else float("nan")
    out["num_objects"] = len(rows)
    out["num_prompts"] = len(object_lists)
    out["num_multi"] = len(multi)
    return out
