"""Sampling from a trained run: DDIM with classifier-free guidance on the EMA parameters.

``Sampler.from_run(load_run(workdir))`` samples the latest checkpoint's EMA weights with its config
and tokenizer; ``sample(prompts)`` returns uint8 images; ``save_png`` writes them with the prompt in
the PNG's text metadata. This module imports nothing from ``raphael_jax.train`` (the trainer's
previews use it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, PngImagePlugin

from raphael_jax.data.shapes.tokenizer import Tokenizer
from raphael_jax.diffusion.ddim import ddim_sample
from raphael_jax.diffusion.schedule import NoiseSchedule
from raphael_jax.models.routing import pop_intermediates


def ddim_options(config) -> dict:
    """The DDIM keyword arguments a run's ``sample`` config selects (shared by every sampling path).

    ``use_clipped_model_output`` re-derives eps from the clipped x0 (diffusers' option of that name).
    With v-prediction, a near-zero terminal SNR and guidance, the raw eps carries the unclipped guided
    x0 into x_{t-1} and samples drift off the prompt (README "Results": the tiny run, 200 prompts,
    guidance 3, colour 0.085 with the raw eps and 0.960 with the re-derived one).
    """
    sc = config.sample
    return {"clip_x0": 1.0, "timestep_spacing": sc.timestep_spacing,
            "use_clipped_model_output": bool(sc.use_clipped_model_output),
            "guidance_rescale": float(sc.guidance_rescale)}


def to_uint8(x) -> np.ndarray:
    return np.asarray(jnp.clip((x + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


class Sampler:
    """The one sampler every caller uses: text encoding as trained, DDIM + classifier-free guidance.

    ``Sampler.from_run(load_run(workdir))`` (``raphael_jax.train.checkpoint.load_run``) samples a
    trained run's EMA weights. Callers that need their own batching, sharding or recorded outputs
    (COCO FID-30k, path analysis) use the public steps: :meth:`tokenize`, :meth:`encode_tokens` /
    :meth:`encode`, :meth:`initial_noise` and :meth:`guided_sample`.
    """

    def __init__(self, config, graphdef, params, tokenizer: Tokenizer, step: int = -1):
        self.step = step
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.tokenizer = tokenizer
        self.sched = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.num_timesteps)
        gd = graphdef

        def denoise(p, x, t, ctx):
            model = nnx.merge(gd, p)
            return model.unet(x, t, ctx["context"], ctx["mask"], with_edges=False)

        def encode(p, tokens, mask):
            return nnx.merge(gd, p).encode_text(tokens, mask)

        self.denoise = denoise  # static argument of ddim_sample: one callable, one compiled loop
        self._encode = jax.jit(encode)

    @classmethod
    def from_run(cls, run, use_ema: bool = True) -> Sampler:
        """A sampler of a restored run (``raphael_jax.train.checkpoint.Run``): EMA weights by default."""
        return cls(run.config, run.graphdef, run.ema_params if use_ema else run.params, run.tokenizer, run.step)

    def tokenize(self, prompts) -> tuple[jax.Array, jax.Array]:
        """(tokens int32 [N, L], mask bool [N, L]) of ``prompts`` at the run's ``text.max_len``."""
        tokens, mask = self.tokenizer.encode(list(prompts), self.config.text.max_len)
        return jnp.asarray(tokens), jnp.asarray(mask)

    def encode_tokens(self, tokens, mask, params=None) -> dict:
        """Text states ``{"context": [N, L, D], "mask": [N, L]}`` as the denoiser was trained on them."""
        return {"context": self._encode(self.params if params is None else params, tokens, mask), "mask": mask}

    def encode(self, prompts) -> dict:
        """:meth:`encode_tokens` of :meth:`tokenize`."""
        return self.encode_tokens(*self.tokenize(prompts))

    def image_shape(self, n: int) -> tuple[int, int, int, int]:
        size = self.config.data.image_size
        return (n, size, size, self.config.model.in_channels)

    def initial_noise(self, key: jax.Array, n: int) -> jax.Array:
        return jax.random.normal(key, self.image_shape(n))

    def guided_sample(self, x_T, cond: dict, uncond: dict | None, *, num_steps: int | None = None,
                      guidance: float | None = None, eta: float | None = None, key: jax.Array | None = None,
                      params=None, denoise_fn=None, **ddim_kwargs):
        """DDIM with classifier-free guidance from ``x_T`` with the run's ``sample`` settings.

        ``num_steps``/``guidance``/``eta`` default to the config's. ``denoise_fn(params, x, t, ctx)``
        replaces the plain denoiser (e.g. one that also returns recorded routes, with
        ``has_aux=True`` in ``ddim_kwargs``); ``ddim_kwargs`` go to ``ddim_sample``
        (``return_trajectory``, ``has_aux``). Returns what ``ddim_sample`` returns.
        """
        sc = self.config.sample
        opts = {**ddim_options(self.config), **ddim_kwargs}
        return ddim_sample(denoise_fn or self.denoise, self.sched, x_T, cond, uncond,
                           num_steps=num_steps or sc.num_steps, guidance=sc.guidance if guidance is None else guidance,
                           eta=sc.eta if eta is None else eta, prediction=self.config.diffusion.prediction,
                           key=key, params=self.params if params is None else params, **opts)

    def sample(self, prompts, seed: int = 0, num_steps: int | None = None, guidance: float | None = None,
               eta: float | None = None, batch_size: int = 100):
        """uint8 images [N, H, W, C] for ``prompts`` (classifier-free guidance against the empty prompt)."""
        out = []
        prompts = list(prompts)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            n = len(chunk)
            key = jax.random.fold_in(jax.random.key(seed), start)
            k_init, k_eta = jax.random.split(key)
            x0 = self.guided_sample(self.initial_noise(k_init, n), self.encode(chunk), self.encode([""] * n),
                                    num_steps=num_steps, guidance=guidance, eta=eta, key=k_eta)
            out.append(to_uint8(x0))
        return np.concatenate(out)

    def routing(self, prompts, t: int = 250, seed: int = 0, image: jax.Array | None = None) -> dict:
        """One forward pass at timestep ``t`` recording routes, region masks and attention maps.

        Noises ``image`` (or pure noise) to ``t`` and returns ``pop_intermediates`` of the U-Net:
        ``space_route`` per layer [B, L], ``region_masks`` [B, n_x, L], ``cross_attention``, ``time_route``...
        """
        from raphael_jax.diffusion.schedule import q_sample

        tokens, mask = self.tokenize(prompts)
        n = len(prompts)
        x0 = image if image is not None else jnp.zeros(self.image_shape(n))
        x_t = q_sample(self.sched, x0, jnp.full((n,), t), self.initial_noise(jax.random.key(seed), n))
        model = nnx.merge(self.graphdef, self.params)
        ctx = model.encode_text(tokens, mask)
        model.unet(x_t, jnp.full((n,), t), ctx, mask, record_masks=True, with_edges=False)
        inter = pop_intermediates(model)
        inter["tokens"] = np.asarray(tokens)
        inter["mask"] = np.asarray(mask)
        return inter


def save_png(image: np.ndarray, path: str, prompt: str, extra: dict | None = None) -> None:
    """Write ``image`` (uint8 HWC) to ``path`` with the prompt (and ``extra`` fields) as PNG text chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", prompt)
    for k, v in (extra or {}).items():
        info.add_text(str(k), str(v))
    Image.fromarray(image).save(path, pnginfo=info)


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 64, np.uint8)
    for i, im in enumerate(images):
        r, cc = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + cc * (w + pad): pad + cc * (w + pad) + w] = im
    return grid
