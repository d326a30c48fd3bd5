"""Sampling from a trained run: DDIM with classifier-free guidance on the EMA parameters.

One :class:`Sampler` serves pixel runs (the shapes world, its own small text encoder) and latent runs
(frozen CLIP text states as trained, noise at the latent size of the requested bucket, VAE decode):
``Sampler.from_run(load_run(workdir))`` (``raphael_jax.train.checkpoint.load_run``) samples the
checkpoint's EMA weights with the run's config; for latent runs it loads the CLIP text tower,
tokenizer and VAE recorded in the run's ``encoders.json`` (``clip_dir`` / ``vae_dir`` /
``tokenizer_dir`` override the recorded locations when the weights moved). ``sample(prompts)``
returns uint8 images; ``save_png`` writes them with the prompt and settings in the PNG's text
metadata. The CLI (``raphael-sample``), the notebook, the trainer's previews, COCO FID-30k and the
path analysis all use it.

Placement: a :class:`~raphael_jax.parallel.rules.ShardingPlan` (by default one over the local
devices, ``fsdp`` = their number) shards every batch over its batch axes; the weights are
replicated, or sharded by their logical axes (FSDP, ``shard_params=True``) when they do not fit one
device. This module imports nothing from ``raphael_jax.train`` (the trainer's previews use it).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, PngImagePlugin

from raphael_jax.diffusion.ddim import ddim_sample
from raphael_jax.diffusion.schedule import NoiseSchedule
from raphael_jax.models.routing import pop_intermediates
from raphael_jax.parallel.mesh import make_mesh
from raphael_jax.parallel.rules import ShardingPlan
from raphael_jax.parallel.sharding import tree_shardings

__all__ = ["ClipText", "LatentDecoder", "Sampler", "ddim_options", "image_grid", "is_latent", "local_plan",
           "save_png", "to_uint8"]


def subject_words(config, subject=None) -> tuple[str, ...]:
    """The new kind a fine-tuning run (``data.kind="subject"``) or adapter (its ``subject`` metadata) taught."""
    from raphael_jax.data.shapes.world import NEW_KINDS

    kind = (subject or {}).get("kind") if subject is not None else (
        config.data.subject.kind if config.data.kind == "subject" else None)
    return (kind,) if kind in NEW_KINDS else ()


def is_latent(config) -> bool:
    """Whether the run diffuses VAE latents (precomputed, ``data.kind = "latents"``) rather than pixels."""
    return config.data.kind == "latents"


def clip_x0_value(config) -> float | None:
    """The |x0| bound of ``sample.clip_x0`` (-1: 1 for pixel runs, none for latent runs; 0: none)."""
    v = float(config.sample.clip_x0)
    if v < 0:
        v = 0.0 if is_latent(config) else 1.0
    return v or None


def ddim_options(config) -> dict:
    """The DDIM keyword arguments a run's ``sample`` config selects (shared by every sampling path).

    ``clip_x0``: pixel runs clip x0_hat to [-1, 1]; latent runs do not clip (scaled latents are not
    bounded by 1; ``sample.clip_x0``). ``use_clipped_model_output`` re-derives eps from the clipped x0
    (diffusers' option of that name). With v-prediction, a near-zero terminal SNR and guidance, the raw
    eps carries the unclipped guided x0 into x_{t-1} and samples drift off the prompt (README
    "Results": the tiny run, 200 prompts, guidance 3, colour 0.085 with the raw eps and 0.960 with the
    re-derived one).
    """
    sc = config.sample
    return {"clip_x0": clip_x0_value(config), "timestep_spacing": sc.timestep_spacing,
            "use_clipped_model_output": bool(sc.use_clipped_model_output),
            "guidance_rescale": float(sc.guidance_rescale)}


def to_uint8(x) -> np.ndarray:
    return np.asarray(jnp.clip((jnp.asarray(x) + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


def local_plan(config, devices=None) -> ShardingPlan:
    """A plan over this host's devices: one ``fsdp`` axis of all of them (batch and, with FSDP, weights
    sharded over it), the run's logical-axis rules."""
    devices = list(devices or jax.local_devices())
    return ShardingPlan.from_config(config, make_mesh({"fsdp": len(devices)}, devices))


