"""Denoising probe: how much of a prompt's content the model recovers from x_t at each noise level.

For held-out single-object scenes, noise the real image to ``x_t``, predict ``x0`` in one step and
score it with the analyzer. Read high-t rows with care: at t >= 950 a correct one-step x0 is the
conditional *mean* image, a faint blurred blob in the right cell whose colour is too far from the
palette for the analyzer, so scores there stay near 0 even when the text->layout mapping is learned
(look at the images: ``Sampler`` + ``predict_x0_and_eps``). ``raphael-eval probe --workdir DIR``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raphael_jax.data.shapes.analyzer import score
from raphael_jax.data.shapes.world import example
from raphael_jax.diffusion.schedule import predict_x0_and_eps, q_sample
from raphael_jax.sampling import to_uint8


def denoise_probe(sampler, timesteps=(999, 950, 800, 500, 200), num: int = 64, seed: int = 1234) -> dict:
    cfg = sampler.config
    exs = [example(seed, i, cfg.data.image_size, 1, 1, stream=1) for i in range(num)]
    x0 = jnp.asarray(np.stack([e["image"] for e in exs]), jnp.float32) / 127.5 - 1.0
    tokens, mask = sampler.tokenize([e["caption"] for e in exs])
    model = nnx.merge(sampler.graphdef, sampler.params)
    ctx = model.encode_text(tokens, mask)
    out = {}
    for t in timesteps:
        tt = jnp.full((num,), t)
        noise = jax.random.normal(jax.random.key(seed + t), x0.shape)
        x_t = q_sample(sampler.sched, x0, tt, noise)
        pred = model.unet(x_t, tt, ctx, mask, with_edges=False)
        x0_hat, _ = predict_x0_and_eps(sampler.sched, pred, x_t, tt, cfg.diffusion.prediction)
        res = score(to_uint8(jnp.clip(x0_hat, -1, 1)), [e["objects"] for e in exs])
        out[int(t)] = {k: res[k] for k in ("colour", "place", "kind", "size")}
    return out
