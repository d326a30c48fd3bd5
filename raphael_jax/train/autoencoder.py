"""Train the project's own small KL autoencoder on the shapes world; save it in diffusers' layout.

RAPHAEL diffuses in the latent space of a pre-trained image autoencoder (the paper (Sec. 3)
follows LDM; ``raphael_jax/models/autoencoder.py``). For the shapes world a small KL autoencoder
of the same architecture is trained here, LDM-style:

    z ~ q(z|x) = N(mean(x), exp(logvar(x)))              (sampled during training)
    loss = sum_pixels w * rec(decode(z), x)  +  kl_weight * sum_latents KL(q(z|x) || N(0, I))

both summed per image and averaged over the batch, as LDM's ``LPIPSWithDiscriminator`` does
(without the perceptual and adversarial terms). ``rec`` is ``(r - x)^2 + l1_weight * |r - x|``
(``reconstruction="mse"``, the default) or ``|r - x|`` (``"l1"``), and ``w = 1 + edge_weight`` on
pixels within one pixel of an edge (a 3x3 window whose values span more than 0.1 in some channel),
1 elsewhere. The world's images are flat palette colours with hard edges on black, and the analyzer
(``raphael_jax/data/shapes/analyzer.py``) reads colour from the nearest palette entry and kind and
size from each blob's outline and filled bounding box: a small autoencoder spends its capacity on
the flat interiors unless the outlines weigh more. The squared error keeps the flat colours exact;
with L1 alone the same architecture and budget stayed blurry and colour-shifted (compare
``raphael-train-vae --reconstruction l1 --edge-weight 0`` with the defaults: docs/RESULTS.md).

After training, the latent **scaling factor** is measured as Stable Diffusion did: one over the
standard deviation of the posterior-mean latents of held-out images (shapes-world ``stream=1``,
never seen in training), so that the diffusion model sees latents of about unit variance.

:func:`export_diffusers` writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` in the
layout of diffusers' ``AutoencoderKL.save_pretrained`` (the inverse of
``raphael_jax/convert/vae.py``), so both ``raphael_jax.convert.load_autoencoder`` and
``diffusers.AutoencoderKL.from_pretrained`` read the result.

    report = train_autoencoder("runs/vae64", steps=..., batch_size=...)   # also raphael-train-vae
    vae, cfg = raphael_jax.convert.load_autoencoder("runs/vae64")
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from raphael_jax.convert import safetensors_io as sio
from raphael_jax.data.shapes import analyzer
from raphael_jax.data.shapes.pipeline import ShapesWorldSource
from raphael_jax.data.shapes.world import check_image_size, example
from raphael_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig

__all__ = [
    "EVAL_STREAM",
    "REPORT_FILE",
    "diffusers_config",
    "diffusers_tensors",
    "edge_mask",
    "eval_examples",
    "evaluate_autoencoder",
    "held_out_scores",
    "export_diffusers",
    "kl_divergence",
    "psnr",
    "reconstruction_error",
    "train_autoencoder",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
REPORT_FILE = "report.json"
EVAL_STREAM = 1  # held-out images: world stream 1 (training reads stream 0)
DIFFUSERS_VERSION = "0.39.0"  # the diffusers release this layout was checked against (tests/train)


# --------------------------------------------------------------------------------------- export

def diffusers_config(cfg: AutoencoderKLConfig, sample_size: int) -> dict[str, Any]:
    """The ``config.json`` dict of diffusers' ``AutoencoderKL`` for ``cfg`` (every ``__init__`` argument)."""
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": cfg.act_fn,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": int(sample_size),
        "scaling_factor": float(cfg.scaling_factor),
        "shift_factor": None if cfg.shift_factor is None else float(cfg.shift_factor),
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.mid_block_add_attention,
    }


def _nnx_to_torch(path: tuple, arr: np.ndarray) -> np.ndarray:
    """Inverse of ``safetensors_io.torch_to_nnx`` for this model: conv HWIO -> OIHW, linear [in, out] -> [out, in]."""
    if path[-1] == "kernel":
        if arr.ndim == 4:
            return arr.transpose(3, 2, 0, 1)
        if arr.ndim == 2:
            return arr.T
        raise ValueError(f"{'/'.join(map(str, path))}: no PyTorch layout for a rank-{arr.ndim} kernel")
    return arr


