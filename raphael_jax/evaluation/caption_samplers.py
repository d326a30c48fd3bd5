"""Text-to-image samplers for caption-driven evaluation (:mod:`raphael_jax.evaluation.coco_fid`).

A :class:`CaptionSampler` is anything with ``sample_batch(prompts, indices) -> uint8 [N, H, W, 3]``;
``indices`` are the captions' global indices, so per-image noise can be keyed by them and the result
does not depend on batching, hosts or devices. :func:`make_sampler` builds one from a spec:
``workdir:DIR`` (a RAPHAEL run, EMA weights, through :class:`RaphaelSampler`), ``noise`` (uniform
noise images, :class:`NoiseSampler`: a smoke test) or ``py:MODULE:FACTORY`` (``FACTORY(factory_args)``
returns any sampler; ``raphael-eval coco-fid`` passes its parsed command-line arguments).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["CaptionSampler", "NoiseSampler", "RaphaelSampler", "make_sampler"]


class CaptionSampler(Protocol):
    def sample_batch(self, prompts: Sequence[str], indices: np.ndarray) -> np.ndarray:
        """uint8 images [N, H, W, 3] for ``prompts``; ``indices`` are their global caption indices
        (for per-image noise that does not depend on batching)."""


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
    """A :class:`raphael_jax.sampling.Sampler` (DDIM + CFG on the EMA weights; for latent runs the CLIP text
    states and the VAE decode) with per-caption-index initial noise ``normal(fold_in(key(seed), i))``.

    :meth:`raphael_jax.sampling.Sampler.generate` does the work: the batch is sharded over the sampler's
    devices, images come back as uint8 at ``height`` x ``width`` (default: the run's default size).
    """

    def __init__(
        self,
        sampler,
        seed: int = 0,
        guidance: float | None = None,
        num_steps: int | None = None,
        eta: float | None = None,
        height: int | None = None,
        width: int | None = None,
    ):
        self.sampler, self.seed = sampler, seed
        sc = sampler.config.sample
        self.guidance = sc.guidance if guidance is None else guidance
        self.num_steps = num_steps or sc.num_steps
        self.eta = sc.eta if eta is None else eta
        self.height, self.width = sampler.check_size(height, width)

    def sample_batch(self, prompts, indices):
        from raphael_jax.sampling import to_uint8

        images = self.sampler.generate(list(prompts), np.asarray(indices), seed=self.seed, height=self.height,
                                       width=self.width, num_steps=self.num_steps, guidance=self.guidance,
                                       eta=self.eta)
        return to_uint8(images)


def make_sampler(
    spec: str,
    *,
    image_size: int = 256,
    seed: int = 0,
    guidance: float | None = None,
    num_steps: int | None = None,
    factory_args: Any = None,
    height: int | None = None,
    width: int | None = None,
    clip_dir: str | None = None,
    vae_dir: str | None = None,
    tokenizer_dir: str | None = None,
) -> CaptionSampler:
    """``workdir:DIR`` | ``noise`` | ``py:MODULE:FACTORY`` (see the module docstring).

    Args:
      spec: the sampler spec.
      image_size: side of the ``noise`` sampler's images.
      seed: noise seed (``noise``, ``workdir:``).
      guidance, num_steps: CFG weight and DDIM steps of a ``workdir:`` run (None: the run's config).
      factory_args: the one argument of a ``py:`` factory.
      height, width: generation size of a ``workdir:`` run (None: the run's default size).
      clip_dir, vae_dir, tokenizer_dir: a latent ``workdir:`` run's encoders, when not where it recorded them.
    """
    if spec == "noise":
        return NoiseSampler(image_size, seed)
    if spec.startswith("workdir:"):
        from raphael_jax.sampling import Sampler
        from raphael_jax.train.checkpoint import load_run

        run = load_run(spec[len("workdir:") :], weights="ema")
        return RaphaelSampler(
            Sampler.from_run(run, clip_dir=clip_dir, vae_dir=vae_dir, tokenizer_dir=tokenizer_dir),
            seed=seed,
            guidance=guidance,
            num_steps=num_steps,
            height=height,
            width=width,
        )
    if spec.startswith("py:"):
        module, _, factory = spec[3:].rpartition(":")
        if not module:
            raise ValueError(f"--sampler py:MODULE:FACTORY, got {spec!r}")
        return getattr(importlib.import_module(module), factory)(factory_args)
    raise ValueError(f"unknown --sampler {spec!r}: expected workdir:DIR, noise or py:MODULE:FACTORY")
