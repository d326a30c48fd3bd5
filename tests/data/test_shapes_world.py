"""Shapes world: generator, captions, analyzer and Canny edges."""

import math

import numpy as np
import pytest

from raphael_jax.data import edges as E
from raphael_jax.data.shapes import analyzer as A
from raphael_jax.data.shapes import world as S
from raphael_jax.data.shapes.world import ShapeObject


def _scenes(n, size, seed=11):
    exs = [S.example(seed, i, size) for i in range(n)]
    return np.stack([e["image"] for e in exs]), [e["objects"] for e in exs]


# ------------------------------------------------------------------------------- vocabulary, captions

def test_vocabulary():
    assert S.COLOURS["red"] == (230, 25, 25) and S.COLOURS["white"] == (245, 245, 245)
    assert len(S.COLOURS) == 8 and S.KINDS == ("circle", "square", "triangle") and S.SIZES == ("small", "big")
    assert S.PLACES == ["top left", "top", "top right", "left", "center", "right",
                        "bottom left", "bottom", "bottom right"]
    assert len(S.all_words()) == 23


def test_caption_format_and_parse():
    objs = [ShapeObject("red", "circle", "big", "top left"), ShapeObject("blue", "square", "small", "bottom")]
    cap = "a big red circle at the top left and a small blue square at the bottom"
    assert S.make_caption(objs) == cap
    assert S.parse_caption(cap) == objs
    assert S.make_caption([ShapeObject("white", "triangle", "small", "center")]) == \
        "a small white triangle in the center"
    assert S.parse_caption("  A Big RED circle   at the top left ") == objs[:1]
    rng = np.random.default_rng(0)
    for _ in range(300):
        objs = S.sample_objects(rng, 1, 3)
        assert S.parse_caption(S.make_caption(objs)) == objs
    caps = [S.make_caption(S.sample_objects(rng, 3, 3)) for _ in range(200)]
    assert max(len(c.split()) for c in caps) <= S.max_caption_words(3)


@pytest.mark.parametrize("bad", ["", "a big red dog at the top", "a big red circle at the middle",
                                 "a big red circle at the top left and", "a big red circle in the top",
                                 "a big red circle at the top and a small red square at the top"])
def test_parse_caption_rejects(bad):
    with pytest.raises(ValueError, match="parse_caption"):
        S.parse_caption(bad)


def test_shape_object_validation():
    with pytest.raises(ValueError, match="colour"):
        ShapeObject("pink", "circle", "big", "top")
    with pytest.raises(ValueError, match="place"):
        ShapeObject("red", "circle", "big", "middle")


# ------------------------------------------------------------------------------------- generator

@pytest.mark.parametrize("size", [32, 64])
def test_render_palette_cells_and_sizes(size):
    bounds = S.cell_bounds(size)
    palette = {(0, 0, 0)} | set(S.COLOURS.values())
    for i in range(60):
        ex = S.example(3, i, size)
        img = ex["image"]
        assert img.dtype == np.uint8 and img.shape == (size, size, 3)
        assert {tuple(p) for p in img.reshape(-1, 3)} <= palette
        covered = np.zeros((size, size), bool)
        for o in ex["objects"]:
            r, c = divmod(o.place_index, 3)
            (y0, y1), (x0, x1) = bounds[r], bounds[c]
            cell = np.zeros((size, size), bool)
            cell[y0:y1, x0:x1] = True
            covered |= cell
            assert (img[cell] == S.COLOURS[o.colour]).all(-1).sum() > 0
        assert not img[~covered].any(), "pixels drawn outside the objects' cells"
    big, small = S.shape_pixels("big", size), S.shape_pixels("small", size)
    assert big >= 1.6 * small and big <= (size / 3)


def test_cell_gutters_keep_neighbours_apart():
    for size in (32, 33, 48, 64, 96, 256):
        b = S.cell_bounds(size)
        assert b[0][0] == 1 and b[2][1] == size - 1
        assert b[0][1] < b[1][0] and b[1][1] < b[2][0]  # an empty column between cells


