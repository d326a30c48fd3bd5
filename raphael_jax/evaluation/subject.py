"""The fine-tuning measurement (paper App. 7.8, made checkable): does a new subject carry into new contexts?

A run fine-tuned on the subject set (``data.kind="subject"``: a few images of one kind, e.g. the ring, in
a narrow set of colours, sizes and places; raphael_jax/data/shapes/subject.py) is scored on

- ``unseen``: prompts of the subject in colours and places outside its training ones (sizes: all), with
  the analyzer's per-attribute accuracies (kinds scored among ``world.ALL_KINDS``), the kind accuracy by
  size (``kind_seen_size`` / ``kind_unseen_size``), and two over-fitting measures: the fraction of images
  whose largest blob has a *training* colour (``colour_collapse``) or lies in a *training* place
  (``place_collapse``) although the prompt asked for another;
- ``retention``: one-object prompts of the base world's kinds (the evaluation stream), scored the same way
  (a ring drawn where a circle was asked counts as a wrong kind).
"""
from __future__ import annotations

import time

import numpy as np

from raphael_jax.data.shapes.analyzer import find_blobs, place_of, score
from raphael_jax.data.shapes.subject import unseen_prompts
from raphael_jax.data.shapes.world import ALL_KINDS, make_caption, sample_prompts


def _largest_blob(image) -> tuple[str, dict] | None:
    best = None
    for colour, blobs in find_blobs(image).items():
        if best is None or blobs[0]["area"] > best[1]["area"]:
            best = (colour, blobs[0])
    return best


def collapse(images, subject) -> dict:
    """Fractions of images whose largest blob is in a training colour / a training place of ``subject``."""
    colour = place = 0
    for im in images:
        b = _largest_blob(im)
        if b is None:
            continue
        colour += b[0] in subject.colours
        place += place_of(b[1]["cy"], b[1]["cx"], im.shape[0]) in subject.places
    n = max(len(images), 1)
    return {"colour_collapse": colour / n, "place_collapse": place / n}


def evaluate_subject(sampler, subject, num_prompts: int = 200, seed: int = 1234, guidance: float | None = None,
                     num_steps: int | None = None, verbose: bool = True) -> dict:
    """``{"unseen": {...}, "retention": {...}}`` for ``num_prompts`` prompts each (images sampled with ``seed``)."""
    out = {}
    t0 = time.time()
    objs = unseen_prompts(subject, num_prompts, seed)
    images = sampler.sample([make_caption(o) for o in objs], seed=seed, guidance=guidance, num_steps=num_steps)
    res = score(images, objs, kinds=ALL_KINDS)
    sizes = np.array([o[0].size in subject.sizes for o in objs])
    for name, sel in (("kind_seen_size", sizes), ("kind_unseen_size", ~sizes)):
        if sel.any():
            res[name] = score([im for im, s in zip(images, sel) if s], [o for o, s in zip(objs, sel) if s],
                              kinds=ALL_KINDS)["kind"]
    res.update(collapse(images, subject))
    res["seconds"] = time.time() - t0
    out["unseen"] = res
    t0 = time.time()
    objs = sample_prompts(num_prompts, seed=seed, min_objects=1, max_objects=1)
    images = sampler.sample([make_caption(o) for o in objs], seed=seed, guidance=guidance, num_steps=num_steps)
    res = score(images, objs, kinds=ALL_KINDS)
    res["seconds"] = time.time() - t0
    out["retention"] = res
    if verbose:
        for k, r in out.items():
            print(format_subject_row(k, r), flush=True)
    return out


SUBJECT_ATTRS = ("colour", "place", "kind", "size", "all", "kind_seen_size", "kind_unseen_size",
                 "colour_collapse", "place_collapse")


def format_subject_row(name: str, res: dict) -> str:
    cells = [f"{a} {res[a]:.3f}" for a in SUBJECT_ATTRS if a in res and res[a] == res[a]]
    return f"{name:>9}: " + "  ".join(cells) + f"  ({res.get('num_prompts', '?')} prompts)"
