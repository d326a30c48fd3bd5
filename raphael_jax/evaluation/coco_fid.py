"""COCO zero-shot FID-30k (PAPER.md section 8, Table 1): 30k val2014 captions -> images -> FID.

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

Samplers (``--sampler``): ``workdir:DIR`` (a RAPHAEL run, EMA weights, through
:class:`RaphaelSampler`), ``noise`` (uniform noise images: a smoke test), or ``py:MODULE:FACTORY``
(``FACTORY(args)`` returns any object with ``sample_batch(prompts, indices) -> uint8 [N,H,W,3]``).

Command (one host; see launch/eval_coco_fid30k.sh for pods and docs/EVALUATION.md)::

    python -m raphael_jax.evaluation.coco_fid --sampler workdir:runs/raphael \\
        --annotations coco/annotations/captions_val2014.json --coco-images coco/val2014 \\
        --ref-stats coco/fid_stats_val2014_256.npz --inception-weights weights/fid_inception.safetensors \\
        --out runs/raphael/eval/coco_fid30k
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from PIL import Image

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

__all__ = [
    "CaptionSampler",
    "NoiseSampler",
    "RaphaelSampler",
    "draw_captions",
    "evaluate_coco_fid",
    "generate_features",
    "host_slice",
    "load_coco_captions",
    "load_coco_captions_tfds",
    "main",
]


class CaptionSampler(Protocol):
    def sample_batch(self, prompts: Sequence[str], indices: np.ndarray) -> np.ndarray:
        """uint8 images [N, H, W, 3] for ``prompts``; ``indices`` are their global caption indices
        (for per-image noise that does not depend on batching)."""


# ------------------------------------------------------------------------------------- captions


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


# -------------------------------------------------------------------------------------- samplers


class NoiseSampler:
    """Uniform noise images (seeded by caption index): a smoke test and a worst-case FID."""

    def __init__(self, size: int = 256, seed: int = 0):
        self.size, self.seed = size, seed

    def sample_batch(self, prompts, indices):
        return np.stack(
            [
                np.random.default_rng([self.seed, int(i)]).integers(
                    0, 256, (self.size, self.size, 3), dtype=np.uint8
                )
                for i in indices
            ]
        )


class RaphaelSampler:
    """A :class:`raphael_jax.sampling.Sampler` (DDIM + CFG on the EMA weights) sharded over the
    local devices, with per-caption-index initial noise ``normal(fold_in(key(seed), i))``.

    Uses the Sampler's public steps (same encoder, guided loop and config defaults as ``Sampler.sample``)
    with its own noise keys and the batch sharded over the devices (weights replicated).
    """

    def __init__(
        self,
        sampler,
        seed: int = 0,
        guidance: float | None = None,
        num_steps: int | None = None,
        eta: float | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        import jax.numpy as jnp

        self.sampler, self.seed = sampler, seed
        sc = sampler.config.sample
        self.guidance = sc.guidance if guidance is None else guidance
        self.num_steps = num_steps or sc.num_steps
        self.eta = sc.eta if eta is None else eta
        self.devices = list(devices or jax.local_devices())
        mesh = jax.sharding.Mesh(np.array(self.devices), ("batch",))
        self._data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        self._params = jax.device_put(
            sampler.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        )
        size, ch = sampler.config.data.image_size, sampler.config.model.in_channels
        base = jax.random.key(seed)
        self._noise = jax.jit(
            jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), (size, size, ch), jnp.float32)),
            out_shardings=self._data,
        )

    def sample_batch(self, prompts, indices):
        from raphael_jax.sampling import to_uint8

        s, n = self.sampler, len(prompts)
        pad = -n % len(self.devices)
        prompts = list(prompts) + [""] * pad
        idx = np.concatenate([np.asarray(indices, np.int32), np.zeros(pad, np.int32)])
        put = lambda a: jax.device_put(np.asarray(a), self._data)
        tokens, mask = map(put, s.tokenize(prompts))
        empty_tok, empty_mask = map(put, s.tokenize([""] * len(prompts)))
        cond = s.encode_tokens(tokens, mask, params=self._params)
        uncond = s.encode_tokens(empty_tok, empty_mask, params=self._params)
        key = jax.random.fold_in(jax.random.key(self.seed + 1), int(idx[0]))
        x0 = s.guided_sample(self._noise(put(idx)), cond, uncond, num_steps=self.num_steps, guidance=self.guidance,
                             eta=self.eta, key=key, params=self._params)
        return to_uint8(x0)[:n]


def make_sampler(spec: str, args: argparse.Namespace) -> CaptionSampler:
    """``workdir:DIR`` | ``noise`` | ``py:MODULE:FACTORY`` (see the module docstring)."""
    if spec == "noise":
        return NoiseSampler(args.image_size, args.sample_seed)
    if spec.startswith("workdir:"):
        from raphael_jax.sampling import Sampler
        from raphael_jax.train.checkpoint import load_run

        return RaphaelSampler(
            Sampler.from_run(load_run(spec[len("workdir:") :])),
            seed=args.sample_seed,
            guidance=args.guidance,
            num_steps=args.steps,
        )
    if spec.startswith("py:"):
        module, _, factory = spec[3:].rpartition(":")
        if not module:
            raise ValueError(f"--sampler py:MODULE:FACTORY, got {spec!r}")
        return getattr(importlib.import_module(module), factory)(args)
    raise ValueError(f"unknown --sampler {spec!r}: expected workdir:DIR, noise or py:MODULE:FACTORY")


# ------------------------------------------------------------------------------------- generation


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def _log(msg: str) -> None:
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
        _log(
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


def reference_statistics(args, extract: FeatureExtractor, drawn: Sequence[dict]):
    """``--ref-stats`` when it exists; else computed (and written to ``--ref-stats`` if given)."""
    if args.ref_stats and Path(args.ref_stats).is_file():
        _log(f"reference statistics: {args.ref_stats}")
        return load_stats(args.ref_stats)
    kw = dict(size=args.image_size, center_crop=True, batch_size=args.fid_batch_size)
    if args.coco_images:
        files = None
        if args.ref_images == "drawn":
            files = sorted({Path(args.coco_images) / e["file_name"] for e in drawn})
        _log(f"computing reference statistics of {args.coco_images} ({args.ref_images} images)")
        mu, sigma, n = folder_statistics(
            args.coco_images, extract, files=files, max_images=args.ref_max_images, **kw
        )
        source = args.coco_images
    elif args.tfds:
        name, _, split = args.tfds.partition(":")
        mu, sigma, n = tfds_statistics(
            name,
            extract,
            split=split or "val",
            data_dir=args.tfds_data_dir,
            max_images=args.ref_max_images,
            **kw,
        )
        source = args.tfds
    else:
        raise SystemExit(
            "error: no reference: give --ref-stats FILE.npz (existing), --coco-images DIR or --tfds"
        )
    if args.ref_stats and jax.process_index() == 0:
        save_stats(
            args.ref_stats,
            mu,
            sigma,
            n,
            source=str(source),
            size=args.image_size,
            center_crop=True,
            images=args.ref_images,
        )
        _log(f"wrote {args.ref_stats} ({n} images)")
    return mu, sigma


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raphael_jax.evaluation.coco_fid",
        description="COCO zero-shot FID-30k of a text-to-image sampler.",
    )
    src = p.add_argument_group("captions and reference")
    src.add_argument("--annotations", help="captions_val2014.json")
    src.add_argument(
        "--tfds", help="tfds NAME[:SPLIT] for captions (and reference images), e.g. coco_captions:val"
    )
    src.add_argument("--tfds-data-dir", default=None)
    src.add_argument("--coco-images", help="folder of the val2014 images (reference statistics)")
    src.add_argument(
        "--ref-stats", help="reference statistics .npz: read if it exists, else computed and written"
    )
    src.add_argument(
        "--ref-images",
        choices=["all", "drawn"],
        default="all",
        help="reference statistics over the whole folder or only the drawn captions' images",
    )
    src.add_argument("--ref-max-images", type=int, default=None)
    src.add_argument("--num", type=int, default=30000, help="number of captions / images")
    src.add_argument("--seed", type=int, default=0, help="caption draw seed")
    src.add_argument("--any-caption", action="store_true", help="draw captions, not images (repeats allowed)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--sampler", default=None, help="workdir:DIR | noise | py:MODULE:FACTORY")
    gen.add_argument("--workdir", default=None, help="shorthand for --sampler workdir:DIR")
    gen.add_argument("--guidance", type=float, default=None)
    gen.add_argument("--steps", type=int, default=None, help="DDIM steps")
    gen.add_argument("--sample-seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=50, help="images per sampler call, per host")
    gen.add_argument("--image-size", type=int, default=256)
    ev = p.add_argument_group("metrics")
    ev.add_argument("--inception-weights", required=True, help="FID Inception safetensors")
    ev.add_argument("--inception-channel-divisor", type=int, default=1, help=argparse.SUPPRESS)  # tests only
    ev.add_argument("--fid-batch-size", type=int, default=50)
    ev.add_argument(
        "--clip-model", default=None, help="transformers CLIPModel directory: also report CLIP score"
    )
    p.add_argument("--out", default=None, help="directory for images/, generated_stats.npz and fid.json")
    return p


def main(argv: list[str] | None = None) -> int:
    from raphael_jax.evaluation.inception import InceptionConfig, load_inception
    from raphael_jax.parallel.distributed import maybe_initialize

    args = build_parser().parse_args(argv)
    if args.workdir and not args.sampler:
        args.sampler = f"workdir:{args.workdir}"
    if not args.sampler:
        raise SystemExit("error: give --sampler (or --workdir)")
    if not (args.annotations or args.tfds):
        raise SystemExit("error: give --annotations captions_val2014.json or --tfds coco_captions:val")
    maybe_initialize()
    t0 = time.time()
    entries = (
        load_coco_captions(args.annotations)
        if args.annotations
        else load_coco_captions_tfds(*(args.tfds.partition(":")[::2]), data_dir=args.tfds_data_dir)
    )
    drawn = draw_captions(entries, args.num, args.seed, one_per_image=not args.any_caption)
    _log(
        f"{len(drawn)} captions drawn (seed {args.seed}) from {len(entries)}; "
        f"{jax.process_count()} host(s), {jax.device_count()} device(s)"
    )
    net = load_inception(
        args.inception_weights, InceptionConfig(channel_divisor=args.inception_channel_divisor)
    )
    extract = FeatureExtractor(net, args.fid_batch_size)
    ref = reference_statistics(args, extract, drawn)
    sampler = make_sampler(args.sampler, args)
    scorer = None
    if args.clip_model:
        from raphael_jax.evaluation.clip_score import ClipScorer

        scorer = ClipScorer.from_pretrained(args.clip_model)
    if args.out and jax.process_index() == 0:
        os.makedirs(args.out, exist_ok=True)
        (Path(args.out) / "captions.json").write_text(json.dumps(drawn))
    result = evaluate_coco_fid(
        sampler,
        drawn,
        extract,
        ref,
        batch_size=args.batch_size,
        image_size=args.image_size,
        out_dir=args.out,
        clip_scorer=scorer,
    )
    result.update(
        sampler=args.sampler,
        caption_seed=args.seed,
        sample_seed=args.sample_seed,
        guidance=args.guidance,
        steps=args.steps,
        seconds=time.time() - t0,
        inception_weights=str(args.inception_weights),
    )
    if jax.process_index() == 0:
        line = f"FID-{len(drawn)}: {result['fid']:.4f}"
        if "clip_score" in result:
            line += f"  CLIP score: {result['clip_score']:.3f}"
        print(line, flush=True)
        if args.out:
            (Path(args.out) / "fid.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