def diffusers_tensors(vae: AutoencoderKL) -> dict[str, np.ndarray]:
    """diffusers tensor name -> float32 array in PyTorch layout, for every parameter of ``vae``."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        arr = np.asarray(jax.device_get(var[...]), np.float32)
        out[sio.torch_name(path)] = np.ascontiguousarray(_nnx_to_torch(path, arr))
    return out


def _refuse_non_empty(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} exists and is not an empty directory; refusing to overwrite it")


def export_diffusers(vae: AutoencoderKL, out_dir: str | Path, *, sample_size: int = 64) -> Path:
    """Writes ``vae`` as a diffusers ``AutoencoderKL`` ``save_pretrained`` directory; returns it.

    ``out_dir`` gets ``config.json`` (with ``vae.config.scaling_factor``; ``sample_size`` is the
    image size it was trained at) and ``diffusion_pytorch_model.safetensors`` (float32, diffusers'
    names and PyTorch layouts). A non-empty existing ``out_dir`` is refused with a ValueError and
    left untouched.
    """
    out = Path(out_dir)
    _refuse_non_empty(out)
    tensors = diffusers_tensors(vae)
    out.mkdir(parents=True, exist_ok=True)
    sio.write_safetensors(tensors, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(diffusers_config(vae.config, sample_size), indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------ training

def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over all but the batch axis."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(-1)


RECONSTRUCTIONS = ("mse", "l1")
EDGE_THRESHOLD = 0.1  # a 3x3 window spanning more than this (images in [-1, 1]) is at an edge


def edge_mask(x: jax.Array) -> jax.Array:
    """[B, H, W, 1] float mask: 1 where the 3x3 window around a pixel spans > EDGE_THRESHOLD in some channel."""
    window, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    hi = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pad)
    lo = jax.lax.reduce_window(x, jnp.inf, jax.lax.min, window, strides, pad)
    return jnp.any(hi - lo > EDGE_THRESHOLD, axis=-1, keepdims=True).astype(x.dtype)


def reconstruction_error(recon: jax.Array, x: jax.Array, kind: str = "mse", l1_weight: float = 0.1,
                         edge_weight: float = 4.0) -> jax.Array:
    """Per-element reconstruction error (module docs): squared (+ ``l1_weight`` x absolute) or absolute,
    weighted ``1 + edge_weight`` at the edges of ``x``."""
    diff = recon - x
    err = jnp.abs(diff) if kind == "l1" else jnp.square(diff) + l1_weight * jnp.abs(diff)
    return err * (1.0 + edge_weight * edge_mask(x)) if edge_weight else err


def psnr(reference: np.ndarray, images: np.ndarray) -> float:
    """PSNR in dB of uint8 ``images`` against uint8 ``reference``: 10 log10(255^2 / MSE), MSE over all pixels."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(images, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def eval_examples(seed: int, num: int, image_size: int, min_objects: int = 1, max_objects: int = 1):
    """The held-out set: ``example(seed, i, ..., stream=EVAL_STREAM)`` for i < num -> (uint8 images, object lists)."""
    exs = [example(seed, i, image_size, min_objects, max_objects, stream=EVAL_STREAM) for i in range(num)]
    return np.stack([e["image"] for e in exs]), [e["objects"] for e in exs]


