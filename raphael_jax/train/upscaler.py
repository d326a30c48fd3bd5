"""Training the upscaler (the paper's "tailor-made" SR-GAN, App. 7.8) with Real-ESRGAN's recipe.

Real-ESRGAN (Wang et al., 2021) trains an RRDBNet generator in two stages, and so does this trainer:

1. **Real-ESRNet** (``train.pixel_steps`` steps): L1 loss alone, Adam(0.9, 0.99) at ``train.lr_g``.
2. **Real-ESRGAN** (the remaining steps): ``l1 |G(x) - y| + perceptual VGG(G(x), y) + gan BCE(D(G(x)), 1)``
   with weights ``loss.l1 / perceptual / gan`` (1, 1, 0.1 in the original), the generator at
   ``lr_g / 2`` (1e-4 against Real-ESRNet's 2e-4), alternating with the discriminator's step,
   ``BCE(D(y), 1) + BCE(D(G(x)), 0)`` at ``train.lr_d``. The discriminator is the U-Net with
   spectral normalisation (``raphael_jax/models/sr_discriminator.py``) giving per-pixel logits; its
   power-iteration vectors advance on every training-mode forward pass, as PyTorch's.

The pairs: HR images are shapes-world scenes (stream 0, ``data.hr_size`` px), the LR inputs come from
Real-ESRGAN's high-order degradation (``raphael_jax/data/degrade.py``) or a clean bicubic downscale
(``data.degradation="clean"``). Batch ``k`` is a function of (``data.seed``, ``k``) alone, so a
resumed run sees exactly the batches an uninterrupted one would. The generator's EMA (``train.ema``,
0.999 as the original, warmed up: :func:`ema_decay`) is what is exported and evaluated.

Like ``raphael-train`` (``raphael_jax/train/loop.py``) the run lives in a workdir: orbax checkpoints
through :class:`raphael_jax.train.checkpoint.RunCheckpoints` (asynchronous, atomic, damaged ones moved
aside), resumed by running the same command again; a different config is refused naming the keys
(those in :data:`SAFE_ON_RESUME` may change); ``metrics.jsonl`` + TensorBoard; and the EMA generator in
Real-ESRGAN's own layout at ``<workdir>/generator.safetensors`` after every checkpoint (read by
``raphael-upscale --weights``, ``raphael-sample --upscale`` and basicsr). ``train.init_from`` starts
from any RRDBNet safetensors (converted public weights: fine-tuning).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from raphael_jax.convert.esrgan import load_rrdbnet, save_rrdbnet
from raphael_jax.data.degrade import CLEAN, DegradeConfig, degrade_batch
from raphael_jax.data.shapes.world import example
from raphael_jax.models.rrdbnet import RRDBNet, RRDBNetConfig
from raphael_jax.models.sr_discriminator import SpectralState, UNetDiscriminatorConfig, UNetDiscriminatorSN
from raphael_jax.models.upscale_tiling import to_uint8
from raphael_jax.train.autoencoder import psnr

__all__ = ["GENERATOR_FILE", "SAFE_ON_RESUME", "UpscalerTrainer", "ema_decay", "hr_batch", "make_perceptual",
           "train_upscaler", "training_pairs", "validate_config"]

GENERATOR_FILE = "generator.safetensors"
SAFE_ON_RESUME = ("train.num_steps", "train.log_every", "train.checkpoint_every", "train.max_to_keep",
                  "train.init_from", "eval.")
VALIDATION_STREAM = 1  # validation scenes: shapes world stream 1 (training reads stream 0)


# --------------------------------------------------------------------------------------------- config

def validate_config(c: ml_collections.ConfigDict) -> None:
    """ValueError with one line naming the first bad key of an upscaler config."""
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ValueError(f"config {key}={_get(c, key)!r}: {what}")

    RRDBNetConfig(**c.model.to_dict()).validate()
    UNetDiscriminatorConfig(num_feat=c.disc.num_feat, skip_connection=c.disc.skip_connection).validate()
    need(c.model.scale in (2, 4), "model.scale", "the trainer supports x2 and x4")
    need(isinstance(c.data.hr_size, int) and c.data.hr_size >= 32, "data.hr_size", "must be an int >= 32")
    need(c.data.hr_size % 8 == 0, "data.hr_size",
         "must be divisible by 8 (the discriminator halves it three times; the input is hr_size / scale)")
    need(1 <= c.data.min_objects <= c.data.max_objects <= 9, "data.min_objects",
         "need 1 <= min_objects <= max_objects <= 9")
    need(c.data.degradation in ("realesrgan", "clean"), "data.degradation", "must be 'realesrgan' or 'clean'")
    for k in ("l1", "perceptual", "gan"):
        need(c.loss[k] >= 0, f"loss.{k}", "must be >= 0")
    _perceptual_spec(c.loss.perceptual_net)
    need(c.train.num_steps >= 1, "train.num_steps", "must be >= 1")
    need(0 <= c.train.pixel_steps, "train.pixel_steps", "must be >= 0")
    need(c.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(c.train.lr_g > 0 and c.train.lr_d > 0, "train.lr_g", "learning rates must be positive")
    need(0 <= c.train.ema < 1, "train.ema", "must be in [0, 1)")
    for k in ("log_every", "checkpoint_every", "max_to_keep"):
        need(c.train[k] >= 1, f"train.{k}", "must be >= 1")
    need(c.eval.num >= 1, "eval.num", "must be >= 1")


def _get(c, key: str):
    node = c
    for p in key.split("."):
        node = node[p]
    return node


def _perceptual_spec(spec: str) -> tuple[str, str | None, int]:
    """``"vgg19:PATH[:DIV]"`` / ``"random:DIV"`` / ``"none"`` -> (kind, path, width divisor)."""
    kind, _, rest = str(spec).partition(":")
    try:
        if kind == "none":
            return "none", None, 1
        if kind == "random":
            return "random", None, int(rest or 1)
        if kind == "vgg19" and rest:
            path, _, div = rest.rpartition(":") if rest.rpartition(":")[2].isdigit() else (rest, "", "1")
            return "vgg19", path, int(div)
    except ValueError:
        pass
    raise ValueError(f"config loss.perceptual_net={spec!r}: expected 'vgg19:PATH[:DIVISOR]' (torchvision VGG19 "
                     "weights in safetensors), 'random:DIVISOR' (a frozen random VGG19, a stand-in) or 'none'")


def make_perceptual(spec: str, seed: int = 0):
    """The frozen perceptual network of ``loss.perceptual_net`` (None for ``"none"``)."""
    from raphael_jax.models import vgg

    kind, path, div = _perceptual_spec(spec)
    if kind == "none":
        return None
    if kind == "random":
        return vgg.random_vgg19(seed, width_divisor=div)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config loss.perceptual_net: no VGG19 weights file {path}")
    from raphael_jax.convert.sr_weights import load_vgg19

    return load_vgg19(path, width_divisor=div)


# ----------------------------------------------------------------------------------------------- data

def hr_batch(c, step: int) -> np.ndarray:
    """The HR images of batch ``step``: shapes-world scenes ``step * B .. step * B + B - 1`` (uint8 [B, S, S, 3])."""
    b = c.train.batch_size
    return np.stack([example(c.data.seed, step * b + i, c.data.hr_size, c.data.min_objects, c.data.max_objects)
                     ["image"] for i in range(b)])


def training_pairs(c, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(LR float32 [B, S/s, S/s, 3], HR float32 [B, S, S, 3]) in [0, 1] of batch ``step``; deterministic in it."""
    hr = hr_batch(c, step)
    rng = np.random.default_rng([int(c.data.seed), int(step), 7])
    cfg = DegradeConfig() if c.data.degradation == "realesrgan" else CLEAN
    lr = degrade_batch(hr, c.model.scale, rng, cfg)
    return lr.astype(np.float32), hr.astype(np.float32) / 255.0


