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

import jax
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


def make_sampler(
    spec: str,
    *,
    image_size: int = 256,
    seed: int = 0,
    guidance: float | None = None,
    num_steps: int | None = None,
    factory_args: Any = None,
) -> CaptionSampler:
    """``workdir:DIR`` | ``noise`` | ``py:MODULE:FACTORY`` (see the module docstring).

    Args:
      spec: the sampler spec.
      image_size: side of the ``noise`` sampler's images.
      seed: noise seed (``noise``, ``workdir:``).
      guidance, num_steps: CFG weight and DDIM steps of a ``workdir:`` run (None: the run's config).
      factory_args: the one argument of a ``py:`` factory.
    """
    if spec == "noise":
        return NoiseSampler(image_size, seed)
    if spec.startswith("workdir:"):
        from raphael_jax.sampling import Sampler
        from raphael_jax.train.checkpoint import load_run

        return RaphaelSampler(
            Sampler.from_run(load_run(spec[len("workdir:") :])),
            seed=seed,
            guidance=guidance,
            num_steps=num_steps,
        )
    if spec.startswith("py:"):
        module, _, factory = spec[3:].rpartition(":")
        if not module:
            raise ValueError(f"--sampler py:MODULE:FACTORY, got {spec!r}")
        return getattr(importlib.import_module(module), factory)(factory_args)
    raise ValueError(f"unknown --sampler {spec!r}: expected workdir:DIR, noise or py:MODULE:FACTORY")