def test_example_deterministic_and_independent_of_order():
    a = S.example(5, 17, 32)
    _ = [S.example(5, i, 32) for i in range(5)]
    b = S.example(5, 17, 32)
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert S.example(5, 17, 64)["caption"] == a["caption"]  # scene content does not depend on size
    assert S.example(5, 17, 32, stream=1)["caption"] != a["caption"] or \
        not np.array_equal(S.example(5, 17, 32, stream=1)["image"], a["image"])
    caps = {S.example(5, i, 32)["caption"] for i in range(50)}
    assert len(caps) > 45


def test_sample_objects_counts_and_weights():
    rng = np.random.default_rng(1)
    counts = [len(S.sample_objects(rng, 1, 3)) for _ in range(300)]
    assert set(counts) == {1, 2, 3}
    assert all(len(S.sample_objects(rng, 1, 3, object_weights=(0, 1, 0))) == 2 for _ in range(50))
    objs = S.sample_objects(rng, 3, 3)
    assert len({o.place for o in objs}) == 3
    with pytest.raises(ValueError, match="object_weights"):
        S.sample_objects(rng, 1, 3, object_weights=(1, 1))
    with pytest.raises(ValueError, match="min_objects"):
        S.sample_objects(rng, 0, 3)


def test_render_rejects_bad_input():
    o = ShapeObject("red", "circle", "big", "top")
    with pytest.raises(ValueError, match="distinct places"):
        S.render([o, ShapeObject("blue", "square", "small", "top")], 32)
    with pytest.raises(ValueError, match="image_size"):
        S.render([o], 24)
    with pytest.raises(ValueError, match="at least one"):
        S.render([], 32)


# --------------------------------------------------------------------------------------- analyzer

@pytest.mark.parametrize("size", [32, 64])
def test_analyzer_on_generator_images(size):
    images, objs = _scenes(300, size)
    r = A.score(images, objs)
    assert r["num_prompts"] == 300 and r["num_multi"] > 150
    for key in ("colour", "place", "kind", "size", "all", "colour_and_place_all"):
        assert r[key] >= 0.98, (key, r)


@pytest.mark.parametrize("size", [32, 64])
def test_analyzer_rejects_noise_and_blank(size):
    _, objs = _scenes(200, size)
    noise = np.random.default_rng(0).integers(0, 256, (200, size, size, 3), dtype=np.uint8)
    blank = np.zeros((200, size, size, 3), np.uint8)
    for images in (noise, blank):
        r = A.score(images, objs)
        for key in ("colour", "place", "kind", "size", "all", "colour_and_place_all"):
            assert r[key] <= 0.05, (key, r)


def test_analyzer_tolerates_mild_pixel_noise():
    images, objs = _scenes(150, 32, seed=4)
    noisy = images + np.random.default_rng(0).normal(0, 15, images.shape)
    r = A.score(np.clip(noisy, 0, 255).astype(np.uint8), objs)
    assert r["all"] >= 0.95, r


def test_analyzer_mismatched_captions_score_low():
    images, objs = _scenes(200, 32, seed=6)
    r = A.score(images, objs[1:] + objs[:1])
    assert r["all"] <= 0.1 and r["colour_and_place_all"] <= 0.1, r


def test_analyzer_attributes_fail_independently():
    o = ShapeObject("orange", "triangle", "big", "bottom left")
    img = S.render([o, ShapeObject("yellow", "circle", "small", "right")], 32)
    assert A.analyze(img, [o]) == [{"colour": True, "place": True, "kind": True, "size": True}]
    swap = {"colour": ShapeObject("green", o.kind, o.size, o.place),
            "kind": ShapeObject(o.colour, "square", o.size, o.place),
            "size": ShapeObject(o.colour, o.kind, "small", o.place),
            "place": ShapeObject(o.colour, o.kind, o.size, "top")}
    for attr, wrong in swap.items():
        res = A.analyze(img, [wrong])[0]
        if attr == "colour":
            assert res == dict.fromkeys(A.ATTRIBUTES, False)  # no blob: nothing else can be right
        else:
            assert res == {**dict.fromkeys(A.ATTRIBUTES, True), attr: False}, attr


