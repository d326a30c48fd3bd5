"""The ControlNet measurement's parts: control scenes and their edge maps, recolouring, the layout scores."""
import numpy as np

from raphael_jax.config import load_config
from raphael_jax.data.shapes.world import example
from raphael_jax.evaluation.control import control_scenes, layout, recolour


def test_control_scenes_are_edge_maps_of_evaluation_scenes():
    cfg = load_config("configs/tiny_control.py")
    objs, hints = control_scenes(cfg, 6, 1234)
    assert hints.shape == (6, 32, 32, 1) and set(np.unique(hints)) <= {0.0, 1.0}
    assert [len(o) for o in objs] and all(1 <= len(o) <= 2 for o in objs)
    for i, o in enumerate(objs):  # the scene drawn from stream 1 (never trained on), its objects
        assert example(1234, i, 32, 1, 2, stream=1)["objects"] == o
        assert hints[i].sum() > 0


def test_recolour_changes_every_colour_and_keeps_the_rest():
    cfg = load_config("configs/tiny_control.py")
    objs, _ = control_scenes(cfg, 50, 7)
    new = recolour(objs, 7)
    for a, b in zip(objs, new):
        assert [(o.kind, o.size, o.place) for o in a] == [(o.kind, o.size, o.place) for o in b]
        assert all(x.colour != y.colour for x, y in zip(a, b)) and len({o.colour for o in b}) == len(b)
    assert recolour(objs, 7) == new


def test_layout_scores_are_colour_blind():
    ex = [example(0, i, 32, 1, 2, stream=1) for i in range(20)]
    images = np.stack([e["image"] for e in ex])
    objs = [e["objects"] for e in ex]
    assert layout(images, objs) == {"layout": 1.0, "layout_exact": 1.0}
    assert layout(images, recolour(objs, 0)) == {"layout": 1.0, "layout_exact": 1.0}  # colours do not matter
    shifted = layout(images, objs[1:] + objs[:1])
    assert shifted["layout"] < 0.5 and shifted["layout_exact"] < 0.2
    assert layout(np.zeros_like(images), objs) == {"layout": 0.0, "layout_exact": 0.0}
