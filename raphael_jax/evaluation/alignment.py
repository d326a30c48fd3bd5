"""Text-image alignment on the shapes world: sample evaluation prompts, score them with the analyzer."""
from __future__ import annotations

import json
import os
import time

from raphael_jax.data.shapes.analyzer import score
from raphael_jax.data.shapes.world import make_caption, sample_prompts

ATTRS = ("colour", "place", "kind", "size", "all", "colour_and_place_all")


def evaluate_alignment(sampler, num_prompts: int = 200, seed: int = 1234, objects=(1, 2, 3),
                       guidance: float | None = None, num_steps: int | None = None, verbose: bool = True) -> dict:
    """Per-attribute accuracy for ``num_prompts`` evaluation prompts with each object count in ``objects``.

    Prompts come from the world's evaluation stream (stream 1, whose scenes the trainer never draws)
    with ``seed``; images are sampled with the same seed, so the result is a deterministic function
    of the weights. The prompts are not held out as *captions*: the world has only 432 single-object
    captions and training sees them all, and multi-object captions may also occur in training.
    What is new at evaluation is the noise (and the scene draw), not the words.
    """
    results = {}
    for n in objects:
        t0 = time.time()
        objs = sample_prompts(num_prompts, seed=seed, min_objects=n, max_objects=n)
        prompts = [make_caption(o) for o in objs]
        images = sampler.sample(prompts, seed=seed, guidance=guidance, num_steps=num_steps)
        res = score(images, objs)
        res["seconds"] = time.time() - t0
        results[f"{n}_object"] = res
        if verbose:
            print(format_row(f"{n}-object", res), flush=True)
    return results


def format_row(name: str, res: dict) -> str:
    cells = []
    for a in ATTRS:
        v = res.get(a)
        if v is None or v != v:  # missing or NaN
            continue
        cells.append(f"{a} {v:.3f}")
    return f"{name:>9}: " + "  ".join(cells) + f"  ({res.get('num_prompts', '?')} prompts)"


def save_results(workdir: str, step: int, guidance: float, results: dict, tag: str = "") -> str:
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"alignment_step{step}_g{guidance:g}{'_' + tag if tag else ''}.json")
    with open(path, "w") as f:
        json.dump({"step": step, "guidance": guidance, "results": results}, f, indent=1)
    return path