def _train_batches(seed: int, image_size: int, min_objects: int, max_objects: int, batch_size: int):
    """Iterator of uint8 image batches [B, S, S, 3] of world stream 0 (grain, one prefetch thread)."""
    source = ShapesWorldSource(seed, image_size, min_objects, max_objects, stream=0)
    ds = grain.MapDataset.source(source).map(lambda ex: ex["image"]).batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def _to_float(images_uint8: jax.Array) -> jax.Array:
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def default_norm_groups(block_out_channels: Sequence[int], largest: int = 32) -> int:
    """The largest power of two <= ``largest`` dividing every channel count (diffusers uses 32)."""
    g = largest
    while g > 1 and any(c % g for c in block_out_channels):
        g //= 2
    return g


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# As for the train-state init (raphael_jax/train/state.py): on XLA:CPU most compile time is LLVM
# optimising elementwise kernels while the convolutions run in library calls, so the expensive
# passes are skipped (the train step compiles ~4x faster at the same speed).
_CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fn, *args):
    """``jax.jit(fn)`` compiled for ``args``' shapes (fast-compile options on CPU)."""
    lowered = jax.jit(fn).lower(*args)
    cpu = jax.devices()[0].platform == "cpu"
    return lowered.compile(compiler_options=_CPU_FAST_COMPILE if cpu else None)


def _encode_decode_fns(graphdef, params, batch_size: int, image_size: int, latent_shape):
    def encode(p, images_uint8):
        return nnx.merge(graphdef, p).latent_dist(_to_float(images_uint8)).mean

    def decode(p, z):
        return nnx.merge(graphdef, p).decode(z)

    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8)
    z = jax.ShapeDtypeStruct((batch_size, *latent_shape), jnp.float32)
    return _compile(encode, params, images), _compile(decode, params, z)


def _in_batches(fn, params, x: np.ndarray, batch_size: int) -> np.ndarray:
    """fn(params, chunk) over x in chunks of exactly ``batch_size`` (the last one padded: one compile)."""
    outs = []
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        outs.append(np.asarray(jax.device_get(fn(params, chunk)))[:n])
    return np.concatenate(outs)


def _fmt_scores(s: dict) -> str:
    return " ".join(f"{a} {s[a]:.3f}" for a in analyzer.ATTRIBUTES)


def held_out_scores(images: np.ndarray, objects, decoded: np.ndarray) -> dict[str, Any]:
    """PSNR of the uint8 ``decoded`` against ``images``, the analyzer's scores of both, and the kind
    accuracy of the decoded scenes per (kind, size) of the true objects (where shapes lose their form)."""
    keep = (*analyzer.ATTRIBUTES, "all")
    by_shape: dict[str, list[bool]] = {}
    for image, objs in zip(decoded, objects):
        for obj, result in zip(objs, analyzer.analyze(image, objs)):
            by_shape.setdefault(f"{obj.kind}/{obj.size}", []).append(bool(result["kind"]))
    return {
        "psnr_db": psnr(images, decoded),
        "scores_decoded": {k: v for k, v in analyzer.score(decoded, objects).items() if k in keep},
        "scores_original": {k: v for k, v in analyzer.score(images, objects).items() if k in keep},
        "kind_by_shape": {k: float(np.mean(v)) for k, v in sorted(by_shape.items())},
    }


