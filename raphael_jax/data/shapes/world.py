"""The captioned-shapes world: seeded scenes of 1-3 coloured shapes on black, with checkable captions.

A scene places each object in its own cell of a 3x3 grid. Shapes are drawn with hard edges in exact
palette colours, stay inside their cell (never touching a neighbour, even of the same colour, nor
the image border), and are jittered by a few pixels. Captions read
"a big red circle at the top left and a small blue square in the center".
`example(seed, index, ...)` depends on (seed, index) alone, so any stream position can be rebuilt.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "cyan": (30, 210, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
# Kinds the base world never draws (its scenes, captions and tokenizer use KINDS only): the "new subject"
# of LoRA fine-tuning (docs/FINETUNE.md). A ring is a disk with a hole of half its radius.
NEW_KINDS: tuple[str, ...] = ("ring",)
ALL_KINDS: tuple[str, ...] = KINDS + NEW_KINDS
RING_INNER = 0.5  # inner / outer radius of a ring
SIZES: tuple[str, ...] = ("small", "big")
# Row-major names of the 3x3 grid cells.
PLACES: list[str] = [
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
]
# Fraction of a cell's width that a shape's bounding box spans.
SIZE_FRACTION = {"small": 0.45, "big": 0.8}
MIN_IMAGE_SIZE = 32  # below this, big and small shapes are hard to tell apart
# Largest random offset from the cell centre, as a fraction of the cell width.
JITTER_FRACTION = 0.12


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object of a scene: colour, kind, size and place (all names from the fixed vocabulary)."""

    colour: str
    kind: str
    size: str
    place: str

    def __post_init__(self):
        for field, value, allowed in (("colour", self.colour, tuple(COLOURS)), ("kind", self.kind, ALL_KINDS),
                                      ("size", self.size, SIZES), ("place", self.place, tuple(PLACES))):
            if value not in allowed:
                raise ValueError(f"ShapeObject: unknown {field} {value!r}; expected one of {list(allowed)}")

    @property
    def place_index(self) -> int:
        """Row-major index (0-8) of the object's grid cell."""
        return PLACES.index(self.place)


# ----------------------------------------------------------------------------------------- captions

def _phrase(obj: ShapeObject, place: bool = True) -> str:
    where = "in the center" if obj.place == "center" else f"at the {obj.place}"
    return f"a {obj.size} {obj.colour} {obj.kind} {where}" if place else f"a {obj.size} {obj.colour} {obj.kind}"


def make_caption(objects: Sequence[ShapeObject], places: bool = True) -> str:
    """Caption naming every object in order, joined by "and"; ``places=False`` leaves the places out (the
    ControlNet's captions: the layout comes from the control image)."""
    if not objects:
        raise ValueError("make_caption: need at least one object")
    return " and ".join(_phrase(o, places) for o in objects)


def _alternation(names) -> str:
    # Longest first so "top left" wins over "top".
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_PHRASE_RE = re.compile(
    rf"a ({_alternation(SIZES)}) ({_alternation(COLOURS)}) ({_alternation(ALL_KINDS)}) "
    rf"(?:at the ({_alternation(p for p in PLACES if p != 'center')})|in the (center))"
)


def parse_caption(caption: str) -> list[ShapeObject]:
    """Inverse of `make_caption` (case and extra whitespace ignored); ValueError if not a world caption."""
    if not isinstance(caption, str):
        raise ValueError(f"parse_caption: expected a str, got {type(caption).__name__}")
    text = " ".join(caption.lower().split())
    objects = []
    for part in text.split(" and "):
        m = _PHRASE_RE.fullmatch(part)
        if m is None:
            raise ValueError(f"parse_caption: cannot parse {part!r} in caption {caption!r}")
        size, colour, kind, place, center = m.groups()
        objects.append(ShapeObject(colour=colour, kind=kind, size=size, place=place or center))
    if len({o.place for o in objects}) != len(objects):
        raise ValueError(f"parse_caption: two objects share a place in {caption!r}")
    return objects


# ---------------------------------------------------------------------------------------- geometry

def check_image_size(image_size: int) -> int:
    """The image size as an int; ValueError unless it is an int >= MIN_IMAGE_SIZE."""
    if not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    return int(image_size)


def cell_bounds(image_size: int) -> list[tuple[int, int]]:
    """Pixel ranges [lo, hi) along one axis that shapes may use in each of the 3 grid rows/columns.

    The pixel column holding each continuous cell boundary (i * image_size / 3) is left empty, so
    shapes in adjacent cells never touch, and so are the outermost rows and columns of the image.
    """
    s = check_image_size(image_size)
    out = []
    for i in range(3):
        lo = 1 if i == 0 else int(np.floor(i * s / 3)) + 1
        hi = s - 1 if i == 2 else int(np.floor((i + 1) * s / 3))
        out.append((lo, hi))
    return out


def shape_pixels(size: str, image_size: int) -> int:
    """Side (square), diameter (circle) or base = height (triangle) in pixels for a size name."""
    s = check_image_size(image_size)
    if size not in SIZE_FRACTION:
        raise ValueError(f"unknown size {size!r}; expected one of {list(SIZES)}")
    cell = s / 3
    px = int(round(SIZE_FRACTION[size] * cell))
    if size == "small":
        px = max(px, 5)
    return min(px, min(hi - lo for lo, hi in cell_bounds(s)))


