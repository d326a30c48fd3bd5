"""COCO zero-shot FID-30k (the paper, Table 1): 30k val2014 captions -> images -> FID.

Protocol (the paper gives only "256x256, 30k random val captions"; the rest is ours, as usual):

1. Captions: ``captions_val2014.json`` (or tfds ``coco_captions``) sorted by image id and
   annotation id; with ``seed`` (default 0) draw ``num`` (30000) distinct images and one caption of
   each (``--any-caption``: 30000 distinct captions, several per image possible). The draw is the
   same on every host and every run.
2. Generation: every host takes its contiguous slice of the drawn captions; its sampler shards each
   batch over the host's local devices. Image ``i`` starts from noise keyed by (sample seed, i), so
   the result does not depend on the number of hosts or devices. Images are resized to 256x256
   (PIL bicubic) and, with ``--out``, saved as ``OUT/images/{i:05d}.png``; a re-run skips the
   images already there (resume after preemption).
3. FID: pool3 features of the FID Inception (:mod:`raphael_jax.evaluation.inception`) of all
   hosts' images are gathered; their statistics are compared with the reference statistics:
   ``--ref-stats FILE.npz`` if it exists, else computed from the val2014 images (square center crop,
   256x256 PIL bicubic, then the network's own 299 resize) and written to ``--ref-stats``.
   ``--ref-images drawn`` uses only the drawn captions' images instead of the whole folder.
4. Optionally (``--clip-model DIR``) the mean CLIP score of the same images against their captions.

Captions: :mod:`raphael_jax.evaluation.coco_captions`. Samplers (``--sampler``,
:mod:`raphael_jax.evaluation.caption_samplers`): ``workdir:DIR`` (a RAPHAEL run, EMA weights, through
``RaphaelSampler``), ``noise`` (uniform noise images: a smoke test), or ``py:MODULE:FACTORY``
(``FACTORY(args)`` returns any object with ``sample_batch(prompts, indices) -> uint8 [N,H,W,3]``).

Command (one host; see launch/eval_coco_fid30k.sh for pods and docs/EVALUATION.md)::

    raphael-eval coco-fid --sampler workdir:runs/raphael \\
        --annotations coco/annotations/captions_val2014.json --coco-images coco/val2014 \\
        --ref-stats coco/fid_stats_val2014_256.npz --inception-weights weights/fid_inception.safetensors \\
        --out runs/raphael/eval/coco_fid30k
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from raphael_jax.evaluation.caption_samplers import CaptionSampler
from raphael_jax.evaluation.coco_captions import host_slice
from raphael_jax.evaluation.fid import (
    FeatureExtractor,
    allgather_rows,
    feature_statistics,
    folder_statistics,
    frechet_distance,
    load_stats,
    save_stats,
    tfds_statistics,
)

__all__ = ["evaluate_coco_fid", "generate_features", "log", "reference_statistics"]


# ------------------------------------------------------------------------------------- generation


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def log(msg: str) -> None:
    """``msg`` to stderr, on host 0 only."""
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def generate_features(
    sampler: CaptionSampler,
    captions: Sequence[str],
    indices: np.ndarray,
    extract: FeatureExtractor,
    *,
    batch_size: int = 50,
    image_size: int = 256,
    image_dir: str | Path | None = None,
    clip_scorer=None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (and CLIP scores) of the images of ``captions[indices]``, generated in batches.

    With ``image_dir``, each image is written as ``{i:05d}.png`` and images already there are read
    instead of generated.
    """
    image_dir = Path(image_dir) if image_dir is not None else None
    if image_dir is not None:
        image_dir.mkdir(parents=True, exist_ok=True)
    feats, scores, t0 = [], [], time.time()
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        images: list[np.ndarray | None] = [None] * len(idx)
        if image_dir is not None:
            for j, i in enumerate(idx):
                path = image_dir / f"{i:05d}.png"
                if path.is_file():
                    with Image.open(path) as im:
                        images[j] = np.asarray(im.convert("RGB"))
        todo = [j for j, im in enumerate(images) if im is None]
        if todo:
            new = _resize(
                np.asarray(sampler.sample_batch([captions[idx[j]] for j in todo], idx[todo])), image_size
            )
            for j, im in zip(todo, new):
                images[j] = im
                if image_dir is not None:
                    from raphael_jax.sampling import save_png

                    save_png(
                        im, str(image_dir / f"{idx[j]:05d}.png"), captions[idx[j]], {"index": int(idx[j])}
                    )
        batch = np.stack(images)
        feats.append(extract(batch))
        if clip_scorer is not None:
            scores.append(clip_scorer.scores(batch, [captions[i] for i in idx]))
        done = start + len(idx)
        rate = done / max(time.time() - t0, 1e-9)
        log(
            f"host {jax.process_index()}: {done}/{len(indices)} images ({rate:.2f}/s, "
            f"ETA {(len(indices) - done) / max(rate, 1e-9) / 60:.1f} min)"
        )
    dim = extract.dim or 0
    f = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
    if clip_scorer is None:
        return f, None
    return f, np.concatenate(scores) if scores else np.zeros(0)


