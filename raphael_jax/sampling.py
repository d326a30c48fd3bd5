"""Sampling from a trained run: DDIM with classifier-free guidance on the EMA parameters.

``Sampler.from_workdir(workdir)`` restores the latest checkpoint's EMA weights, config and
tokenizer; ``sample(prompts)`` returns uint8 images; ``save_png`` writes them with the prompt in
the PNG's text metadata.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, PngImagePlugin

from raphael_jax.data.tokenizer import Tokenizer
from raphael_jax.diffusion.ddim import ddim_sample
from raphael_jax.diffusion.schedule import NoiseSchedule
from raphael_jax.models.raphael import RaphaelModel
from raphael_jax.models.routing import pop_intermediates

TOKENIZER_FILE = "tokenizer.model"


def ddim_options(config) -> dict:
    """The DDIM keyword arguments a run's ``sample`` config selects (shared by every sampling path).

    ``use_clipped_model_output`` re-derives eps from the clipped x0 (diffusers' option of that name).
    With v-prediction, a near-zero terminal SNR and guidance, the raw eps carries the unclipped guided
    x0 into x_{t-1} and samples drift off the prompt (README "Results": the tiny run, 200 prompts,
    guidance 3, colour 0.085 with the raw eps and 0.960 with the re-derived one).
    """
    sc = config.sample
    return {"clip_x0": 1.0, "timestep_spacing": sc.timestep_spacing,
            "use_clipped_model_output": bool(sc.get("use_clipped_model_output", True)),
            "guidance_rescale": float(sc.get("guidance_rescale", 0.0))}


def to_uint8(x) -> np.ndarray:
    return np.asarray(jnp.clip((x + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


class Sampler:
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

        self._denoise = denoise
        self._encode = jax.jit(encode)

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, use_ema: bool = True) -> Sampler:
        from raphael_jax.train.checkpoint import RunCheckpoints
        from raphael_jax.train.step import init_state, make_optimizer, split_model

        ckpts = RunCheckpoints(workdir, async_save=False)
        if ckpts.latest_step() is None:
            raise FileNotFoundError(f"{workdir} holds no checkpoint (train first: raphael-train --workdir {workdir})")
        config = ckpts.restore_config(step)
        tok_path = os.path.join(workdir, TOKENIZER_FILE)
        tokenizer = Tokenizer.load(tok_path)
        # abstract model only (no random init): the checkpoint supplies every value
        graphdef, params = split_model(nnx.eval_shape(lambda: RaphaelModel(config, rngs=nnx.Rngs(config.seed))))
        abstract = jax.eval_shape(lambda p: init_state(config, graphdef, p, make_optimizer(config)), params)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
        state, _ = ckpts.restore(abstract, step)
        ckpts.close()
        return cls(config, graphdef, state["ema_params" if use_ema else "params"], tokenizer, int(state["step"]))

    def encode_prompts(self, prompts):
        tokens, mask = self.tokenizer.encode(list(prompts), self.config.text.max_len)
        return jnp.asarray(tokens), jnp.asarray(mask)

    def sample(self, prompts, seed: int = 0, num_steps: int | None = None, guidance: float | None = None,
               eta: float | None = None, batch_size: int = 100, return_trajectory: bool = False):
        """uint8 images [N, H, W, C] for ``prompts`` (classifier-free guidance against the empty prompt)."""
        sc = self.config.sample
        num_steps = num_steps or sc.num_steps
        guidance = sc.guidance if guidance is None else guidance
        eta = sc.eta if eta is None else eta
        out = []
        prompts = list(prompts)
        size = self.config.data.image_size
        channels = self.config.model.in_channels
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            n = len(chunk)
            tokens, mask = self.encode_prompts(chunk)
            empty_tok, empty_mask = self.encode_prompts([""] * n)
            cond = {"context": self._encode(self.params, tokens, mask), "mask": mask}
            uncond = {"context": self._encode(self.params, empty_tok, empty_mask), "mask": empty_mask}
            key = jax.random.fold_in(jax.random.key(seed), start)
            k_init, k_eta = jax.random.split(key)
            x_T = jax.random.normal(k_init, (n, size, size, channels))
            x0 = ddim_sample(self._denoise, self.sched, x_T, cond, uncond, num_steps=num_steps, guidance=guidance,
                             eta=eta, prediction=self.config.diffusion.prediction, key=k_eta,
                             params=self.params, **ddim_options(self.config))
            out.append(to_uint8(x0))
        return np.concatenate(out)

    def routing(self, prompts, t: int = 250, seed: int = 0, image: jax.Array | None = None) -> dict:
        """One forward pass at timestep ``t`` recording routes, region masks and attention maps.

        Noises ``image`` (or pure noise) to ``t`` and returns ``pop_intermediates`` of the U-Net:
        ``space_route`` per layer [B, L], ``region_masks`` [B, n_x, L], ``cross_attention``, ``time_route``...
        """
        from raphael_jax.diffusion.schedule import q_sample

        tokens, mask = self.encode_prompts(prompts)
        n = len(prompts)
        size, ch = self.config.data.image_size, self.config.model.in_channels
        key = jax.random.key(seed)
        x0 = image if image is not None else jnp.zeros((n, size, size, ch))
        x_t = q_sample(self.sched, x0, jnp.full((n,), t), jax.random.normal(key, (n, size, size, ch)))
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
