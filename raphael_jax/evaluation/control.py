"""The ControlNet measurement: does the layout follow the control image? (paper App. 7.8, as colour)

For ``n`` evaluation-stream scenes of 1-2 objects (stream 1, never drawn by the trainer), the control image
is the scene's edge map (the run's ``model.edge.source``) and the prompt names each object's size, colour
and kind but not its place. The analyzer then checks each named object in the scene's place:

- ``follow``: prompts as drawn; ``place`` is the fraction of objects found (in their colour) in the place
  the control put them;
- ``recolour``: the same control images with every object given another colour (the paper's
  "blue / snow / watercolor" demo, as colour): the layout must stay, in the new colours;
- ``no_control``: the same prompts at control scale 0, i.e. the base model (nothing says where to draw).

``place`` needs the object's colour to be found; :func:`layout` scores the layout alone, colour-blind.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from raphael_jax.data.shapes.analyzer import find_blobs, place_of, score
from raphael_jax.data.shapes.world import COLOURS, example, make_caption


def control_scenes(config, n: int, seed: int, objects=(1, 2)):
    """(object lists, control images [n, H, W, 1]) of ``n`` evaluation scenes with ``objects`` objects."""
    from raphael_jax.data.edges import get_edge_source

    edge = get_edge_source(config.model.edge.source)
    lo, hi = min(objects), max(objects)
    exs = [example(seed, i, config.data.image_size, lo, hi, stream=1) for i in range(n)]
    return [e["objects"] for e in exs], np.stack([np.asarray(edge(e["image"]), np.float32)[..., None] for e in exs])


def recolour(objects, seed: int):
    """Each object in another colour (distinct within a scene), deterministic in ``seed``."""
    out = []
    for i, objs in enumerate(objects):
        rng = np.random.default_rng([int(seed), i, 11])
        free = [c for c in COLOURS if c not in {o.colour for o in objs}]
        picks = rng.choice(len(free), len(objs), replace=False)
        out.append([dataclasses.replace(o, colour=free[int(k)]) for o, k in zip(objs, picks)])
    return out


def layout(images, object_lists) -> dict:
    """Colour-blind layout scores: ``layout`` = fraction of the scenes' objects whose cell holds a blob of any
    palette colour; ``layout_exact`` = fraction of images whose occupied cells are exactly the scene's."""
    hit = exact = total = 0
    for im, objs in zip(images, object_lists):
        cells = {place_of(b["cy"], b["cx"], im.shape[0]) for blobs in find_blobs(im).values() for b in blobs}
        want = {o.place for o in objs}
        hit += len(want & cells)
        total += len(want)
        exact += cells == want
    return {"layout": hit / max(total, 1), "layout_exact": exact / max(len(images), 1)}


def evaluate_control(sampler, num_prompts: int = 200, seed: int = 1234, scale: float | None = None,
                     guidance: float | None = None, num_steps: int | None = None, verbose: bool = True) -> dict:
    objects, hints = control_scenes(sampler.config, num_prompts, seed)
    out = {}
    for name, objs, s in (("follow", objects, scale), ("recolour", recolour(objects, seed), scale),
                          ("no_control", objects, 0.0)):
        t0 = time.time()
        prompts = [make_caption(o, places=False) for o in objs]
        images = sampler.sample(prompts, seed=seed, guidance=guidance, num_steps=num_steps, hint=hints,
                                control_scale=s)
        res = score(images, objs)
        res.update(layout(images, objs))
        res["seconds"] = time.time() - t0
        out[name] = res
        if verbose:
            cells = "  ".join(f"{a} {res[a]:.3f}" for a in ("place", "colour", "kind", "size", "all", "layout",
                                                             "layout_exact"))
            print(f"{name:>10}: {cells}  ({res['num_prompts']} prompts, {res['num_objects']} objects)", flush=True)
    return out