def test_analyzer_same_colour_objects_and_io():
    objs = [ShapeObject("red", "square", "big", "top left"), ShapeObject("red", "circle", "small", "top")]
    img = S.render(objs, 32)
    assert all(all(r.values()) for r in A.analyze(img, objs))
    assert np.array_equal(A.to_uint8(img.astype(np.float32) / 127.5 - 1.0), img)
    single = A.score(img[None], [objs[:1]])
    assert math.isnan(single["colour_and_place_all"]) and single["all"] == 1.0
    with pytest.raises(ValueError, match="uint8"):
        A.analyze(img.astype(np.float32), objs)
    with pytest.raises(ValueError, match="object lists"):
        A.score(img[None], [objs, objs])


# ------------------------------------------------------------------------------------------ edges

def test_canny_on_a_square():
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:20, 10:24] = S.COLOURS["blue"]
    e = E.canny(img)
    assert e.dtype == np.float32 and e.shape == (32, 32) and set(np.unique(e)) <= {0.0, 1.0}
    inside = np.zeros((32, 32), bool)
    inside[8:20, 10:24] = True
    border = inside & ~(np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1)
                        & np.roll(inside, -1, 1))
    assert np.array_equal(e.astype(bool), border)  # a one-pixel outline on the bright side
    # Within one pixel of the boundary whatever the thresholds: nothing deep inside or far outside.
    e2 = E.canny(img, low=0.02, high=0.05)
    ring = np.zeros((32, 32), bool)
    ring[7:21, 9:25] = True
    ring[10:18, 12:22] = False
    assert e2[~ring].sum() == 0 and e2[border].mean() == 1.0


def test_canny_gray_blank_and_shapes():
    assert E.canny(np.zeros((16, 16), np.uint8)).sum() == 0
    gray = np.zeros((16, 16), np.uint8)
    gray[4:12, 4:12] = 200
    assert E.canny(gray).sum() == 28
    img = S.example(0, 3, 64)["image"]
    e = E.canny(img)
    near = np.zeros(img.shape[:2], bool)
    lit = img.any(-1)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near |= np.roll(np.roll(lit, dy, 0), dx, 1)
    assert e.sum() > 20 and e[~near].sum() == 0
    with pytest.raises(ValueError, match="low <= high"):
        E.canny(img, low=0.3, high=0.1)


def test_edge_registry_and_pooling():
    assert E.get_edge_source("canny") is E.canny
    with pytest.raises(ValueError, match="unknown edge source 'hed'"):
        E.get_edge_source("hed")
    E.register_edge_source("zeros", lambda im: np.zeros(im.shape[:2], np.float32))
    try:
        assert E.get_edge_source("zeros")(np.zeros((8, 8, 3), np.uint8)).shape == (8, 8)
    finally:
        del E.EDGE_SOURCES["zeros"]
    m = np.zeros((2, 8, 8), np.float32)
    m[1, 5, 2] = 1
    p = E.pool_edges(m, 4)
    assert p.shape == (2, 2, 2) and p[1, 1, 0] == 1 and p.sum() == 1
    with pytest.raises(ValueError, match="divide"):
        E.pool_edges(m, 3)


def test_outline_edges_match_canny_on_rendered_shapes():
    import numpy as np

    from raphael_jax.data.edges import canny, outline
    from raphael_jax.data.shapes.world import example

    agree = []
    for i in range(20):
        img = example(0, i, 32)["image"]
        a, b = outline(img), canny(img)
        assert a.sum() > 0
        # every outline pixel lies on or next to a Canny edge
        near = np.zeros_like(b, bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= np.roll(np.roll(b > 0, dy, 0), dx, 1)
        agree.append(float((a > 0)[near].sum() / a.sum()))
    assert min(agree) >= 0.9, agree