def unet_downsampling(config) -> int:
    """How many input pixels one position of the U-Net's coarsest level covers per side."""
    return int(config.model.patch_size) * 2 ** (len(config.model.channels) - 1)


class ClipText:
    """A frozen CLIP text tower with its tokenizer, giving the text states a latent run was trained on
    (layer ``text_layer`` at ``max_len`` tokens, :func:`raphael_jax.models.clip_text.text_states`, the same
    function the precompute pass ran)."""

    def __init__(self, model, config, tokenizer, text_layer="last", max_len: int = 77):
        from raphael_jax.models.clip_text import check_text_layer, text_states

        self.config, self.tokenizer, self.max_len = config, tokenizer, int(max_len)
        self.text_layer = check_text_layer(text_layer)
        if config.max_position_embeddings < self.max_len:
            raise ValueError(f"the CLIP text tower has {config.max_position_embeddings} positions, the run "
                             f"was trained on {self.max_len} tokens")
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the CLIP tower only "
                             f"{config.vocab_size}: use the tokenizer that belongs to it")
        graphdef, self.state = nnx.split(model)
        layer = self.text_layer
        self._fn = jax.jit(lambda state, ids: text_states(nnx.merge(graphdef, state), ids, layer))

    @classmethod
    def load(cls, clip_dir, tokenizer_dir=None, text_layer="last", max_len: int = 77, hint: str = "") -> ClipText:
        """From a transformers folder (or ``raphael-convert clip`` output) and a ``vocab.json`` + ``merges.txt``
        folder (default: ``clip_dir``)."""
        from raphael_jax.convert.frozen import load_clip
        from raphael_jax.data.real.clip_tokenizer import load_clip_tokenizer

        model, config = load_clip(clip_dir, hint)
        tok_dir = tokenizer_dir or clip_dir
        try:
            tokenizer = load_clip_tokenizer(tok_dir)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"no CLIP tokenizer (vocab.json, merges.txt) in {str(tok_dir)!r}{hint}: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return cls(model, config, tokenizer, text_layer, max_len)

    @property
    def width(self) -> int:
        return int(self.config.hidden_size)

    def tokenize(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.tokenizer.encode(list(prompts), self.max_len)
        return ids.astype(np.int32), mask.astype(bool)

    def __call__(self, state, ids):
        return self._fn(state, ids)

    def piece(self, token_id: int) -> str:
        return self.tokenizer.id_to_piece(int(token_id))


class LatentDecoder:
    """Scaled diffusion latents -> images in [-1, 1] through the VAE decoder: ``decode(z / scaling + shift)``
    with the scaling the latents were made with. Latents with a side above ``tile`` latent pixels are
    decoded in tiles (:func:`raphael_jax.models.vae_tiling.decode_tiled`: equal to the untiled decode,
    lower peak memory); ``tile = 0`` never tiles."""

    def __init__(self, vae, scaling_factor: float | None = None, shift_factor: float | None = None, tile: int = 128):
        self.vae = vae
        self.scaling_factor = float(vae.scaling_factor if scaling_factor is None else scaling_factor)
        self.shift_factor = float(vae.shift_factor if shift_factor is None else (shift_factor or 0.0))
        self.tile = int(tile)
        self.factor = int(vae.config.downsample_factor)
        self.latent_channels = int(vae.config.latent_channels)
        graphdef, self.state = nnx.split(vae)
        scale, shift = self.scaling_factor, self.shift_factor
        self._fn = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z / scale + shift))

    @classmethod
    def load(cls, vae_dir, scaling_factor=None, shift_factor=None, tile: int = 128, hint: str = "") -> LatentDecoder:
        from raphael_jax.convert.frozen import load_vae

        vae, _ = load_vae(vae_dir, hint)
        return cls(vae, scaling_factor, shift_factor, tile)

    def __call__(self, z, state=None) -> jax.Array | np.ndarray:
        """Images [B, f*h, f*w, 3] in about [-1, 1] of scaled latents ``z`` [B, h, w, C]."""
        h, w = z.shape[1:3]
        if self.tile and (h > self.tile or w > self.tile):
            from raphael_jax.models.vae_tiling import decode_tiled

            zz = np.asarray(_host(z), np.float32) / self.scaling_factor + self.shift_factor
            return decode_tiled(self.vae, zz, tile=self.tile)
        return self._fn(self.state if state is None else state, z)