def shape_mask(kind: str, side: int) -> np.ndarray:
    """Boolean [side, side] template of a shape: full square, inscribed disk, upward triangle, or ring (the
    disk without the disk of RING_INNER its radius)."""
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {list(ALL_KINDS)}")
    c = np.arange(side) + 0.5  # pixel centres
    yy, xx = np.meshgrid(c, c, indexing="ij")
    h = side / 2
    if kind == "square":
        return np.ones((side, side), bool)
    if kind == "circle":
        return (xx - h) ** 2 + (yy - h) ** 2 <= h * h
    if kind == "ring":
        r2 = (xx - h) ** 2 + (yy - h) ** 2
        return (r2 <= h * h) & (r2 > (RING_INNER * h) ** 2)
    # Triangle: apex at top centre, base on the bottom row; half-width grows by 1/2 pixel per row.
    half_width = (np.arange(side)[:, None] + 1) * 0.5
    return np.abs(xx - h) <= half_width


# --------------------------------------------------------------------------------------- sampling

def sample_objects(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 3,
                   object_weights: Sequence[float] | None = None) -> list[ShapeObject]:
    """Random scene: n objects (min..max, weighted by `object_weights`) in distinct random cells."""
    if not 1 <= min_objects <= max_objects <= 9:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 9, got {min_objects}, {max_objects}")
    counts = np.arange(min_objects, max_objects + 1)
    if object_weights is None:
        n = int(rng.integers(min_objects, max_objects + 1))
    else:
        w = np.asarray(object_weights, np.float64)
        if w.shape != counts.shape or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"object_weights must be {len(counts)} non-negative weights (for {min_objects}.."
                             f"{max_objects} objects) with a positive sum, got {object_weights}")
        n = int(rng.choice(counts, p=w / w.sum()))
    cells = rng.permutation(9)[:n]
    colours, kinds = list(COLOURS), list(KINDS)
    return [ShapeObject(colour=colours[rng.integers(len(colours))], kind=kinds[rng.integers(len(kinds))],
                        size=SIZES[rng.integers(len(SIZES))], place=PLACES[int(c)]) for c in cells]


def _validate_scene(objects: Sequence[ShapeObject]) -> None:
    if not objects:
        raise ValueError("a scene needs at least one object")
    for o in objects:
        if not isinstance(o, ShapeObject):
            raise ValueError(f"expected ShapeObject, got {type(o).__name__}")
    if len({o.place for o in objects}) != len(objects):
        raise ValueError(f"objects must occupy distinct places, got {[o.place for o in objects]}")


def render(objects: Sequence[ShapeObject], image_size: int,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw a scene as uint8 [H, W, 3] on black; shapes centred in their cells, jittered when rng is given."""
    s = check_image_size(image_size)
    _validate_scene(objects)
    bounds = cell_bounds(s)
    image = np.zeros((s, s, 3), np.uint8)
    max_jitter = int(round(JITTER_FRACTION * s / 3))
    for obj in objects:
        side = shape_pixels(obj.size, s)
        mask = shape_mask(obj.kind, side)
        row, col = divmod(obj.place_index, 3)
        origin = []
        for lo, hi in (bounds[row], bounds[col]):
            slack = hi - lo - side
            centred = lo + slack // 2
            if rng is not None and slack > 0:
                j = min(max_jitter, slack)
                centred = int(np.clip(centred + rng.integers(-j, j + 1), lo, hi - side))
            origin.append(centred)
        y0, x0 = origin
        image[y0:y0 + side, x0:x0 + side][mask] = COLOURS[obj.colour]
    return image


def example(seed: int, index: int, image_size: int = 32, min_objects: int = 1, max_objects: int = 3,
            object_weights: Sequence[float] | None = None, stream: int = 0, places: bool = True) -> dict:
    """Example `index` of the stream `seed`: dict(image uint8 [S,S,3], caption str, objects list).

    Deterministic in (seed, index, stream) alone; the objects do not depend on image_size.
    stream 0 is the training stream; another stream (e.g. 1) draws other scenes (its captions can
    still coincide with training captions: there are only 432 single-object ones).
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    entropy = [int(seed), int(index)] if stream == 0 else [int(seed), int(index), int(stream)]
    rng = np.random.default_rng(entropy)
    objects = sample_objects(rng, min_objects, max_objects, object_weights)
    image = render(objects, image_size, rng)
    return {"image": image, "caption": make_caption(objects, places), "objects": objects}


def sample_prompts(n: int, seed: int = 0, min_objects: int = 1, max_objects: int = 3,
                   object_weights: Sequence[float] | None = None, stream: int = 1) -> list[list[ShapeObject]]:
    """`n` object lists for evaluation prompts, from stream 1 by default (see make_caption and example)."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([int(seed), i] if stream == 0 else [int(seed), i, int(stream)])
        out.append(sample_objects(rng, min_objects, max_objects, object_weights))
    return out


def all_words() -> list[str]:
    """Every word any caption can use."""
    words = {"a", "and", "at", "the", "in"}
    words.update(SIZES)
    words.update(COLOURS)
    words.update(KINDS)
    for p in PLACES:
        words.update(p.split())
    return sorted(words)


def max_caption_words(max_objects: int = 3) -> int:
    """Most words a caption with up to `max_objects` objects can have (8 per object plus the "and"s)."""
    return 9 * max_objects - 1