def evaluate_autoencoder(vae_dir: str | Path, *, seed: int = 0, num_eval: int = 512, min_objects: int = 1,
                         max_objects: int = 1, image_size: int | None = None) -> dict[str, Any]:
    """:func:`held_out_scores` of a saved autoencoder (diffusers layout) on ``num_eval`` held-out scenes
    (:func:`eval_examples`; ``image_size`` defaults to the ``sample_size`` of its config), decoding the
    posterior means; also the std of those means and 1 / std (the scaling factor training measured)."""
    from raphael_jax.convert import load_autoencoder

    vae, cfg = load_autoencoder(vae_dir)
    if image_size is None:
        image_size = int(json.loads((Path(vae_dir) / CONFIG_FILE).read_text()).get("sample_size") or 64)
    images, objects = eval_examples(seed, num_eval, image_size, min_objects, max_objects)
    graphdef, params = nnx.split(vae, nnx.Param)
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    latent_shape = (image_size // factor, image_size // factor, cfg.latent_channels)
    eval_batch = min(num_eval, 32)
    encode, decode = _encode_decode_fns(graphdef, params, eval_batch, image_size, latent_shape)
    means = _in_batches(encode, params, images, eval_batch)
    decoded = analyzer.to_uint8(_in_batches(decode, params, means, eval_batch))
    std = float(np.std(means.astype(np.float64)))
    return {"vae": str(vae_dir), "seed": seed, "num_eval": num_eval, "min_objects": min_objects,
            "max_objects": max_objects, "image_size": image_size, "latent_std": std,
            "scaling_factor_measured": 1.0 / std, **held_out_scores(images, objects, decoded)}


def train_autoencoder(
    out_dir: str | Path,
    *,
    image_size: int = 64,
    block_out_channels: Sequence[int] = (32, 64, 128),
    layers_per_block: int = 1,
    latent_channels: int = 4,
    norm_num_groups: int | None = None,
    steps: int = 2000,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    warmup_steps: int = 100,
    kl_weight: float = 1e-6,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 1,
    reconstruction: str = "mse",
    l1_weight: float = 0.1,
    edge_weight: float = 4.0,
    num_eval: int = 512,
    log_every: int = 100,
    verbose: bool = True,
) -> dict[str, Any]:
    """Trains a random-init :class:`AutoencoderKL` on shapes-world images; exports it; returns the report.

    Training reads world stream 0 of ``seed`` (``raphael_jax/data/shapes/pipeline.py``), AdamW
    (weight decay 0) with a linear warm-up over ``warmup_steps`` and cosine decay to 0 at
    ``steps``; the posterior is sampled (one key per step from ``seed``), so the run is
    deterministic given its arguments. The held-out set is :func:`eval_examples` (``num_eval``
    scenes of stream :data:`EVAL_STREAM`): it gives the scaling factor (1 / std of its
    posterior-mean latents, over all elements), the PSNR of its decoded means (uint8 round trip)
    and the analyzer's per-attribute scores of the decoded and of the original images.

    ``out_dir`` (new or empty; checked before training) receives the diffusers files
    (:func:`export_diffusers`) and ``report.json``; the report dict is also returned. Latents are
    ``image_size / 2 ** (len(block_out_channels) - 1)`` pixels square.
    """
    out = Path(out_dir)
    _refuse_non_empty(out)
    image_size = check_image_size(image_size)
    block_out_channels = tuple(int(c) for c in block_out_channels)
    factor = 2 ** (len(block_out_channels) - 1)
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("num_eval", num_eval, 1),
                             ("log_every", log_every, 1), ("layers_per_block", layers_per_block, 1),
                             ("latent_channels", latent_channels, 1), ("warmup_steps", warmup_steps, 0)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not block_out_channels or min(block_out_channels) < 1:
        raise ValueError(f"block_out_channels must be positive ints, got {block_out_channels}")
    if image_size % factor:
        raise ValueError(f"image_size {image_size} is not divisible by the downsampling factor {factor} "
                         f"of {len(block_out_channels)} blocks")
    if not learning_rate > 0 or not kl_weight >= 0:
        raise ValueError(f"need learning_rate > 0 and kl_weight >= 0, got {learning_rate}, {kl_weight}")
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
    if not l1_weight >= 0 or not edge_weight >= 0:
        raise ValueError(f"need l1_weight >= 0 and edge_weight >= 0, got {l1_weight}, {edge_weight}")
    groups = default_norm_groups(block_out_channels) if norm_num_groups is None else int(norm_num_groups)
    cfg = AutoencoderKLConfig(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                              latent_channels=latent_channels, norm_num_groups=groups, scaling_factor=1.0)
    t0 = time.time()
    model = AutoencoderKL(cfg, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    warm = min(warmup_steps, steps - 1) if steps > 1 else 0
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warm, 1), max(steps, warm + 1))
    tx = optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=0.0)
    opt_state = tx.init(params)

    def loss_fn(p, images_uint8, key):
        m = nnx.merge(graphdef, p)
        x = _to_float(images_uint8)
        dist = m.latent_dist(x)
        recon = m.decode(dist.sample(key))
        err = reconstruction_error(recon, x, reconstruction, l1_weight, edge_weight)
        rec = err.reshape(x.shape[0], -1).sum(-1).mean()
        kl = kl_divergence(dist.mean, dist.logvar).mean()
        return rec + kl_weight * kl, {"rec_l1": jnp.abs(recon - x).mean(), "kl": kl}

    def train_step(p, o, images_uint8, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, images_uint8, key)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, {"loss": loss, **aux}

    if verbose:
        print(f"raphael-train-vae: {n_params / 1e6:.2f}M parameters, channels {list(block_out_channels)}, "
              f"{image_size}px -> latents {image_size // factor}x{image_size // factor}x{latent_channels}, "
              f"{steps} steps, batch {batch_size}, lr {learning_rate:g}, kl_weight {kl_weight:g}, "
              f"{reconstruction} loss (l1_weight {l1_weight:g}, edge_weight {edge_weight:g}), "
              f"{min_objects}-{max_objects} objects", flush=True)
    data = _train_batches(seed, image_size, min_objects, max_objects, batch_size)
    base_key = jax.random.key(seed)
    batch_spec = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8)
    train_step = _compile(train_step, params, opt_state, batch_spec, base_key)
    first_loss, last, pending = None, {}, []
    t_rate, s_rate = time.time(), 0
    for step in range(1, steps + 1):
        params, opt_state, metrics = train_step(params, opt_state, next(data), jax.random.fold_in(base_key, step))
        pending.append(metrics)
        if step == 1:  # exclude compilation from the rate
            first_loss = float(metrics["loss"])
            t_rate, s_rate = time.time(), 1
        if step % log_every == 0 or step == steps:
            last = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
            pending = []
            rate = (step - s_rate) / max(time.time() - t_rate, 1e-9) if step > s_rate else 0.0
            if verbose:
                eta = (steps - step) / rate if rate > 0 else 0.0
                print(f"step {step:6d}/{steps}  loss {last['loss']:.2f}  rec_l1 {last['rec_l1']:.4f}  "
                      f"kl {last['kl']:.1f}  {rate:5.2f} steps/s  ETA {_fmt_time(eta)}", flush=True)
    train_seconds = time.time() - t0

    # held-out evaluation: scaling factor, PSNR, analyzer scores
    images, objects = eval_examples(seed, num_eval, image_size, min_objects, max_objects)
    latent_shape = (image_size // factor, image_size // factor, latent_channels)
    eval_batch = min(num_eval, 32)
    encode, decode = _encode_decode_fns(graphdef, params, eval_batch, image_size, latent_shape)
    means = _in_batches(encode, params, images, eval_batch)
    latent_std = float(np.std(means.astype(np.float64)))
    scaling_factor = 1.0 / latent_std
    decoded = analyzer.to_uint8(_in_batches(decode, params, means, eval_batch))
    held_out = held_out_scores(images, objects, decoded)
    report = {
        "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "warmup_steps": warm,
        "kl_weight": kl_weight, "reconstruction": reconstruction, "l1_weight": l1_weight,
        "edge_weight": edge_weight, "seed": seed, "image_size": image_size, "min_objects": min_objects,
        "max_objects": max_objects, "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block, "latent_channels": latent_channels, "norm_num_groups": groups,
        "latent_shape": list(latent_shape), "num_params": n_params,
        "train_seconds": round(train_seconds, 1), "first_loss": first_loss, "final": last,
        "scaling_factor": scaling_factor, "latent_std": latent_std, "latent_mean": float(np.mean(means)),
        "num_eval": num_eval, "eval_stream": EVAL_STREAM, **held_out,
    }
    model = nnx.merge(graphdef, params)
    model.config = dataclasses.replace(cfg, scaling_factor=scaling_factor)
    export_diffusers(model, out, sample_size=image_size)
    report["seconds"] = round(time.time() - t0, 1)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if verbose:
        scores, ceiling = report["scores_decoded"], report["scores_original"]
        print(f"done in {report['seconds']:.0f} s (training {train_seconds:.0f} s): loss {first_loss:.1f} -> "
              f"{last['loss']:.1f}, scaling_factor {scaling_factor:.4f}, PSNR {report['psnr_db']:.2f} dB on "
              f"{num_eval} held-out images\n  decoded:  {_fmt_scores(scores)}\n  original: {_fmt_scores(ceiling)}\n"
              f"wrote {out} (diffusers AutoencoderKL; load with raphael_jax.convert.load_autoencoder)", flush=True)
    return report