@functools.lru_cache(maxsize=16)
def _noise_fn(shape, sharding):
    """jit(vmap(i -> normal(fold_in(base, i), shape))) per (shape, sharding): compiled once."""
    return jax.jit(jax.vmap(lambda base, i: jax.random.normal(jax.random.fold_in(base, i), shape), in_axes=(None, 0)),
                   out_shardings=sharding)


def _host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a full numpy array on every host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class Sampler:
    """The one sampler every caller uses: text encoding as trained, DDIM + classifier-free guidance, and
    for latent runs the VAE decode.

    Args:
      config, graphdef, params: the run (``params``: the model's weights, EMA for sampling).
      tokenizer: the shapes world's tokenizer (``text.kind = "small"``); None for external text.
      step: the checkpoint step (for metadata).
      text: the frozen CLIP text side (:class:`ClipText`) of ``text.kind = "external"`` runs.
      decoder: the VAE (:class:`LatentDecoder`) of latent runs.
      buckets: pixel sizes [h, w] the run trained on (latent runs; the default size is the most square).
      plan: where arrays live (default :func:`local_plan`); batches are sharded over its batch axes.
      shard_params: shard the weights by their logical axes over ``plan`` (FSDP) instead of replicating.

    Callers that need their own batching or recorded outputs (COCO FID-30k, path analysis) use the
    public steps: :meth:`tokenize`, :meth:`encode_tokens` / :meth:`encode`, :meth:`noise`,
    :meth:`guided_sample`, :meth:`decode`, or :meth:`generate` (all of it for given global indices).
    """

    def __init__(self, config, graphdef, params, tokenizer=None, step: int = -1, *, text: ClipText | None = None,
                 decoder: LatentDecoder | None = None, buckets=None, plan: ShardingPlan | None = None,
                 shard_params: bool = False):
        self.step = step
        self.config = config
        self.graphdef = graphdef
        self.tokenizer = tokenizer
        # words expected outside the shapes tokenizer's vocabulary: a fine-tuned subject's name (<unk>)
        self.new_words: tuple[str, ...] = subject_words(config)
        self.text = text
        self.decoder = decoder
        self.latent = is_latent(config)
        self.buckets = [tuple(int(s) for s in hw) for hw in (buckets or [])]
        self.sched = NoiseSchedule.create(config.diffusion.schedule, config.diffusion.num_timesteps)
        if config.text.kind == "external":
            if text is None:
                raise ValueError("this run reads CLIP text states: pass text=ClipText(...) (Sampler.from_run "
                                 "loads the CLIP tower recorded in the run's encoders.json)")
            if text.width != config.model.context_dim:
                raise ValueError(f"the CLIP text tower is {text.width} wide but the run was trained on "
                                 f"{config.model.context_dim}-wide text states (model.context_dim)")
        elif tokenizer is None:
            raise ValueError("this run has its own text encoder: pass its tokenizer")
        if self.latent:
            if decoder is None:
                raise ValueError("this run diffuses VAE latents: pass decoder=LatentDecoder(...) (Sampler.from_run "
                                 "loads the VAE recorded in the run's encoders.json)")
            if decoder.latent_channels != config.model.in_channels:
                raise ValueError(f"the VAE has {decoder.latent_channels} latent channels but the run was trained "
                                 f"on {config.model.in_channels} (model.in_channels)")
        self.plan = plan or local_plan(config)
        self.shard_params = bool(shard_params)
        self.params = self.place(params)
        if text is not None:
            text.state = jax.device_put(text.state, self.plan.replicated())
        if decoder is not None:
            decoder.state = jax.device_put(decoder.state, self.plan.replicated())
        gd = graphdef

        def denoise(p, x, t, ctx):
            model = nnx.merge(gd, p)
            return model.unet(x, t, ctx["context"], ctx["mask"], with_edges=False)

        def encode(p, tokens, mask):
            return nnx.merge(gd, p).encode_text(tokens, mask)

        self.denoise = denoise  # static argument of ddim_sample: one callable, one compiled loop
        self.control = None     # (graphdef, params) of a ControlNet: set_control
        self._encode = jax.jit(encode)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_run(cls, run, use_ema: bool = True, *, clip_dir=None, vae_dir=None, tokenizer_dir=None,
                 plan: ShardingPlan | None = None, shard_params: bool = False) -> Sampler:
        """A sampler of a restored run (``raphael_jax.train.checkpoint.Run``): EMA weights by default.

        Latent runs load their CLIP text tower, tokenizer and VAE from the locations in the run's
        ``encoders.json``; ``clip_dir`` / ``vae_dir`` / ``tokenizer_dir`` replace them (the tokenizer
        defaults to ``clip_dir`` when that is given).
        """
        params = run.ema_params if use_ema else run.params
        if params is None:
            raise ValueError(f"{run.workdir}: the {'EMA' if use_ema else 'raw'} weights were not restored")
        config, rec = run.config, dict(getattr(run, "encoders", None) or {})
        text = decoder = None
        if config.text.kind == "external" or is_latent(config):
            if not rec and not (clip_dir and vae_dir):
                raise FileNotFoundError(f"{run.workdir} has no encoders.json (the record of its CLIP and VAE); "
                                        "pass the CLIP and VAE folders it was trained with (--clip, --vae)")
            hint = " (moved? pass --clip DIR)"
            text = ClipText.load(clip_dir or rec.get("clip"),
                                 tokenizer_dir or (clip_dir if clip_dir else rec.get("tokenizer")),
                                 rec.get("text_layer", config.data.text_layer),
                                 rec.get("max_len", config.text.max_len),
                                 hint=hint if not clip_dir else "")
            decoder = LatentDecoder.load(vae_dir or rec.get("vae"), rec.get("scaling_factor"),
                                         rec.get("shift_factor"), tile=config.sample.vae_tile,
                                         hint=" (moved? pass --vae DIR)" if not vae_dir else "")
            if rec.get("vae_factor") not in (None, decoder.factor):
                raise ValueError(f"the VAE downsamples by {decoder.factor}, the run was trained on latents of a "
                                 f"factor-{rec['vae_factor']} VAE")
        sampler = cls(config, run.graphdef, params, run.tokenizer, run.step, text=text, decoder=decoder,
                      buckets=rec.get("buckets"), plan=plan, shard_params=shard_params)
        if getattr(run, "control", None) is not None:
            sampler.set_control(*run.control)
        return sampler

    def set_control(self, graphdef, params, scale: float | None = None) -> None:
        """Condition on control images (``sample(..., hint=...)``) through a ControlNet
        (raphael_jax/models/controlnet.py) with ``params``, at ``scale`` (default ``control.scale``)."""
        from raphael_jax.models.controlnet import controlled_unet_apply

        gd = self.graphdef
        self.control = (graphdef, self.place(params))
        self.control_scale = float(self.config.control.scale if scale is None else scale)

        def denoise(p, x, t, ctx):
            model, cn = nnx.merge(gd, p["model"]), nnx.merge(graphdef, p["control"])
            return controlled_unet_apply(model.unet, cn, x, t, ctx["context"], ctx["mask"], ctx["hint"], p["scale"],
                                         with_edges=False)

        self._control_denoise = denoise

    def place(self, params):
        """``params`` replicated over the plan's devices, or (``shard_params``) sharded by their logical axes."""
        if self.shard_params:
            return jax.device_put(params, tree_shardings(params, self.plan))
        return jax.device_put(params, self.plan.replicated())

    # ------------------------------------------------------------------------------ sizes and batches
    @property
    def factor(self) -> int:
        """Pixels per model input position per side: the VAE factor (latent runs) or 1."""
        return self.decoder.factor if self.decoder is not None else 1

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels: ``data.image_size`` squared for pixel runs; for latent runs the most
        square trained bucket (the largest of equals)."""
        if self.latent and self.buckets:
            return min(self.buckets, key=lambda hw: (abs(np.log(hw[0] / hw[1])), -hw[0] * hw[1]))
        s = int(self.config.data.image_size) * self.factor
        return (s, s)

    def check_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width) in pixels, defaults filled in; ValueError (one line) unless both are divisible by
        the VAE factor times the U-Net's downsampling."""
        dh, dw = self.default_size()
        height, width = dh if height is None else int(height), dw if width is None else int(width)
        unit = self.factor * unet_downsampling(self.config)
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % unit:
                why = (f"the VAE factor {self.factor} x the U-Net's downsampling {unit // self.factor}"
                       if self.factor > 1 else "the U-Net's downsampling")
                lo = max(unit, v // unit * unit)
                raise ValueError(f"{name} {v} is not a positive multiple of {unit} ({why}); try {lo} or {lo + unit}")
        return height, width

    def image_shape(self, n: int, height: int | None = None, width: int | None = None) -> tuple[int, int, int, int]:
        """Shape of the model's input for ``n`` images of ``height`` x ``width`` pixels (latents for latent runs)."""
        height, width = self.check_size(height, width)
        f = self.factor
        return (n, height // f, width // f, int(self.config.model.in_channels))

    def initial_noise(self, key: jax.Array, n: int, height: int | None = None, width: int | None = None) -> jax.Array:
        return jax.random.normal(key, self.image_shape(n, height, width))

    def noise(self, seed: int, indices, height: int | None = None, width: int | None = None) -> jax.Array:
        """Initial noise, image ``i`` drawn from ``fold_in(key(seed), indices[i])`` (so an image does not depend
        on its batch), sharded over the plan's batch axes."""
        shape = self.image_shape(1, height, width)[1:]
        idx = self.put_batch(np.asarray(indices, np.uint32))
        return _noise_fn(shape, self.plan.batch_sharding())(jax.random.key(seed), idx)

    @property
    def batch_multiple(self) -> int:
        return self.plan.axis_size(self.plan.batch_axes())

    def put_batch(self, x) -> jax.Array:
        """A host array [B, ...] (the same on every host) as a global array sharded over the batch axes (replicated
        when B does not divide over them; :meth:`generate` pads its batches so they do)."""
        x = np.asarray(x)
        divides = x.shape[0] % self.batch_multiple == 0
        sharding = self.plan.batch_sharding(x.shape[0]) if divides else self.plan.replicated()  # odd sizes: whole
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    # ------------------------------------------------------------------------------ text
    def tokenize(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 [N, L], mask bool [N, L]) of ``prompts`` as the run was trained on them."""
        if self.text is not None:
            return self.text.tokenize(prompts)
        tokens, mask = self.tokenizer.encode(list(prompts), self.config.text.max_len, self.new_words)
        return np.asarray(tokens, np.int32), np.asarray(mask, bool)

    def encode_tokens(self, tokens, mask, params=None) -> dict:
        """Text states ``{"context": [N, L, D], "mask": [N, L]}`` as the denoiser was trained on them."""
        tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
        if self.text is not None:
            return {"context": self.text(self.text.state, tokens), "mask": mask}
        return {"context": self._encode(self.params if params is None else params, tokens, mask), "mask": mask}

    def encode(self, prompts) -> dict:
        """:meth:`encode_tokens` of :meth:`tokenize`, sharded over the batch axes."""
        return self.encode_tokens(*map(self.put_batch, self.tokenize(prompts)))

    def piece(self, token_id: int) -> str:
        """The text of one token id (for labelling per-token outputs such as region masks)."""
        if self.text is not None:
            return self.text.piece(token_id)
        return self.tokenizer.id_to_piece(int(token_id))

    # ------------------------------------------------------------------------------ sampling
    def guided_sample(self, x_T, cond: dict, uncond: dict | None, *, num_steps: int | None = None,
                      guidance: float | None = None, eta: float | None = None, key: jax.Array | None = None,
                      params=None, denoise_fn=None, **ddim_kwargs):
        """DDIM with classifier-free guidance from ``x_T`` with the run's ``sample`` settings.

        ``num_steps``/``guidance``/``eta`` default to the config's. ``denoise_fn(params, x, t, ctx)``
        replaces the plain denoiser (e.g. one that also returns recorded routes, with
        ``has_aux=True`` in ``ddim_kwargs``); ``ddim_kwargs`` go to ``ddim_sample``
        (``return_trajectory``, ``has_aux``). Returns what ``ddim_sample`` returns (model-space x0).
        """
        sc = self.config.sample
        opts = {**ddim_options(self.config), **ddim_kwargs}
        return ddim_sample(denoise_fn or self.denoise, self.sched, x_T, cond, uncond,
                           num_steps=num_steps or sc.num_steps, guidance=sc.guidance if guidance is None else guidance,
                           eta=sc.eta if eta is None else eta, prediction=self.config.diffusion.prediction,
                           key=key, params=self.params if params is None else params, **opts)

    def decode(self, x0) -> jax.Array | np.ndarray:
        """Model-space samples -> images in about [-1, 1] (the VAE decode for latent runs)."""
        return x0 if self.decoder is None else self.decoder(x0)

    def generate(self, prompts, indices, *, seed: int = 0, height: int | None = None, width: int | None = None,
                 num_steps: int | None = None, guidance: float | None = None, eta: float | None = None,
                 return_latents: bool = False, hint=None, control_scale: float | None = None):
        """Images in [-1, 1] (numpy [N, H, W, 3]) of one batch of ``prompts``; image ``i`` starts from noise keyed by
        ``(seed, indices[i])``. The batch is padded to a multiple of the batch axes and sharded over them.
        With ``return_latents`` also the model-space samples (numpy). ``hint`` [N, H, W, 1]: control images
        for the ControlNet of :meth:`set_control` (both halves of the guidance batch see them), at
        ``control_scale`` (default the one set)."""
        prompts = list(prompts)
        n = len(prompts)
        pad = -n % self.batch_multiple
        idx = np.concatenate([np.asarray(indices, np.int64), np.zeros(pad, np.int64)])
        x_T = self.noise(seed, idx, height, width)
        cond = self.encode(prompts + [""] * pad)
        uncond = self.encode([""] * (n + pad))
        key = jax.random.fold_in(jax.random.key(seed + 1), int(idx[0]) if n else 0)  # eta > 0 only
        extra = {}
        if hint is not None:
            if self.control is None:
                raise ValueError("a control image needs a ControlNet run (raphael-train with control.enabled=True)")
            hint = np.asarray(hint, np.float32)
            if hint.ndim != 4 or hint.shape[0] != n:
                raise ValueError(f"hint: expected [{n}, H, W, C] control images, got shape {hint.shape}")
            h = self.put_batch(np.concatenate([hint, np.zeros((pad, *hint.shape[1:]), np.float32)]))
            cond, uncond = {**cond, "hint": h}, {**uncond, "hint": h}
            scale = self.control_scale if control_scale is None else control_scale
            extra = {"denoise_fn": self._control_denoise,
                     "params": {"model": self.params, "control": self.control[1], "scale": jnp.float32(scale)}}
        x0 = self.guided_sample(x_T, cond, uncond, num_steps=num_steps, guidance=guidance, eta=eta, key=key, **extra)
        images = _host(self.decode(x0))[:n]
        return (images, _host(x0)[:n]) if return_latents else images

    def sample(self, prompts, seed: int = 0, num_steps: int | None = None, guidance: float | None = None,
               eta: float | None = None, batch_size: int = 100, height: int | None = None,
               width: int | None = None, return_latents: bool = False, hint=None, control_scale: float | None = None):
        """uint8 images [N, H, W, 3] for ``prompts`` (classifier-free guidance against the empty prompt).

        Image ``i`` starts from noise keyed by ``(seed, i)``: the same prompt list gives the same images
        whatever ``batch_size`` and device count. ``height`` / ``width`` in pixels (default
        :meth:`default_size`). With ``return_latents`` also the model-space samples. ``hint``: one control
        image per prompt ([N, H, W, 1], or [H, W, 1] for all) for a ControlNet run (:meth:`generate`).
        """
        prompts = list(prompts)
        self.check_size(height, width)
        if hint is not None:
            hint = np.asarray(hint, np.float32)
            hint = np.broadcast_to(hint, (len(prompts), *hint.shape)) if hint.ndim == 3 else hint
        out, lat = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            images, x0 = self.generate(chunk, np.arange(start, start + len(chunk)), seed=seed, height=height,
                                       width=width, num_steps=num_steps, guidance=guidance, eta=eta,
                                       return_latents=True,
                                       hint=None if hint is None else hint[start:start + len(chunk)],
                                       control_scale=control_scale)
            out.append(to_uint8(images))
            lat.append(x0)
        images = np.concatenate(out) if out else np.zeros((0, *self.check_size(height, width), 3), np.uint8)
        return (images, np.concatenate(lat)) if return_latents else images

    def settings(self, *, seed: int, guidance: float | None = None, num_steps: int | None = None,
                 eta: float | None = None, height: int | None = None, width: int | None = None) -> dict:
        """The sampling settings of an image, as written into its PNG metadata."""
        sc = self.config.sample
        height, width = self.check_size(height, width)
        return {"guidance": sc.guidance if guidance is None else guidance, "steps": num_steps or sc.num_steps,
                "eta": sc.eta if eta is None else eta, "seed": seed, "height": height, "width": width,
                "sampler": "ddim", "timestep_spacing": sc.timestep_spacing, "clip_x0": clip_x0_value(self.config),
                "step": self.step}

    def routing(self, prompts, t: int = 250, seed: int = 0, image: jax.Array | None = None) -> dict:
        """One forward pass at timestep ``t`` recording routes, region masks and attention maps.

        Noises ``image`` (model space: latents for latent runs; default zeros at the default size) to
        ``t`` and returns ``pop_intermediates`` of the U-Net: ``space_route`` per layer [B, L],
        ``region_masks`` [B, n_x, L], ``cross_attention``, ``time_route``..., plus ``tokens``, ``mask``
        and ``input_hw`` (the model input's height and width).
        """
        from raphael_jax.diffusion.schedule import q_sample

        tokens, mask = self.tokenize(prompts)
        n = len(prompts)
        x0 = jnp.asarray(image) if image is not None else jnp.zeros(self.image_shape(n))
        x_t = q_sample(self.sched, x0, jnp.full((n,), t), jax.random.normal(jax.random.key(seed), x0.shape))
        ctx = self.encode_tokens(tokens, mask)["context"]
        model = nnx.merge(self.graphdef, self.params)
        model.unet(x_t, jnp.full((n,), t), ctx, jnp.asarray(mask), record_masks=True, with_edges=False)
        inter = pop_intermediates(model)
        inter["tokens"] = np.asarray(tokens)
        inter["mask"] = np.asarray(mask)
        inter["input_hw"] = tuple(int(s) for s in x0.shape[1:3])
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