def validation_set(c) -> tuple[np.ndarray, np.ndarray]:
    """(LR clean bicubic inputs, HR uint8) of ``eval.num`` validation scenes (stream 1, ``eval.seed``)."""
    hr = np.stack([example(c.eval.seed, i, c.data.hr_size, c.data.min_objects, c.data.max_objects,
                           stream=VALIDATION_STREAM)["image"] for i in range(c.eval.num)])
    lr = degrade_batch(hr, c.model.scale, np.random.default_rng(0), CLEAN)
    return lr, hr


# --------------------------------------------------------------------------------------------- steps

def ema_decay(step, decay: float):
    """The EMA decay at ``step``: ``min(decay, (1 + step) / (10 + step))``.

    Real-ESRGAN keeps a 0.999 EMA over 400k iterations; over a run of a thousand steps a constant 0.999
    would still hold 0.999^1000 = 37% of the random initialisation at the end. The warm-up (the schedule
    of diffusers' ``EMAModel`` with ``use_ema_warmup=False``) starts the average near the live weights and
    reaches ``decay`` after ``(10 decay - 1) / (1 - decay)`` steps (8,990 for 0.999).
    """
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _bce_logits(logits: jax.Array, target: float) -> jax.Array:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


@dataclasses.dataclass
class UpscalerTrainer:
    """The models' graph definitions, optimizers and jitted steps of one config."""

    config: Any
    g_def: Any
    d_def: Any
    vgg: Any  # (graphdef, params) of the perceptual network, or None

    def __post_init__(self):
        c = self.config
        self.opt_pixel = optax.adam(c.train.lr_g, b1=0.9, b2=0.99)
        self.opt_g = optax.adam(c.train.lr_g / 2, b1=0.9, b2=0.99)
        self.opt_d = optax.adam(c.train.lr_d, b1=0.9, b2=0.99)
        self.pixel_step = jax.jit(self._pixel_step, donate_argnums=0)
        self.gan_step = jax.jit(self._gan_step, donate_argnums=0)
        self.generate = jax.jit(lambda p, x: nnx.merge(self.g_def, p)(x))

    def init_state(self, g_params, d_params, d_sn) -> dict:
        """The train state: generator (+ EMA, both optimizers' moments), discriminator (+ spectral vectors)."""
        return {"g": g_params, "g_ema": jax.tree.map(jnp.copy, g_params), "d": d_params, "d_sn": d_sn,
                "opt_pixel": self.opt_pixel.init(g_params), "opt_g": self.opt_g.init(g_params),
                "opt_d": self.opt_d.init(d_params), "step": jnp.zeros((), jnp.int32)}

    def _ema(self, ema, params, step):
        d = ema_decay(step, self.config.train.ema)
        return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)

    def _pixel_step(self, state, lr, hr):
        def loss_fn(g):
            return jnp.mean(jnp.abs(nnx.merge(self.g_def, g)(lr) - hr))

        l1, grads = jax.value_and_grad(loss_fn)(state["g"])
        updates, opt = self.opt_pixel.update(grads, state["opt_pixel"], state["g"])
        g = optax.apply_updates(state["g"], updates)
        new = {**state, "g": g, "g_ema": self._ema(state["g_ema"], g, state["step"]), "opt_pixel": opt,
               "step": state["step"] + 1}
        return new, {"l1": l1, "loss_g": l1 * self.config.loss.l1}

    def _disc(self, d, d_sn, x):
        """Per-pixel logits of the discriminator in training mode and its advanced spectral vectors."""
        fresh = jax.tree.map(lambda x: x, (d, d_sn))  # Variables of this trace level (the vectors are written)
        model = nnx.merge(self.d_def, *fresh)
        logits = model(x, update_stats=True)
        return logits, nnx.state(model, SpectralState)

    def _perceptual(self, sr, hr):
        from raphael_jax.models.vgg import perceptual_loss

        if self.vgg is None or self.config.loss.perceptual == 0:
            return jnp.zeros(())
        return perceptual_loss(nnx.merge(*self.vgg), sr, hr)

    def _gan_step(self, state, lr, hr):
        w = self.config.loss

        def g_loss_fn(g):
            sr = nnx.merge(self.g_def, g)(lr)
            l1 = jnp.mean(jnp.abs(sr - hr))
            perc = self._perceptual(sr, hr)
            logits, d_sn = self._disc(jax.lax.stop_gradient(state["d"]), state["d_sn"], sr)
            gan = _bce_logits(logits, 1.0)
            total = w.l1 * l1 + w.perceptual * perc + w.gan * gan
            return total, (sr, d_sn, {"l1": l1, "perceptual": perc, "gan_g": gan, "loss_g": total})

        (_, (sr, d_sn, logs)), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state["g"])
        updates, opt_g = self.opt_g.update(g_grads, state["opt_g"], state["g"])
        g = optax.apply_updates(state["g"], updates)
        sr = jax.lax.stop_gradient(sr)

        def d_loss_fn(d):
            real, sn = self._disc(d, d_sn, hr)
            fake, sn = self._disc(d, sn, sr)
            return _bce_logits(real, 1.0) + _bce_logits(fake, 0.0), (sn, jnp.mean(real), jnp.mean(fake))

        (d_loss, (d_sn, real, fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state["d"])
        updates, opt_d = self.opt_d.update(d_grads, state["opt_d"], state["d"])
        d = optax.apply_updates(state["d"], updates)
        new = {**state, "g": g, "g_ema": self._ema(state["g_ema"], g, state["step"]), "opt_g": opt_g, "d": d,
               "d_sn": d_sn, "opt_d": opt_d, "step": state["step"] + 1}
        return new, {**logs, "loss_d": d_loss, "d_real_logit": real, "d_fake_logit": fake}


def build(c, *, init_from: str | None = None) -> tuple[UpscalerTrainer, dict]:
    """The trainer and a fresh train state for config ``c`` (``init_from``: RRDBNet weights to start from)."""
    key = jax.random.key(c.train.seed)
    gcfg = RRDBNetConfig(**c.model.to_dict())
    if init_from:
        g = load_rrdbnet(init_from)
        if g.config != gcfg:
            raise ValueError(f"train.init_from {init_from} holds {g.config}, the config asks for {gcfg}: set "
                             "model.* to match it")
    else:
        g = RRDBNet(gcfg, rngs=nnx.Rngs(jax.random.fold_in(key, 0)))
    d = UNetDiscriminatorSN(UNetDiscriminatorConfig(num_feat=c.disc.num_feat, skip_connection=c.disc.skip_connection),
                            rngs=nnx.Rngs(jax.random.fold_in(key, 1)))
    g_def, g_params = nnx.split(g)
    d_def, d_params, d_sn = nnx.split(d, nnx.Param, SpectralState)
    net = make_perceptual(c.loss.perceptual_net, seed=c.train.seed) if c.loss.perceptual > 0 else None
    trainer = UpscalerTrainer(c, g_def, d_def, None if net is None else nnx.split(net))
    return trainer, trainer.init_state(g_params, d_params, d_sn)


# ---------------------------------------------------------------------------------------------- loop

def config_from_saved(saved: dict) -> ml_collections.ConfigDict:
    """An upscaler run's saved config (JSON: lists for tuples), validated."""
    def fix(v):
        return {k: fix(x) for k, x in v.items()} if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v

    config = ml_collections.ConfigDict(fix(dict(saved)))
    validate_config(config)
    return config


def train_upscaler(config, workdir: str, *, steps: int | None = None, allow_config_change: bool = False,
                   log=None) -> dict:
    """Train (or resume) the upscaler in ``workdir``; returns the last logged metrics.

    The same call on the same workdir resumes from its newest intact checkpoint; a config that differs
    outside :data:`SAFE_ON_RESUME` is refused (``ValueError`` naming the keys) unless
    ``allow_config_change``.
    """
    from raphael_jax.train.checkpoint import RunCheckpoints
    from raphael_jax.train.loop import MetricWriter, config_changes

    log = log or functools.partial(print, flush=True)
    validate_config(config)
    c = config
    num_steps = c.train.num_steps if steps is None else int(steps)
    os.makedirs(workdir, exist_ok=True)
    ckpt = RunCheckpoints(workdir, max_to_keep=c.train.max_to_keep, config_from=config_from_saved)
    start = 0
    init_from = c.train.init_from or None
    if ckpt.committed_steps():
        step = ckpt.newest_intact_step()
        unsafe, safe = config_changes(ckpt.restore_config(step), c, SAFE_ON_RESUME)
        if unsafe and not allow_config_change:
            raise ValueError(f"{workdir} was trained with another config ({'; '.join(unsafe)}): use a new "
                             "workdir, or --allow-config-change to accept")
        for line in safe + (unsafe if allow_config_change else []):
            log(f"config change on resume: {line}")
        init_from = None  # the checkpoint has the weights
    trainer, state = build(c, init_from=init_from)
    if ckpt.committed_steps():
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        start, state, _ = ckpt.restore_with_fallback(abstract, step)
        state = jax.tree.map(jnp.asarray, state)
        log(f"resumed {workdir} at step {start}")
    writer = MetricWriter(workdir)
    val_lr, val_hr = validation_set(c)
    t0, last, logs = time.perf_counter(), {}, {}
    timed_from = start
    try:
        for step in range(start, num_steps):
            lr, hr = training_pairs(c, step)
            if step < c.train.pixel_steps:
                state, logs = trainer.pixel_step(state, jnp.asarray(lr), jnp.asarray(hr))
            else:
                state, logs = trainer.gan_step(state, jnp.asarray(lr), jnp.asarray(hr))
            done = step + 1
            if done % c.train.log_every == 0 or done == num_steps:
                last = {k: float(v) for k, v in logs.items()}
                sr = to_uint8(np.asarray(trainer.generate(state["g_ema"], jnp.asarray(val_lr))))
                last["val_psnr"] = psnr(val_hr, sr)
                rate = (done - timed_from) / (time.perf_counter() - t0)
                writer.scalars(done, {**last, "steps_per_s": rate})
                stage = "esrnet" if done <= c.train.pixel_steps else "esrgan"
                log(f"step {done}/{num_steps} [{stage}] " + " ".join(f"{k} {v:.4f}" for k, v in last.items())
                    + f"  {rate:.2f} steps/s  ETA {(num_steps - done) / max(rate, 1e-9):.0f} s")
                if not all(np.isfinite(v) for v in last.values()):
                    raise FloatingPointError(f"step {done}: non-finite losses {last}; the last checkpoint is intact")
            if done % c.train.checkpoint_every == 0 or done == num_steps:
                ckpt.save(done, state, {"step": done}, c)
                _export(trainer, state, workdir)
    finally:
        ckpt.close()
        writer.close()
    with open(os.path.join(workdir, "train_summary.json"), "w") as f:
        json.dump({"step": num_steps, **last}, f, indent=2)
    return last


def _export(trainer: UpscalerTrainer, state: dict, workdir: str) -> None:
    """The EMA generator in Real-ESRGAN's layout at ``<workdir>/generator.safetensors`` (replaced atomically)."""
    model = nnx.merge(trainer.g_def, jax.device_get(state["g_ema"]))
    save_rrdbnet(model, os.path.join(workdir, GENERATOR_FILE), overwrite=True,
                 source=f"raphael-train-upscaler {os.path.abspath(workdir)} step {int(state['step'])}")