def evaluate_coco_fid(
    sampler: CaptionSampler,
    drawn: Sequence[dict],
    extract: FeatureExtractor,
    ref_stats: tuple[np.ndarray, np.ndarray],
    *,
    batch_size: int = 50,
    image_size: int = 256,
    out_dir: str | Path | None = None,
    clip_scorer=None,
) -> dict[str, Any]:
    """FID of ``sampler`` on the drawn captions against ``ref_stats``; every host must call it."""
    captions = [e["caption"] for e in drawn]
    mine = host_slice(len(captions))
    image_dir = Path(out_dir) / "images" if out_dir is not None else None
    feats, scores = generate_features(
        sampler,
        captions,
        mine,
        extract,
        batch_size=batch_size,
        image_size=image_size,
        image_dir=image_dir,
        clip_scorer=clip_scorer,
    )
    feats = allgather_rows(feats)
    mu, sigma = feature_statistics(feats)
    result: dict[str, Any] = {
        "fid": frechet_distance(mu, sigma, *ref_stats),
        "num_images": int(len(feats)),
        "image_size": image_size,
        "num_hosts": jax.process_count(),
        "num_devices": jax.device_count(),
    }
    if scores is not None:
        result["clip_score"] = float(allgather_rows(scores[:, None].astype(np.float32))[:, 0].mean())
    if out_dir is not None and jax.process_index() == 0:
        save_stats(Path(out_dir) / "generated_stats.npz", mu, sigma, len(feats))
    return result


def reference_statistics(
    extract: FeatureExtractor,
    drawn: Sequence[dict],
    *,
    ref_stats: str | Path | None = None,
    coco_images: str | Path | None = None,
    ref_images: str = "all",
    ref_max_images: int | None = None,
    tfds: str | None = None,
    tfds_data_dir: str | None = None,
    image_size: int = 256,
    batch_size: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference ``(mu, sigma)``: ``ref_stats`` when that file exists; else computed from the
    ``coco_images`` folder (``ref_images="drawn"``: only the drawn captions' images) or the tfds
    ``NAME[:SPLIT]`` split, square center-cropped and resized to ``image_size``, and written to
    ``ref_stats`` if given (by host 0). Every host must call it."""
    if ref_stats and Path(ref_stats).is_file():
        log(f"reference statistics: {ref_stats}")
        return load_stats(ref_stats)
    kw = dict(size=image_size, center_crop=True, batch_size=batch_size)
    if coco_images:
        files = None
        if ref_images == "drawn":
            files = sorted({Path(coco_images) / e["file_name"] for e in drawn})
        log(f"computing reference statistics of {coco_images} ({ref_images} images)")
        mu, sigma, n = folder_statistics(coco_images, extract, files=files, max_images=ref_max_images, **kw)
        source = coco_images
    elif tfds:
        name, _, split = tfds.partition(":")
        mu, sigma, n = tfds_statistics(
            name,
            extract,
            split=split or "val",
            data_dir=tfds_data_dir,
            max_images=ref_max_images,
            **kw,
        )
        source = tfds
    else:
        raise ValueError("no reference: give --ref-stats FILE.npz (existing), --coco-images DIR or --tfds")
    if ref_stats and jax.process_index() == 0:
        save_stats(
            ref_stats,
            mu,
            sigma,
            n,
            source=str(source),
            size=image_size,
            center_crop=True,
            images=ref_images,
        )
        log(f"wrote {ref_stats} ({n} images)")
    return mu, sigma
