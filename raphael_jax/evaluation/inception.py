"""The FID Inception-v3 network in Flax NNX, layer for layer the network that pytorch-fid uses.

FID (Heusel et al. 2017) compares the 2048-d "pool3" features of the TF Inception-v3 graph
``inception-2015-12-05``. pytorch-fid ports that graph to PyTorch (``pt_inception-2015-12-05-
6726825d.pth``): torchvision's ``Inception3`` with the FID variants of the mixed blocks

- ``FIDInceptionA`` (Mixed_5b/5c/5d), ``FIDInceptionC`` (Mixed_6b..6e), ``FIDInceptionE_1``
  (Mixed_7b): the pool branch averages a 3x3 window WITHOUT counting the zero padding
  (``count_include_pad=False``, as TF's avg_pool does);
- ``FIDInceptionE_2`` (Mixed_7c): the pool branch is a 3x3 MAX pool (a quirk of the TF graph).

This module reproduces that network exactly, in NHWC:

    x in [0, 1]  -> bilinear resize to 299x299 (align_corners=False, no antialias, as
                    F.interpolate) -> 2x - 1 -> Conv2d_1a..2b, maxpool -> Conv2d_3b, 4a, maxpool
                 -> Mixed_5b..5d, 6a..6e, 7a..7c -> global average pool -> [B, 2048]

Every ``BasicConv2d`` is conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU.
Attribute names are those of the PyTorch state dict (``Mixed_6b.branch7x7dbl_3.conv.weight``,
``...bn.running_var``), so importing weights is a renaming (``kernel``/``scale`` -> ``weight``,
``mean``/``var`` -> ``running_mean``/``running_var``).

Weights: convert pytorch-fid's file once to safetensors (never unpickled on load)::

    raphael-convert inception pt_inception-2015-12-05-6726825d.pth weights/fid_inception.safetensors

then :func:`load_inception` reads it. ``InceptionConfig.channel_divisor`` > 1 shrinks every
layer's width (tests only: a cheap network of the same layout; its features are NOT FID features).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raphael_jax.convert import safetensors_io as sio

__all__ = [
    "FID_WEIGHTS_FILE",
    "FID_WEIGHTS_URL",
    "InceptionConfig",
    "InceptionV3",
    "convert_pytorch_fid_weights",
    "inception_torch_name",
    "init_inception",
    "load_inception",
    "resize_bilinear",
]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE
_BN_EPS = 1e-3
_DEFAULT_RESIZE = 299


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """Options of the FID network.

    Attributes:
      resize: side the input is bilinearly resized to (pytorch-fid: 299); None keeps the input size
        (it must be at least 75).
      normalize_input: map [0, 1] inputs to [-1, 1] (pytorch-fid: True).
      channel_divisor: 1 for the real network; k > 1 divides every layer's width by k, keeping at
        least 8 channels (tests only).
    """

    resize: int | None = _DEFAULT_RESIZE
    normalize_input: bool = True
    channel_divisor: int = 1

    def ch(self, n: int) -> int:
        return n if self.channel_divisor == 1 else max(8, n // self.channel_divisor)

    @property
    def feature_dim(self) -> int:
        """Width of the pool3 features (2048 for the real network)."""
        return self.ch(320) + 2 * self.ch(384) + 2 * self.ch(384) + self.ch(192)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ pooling (NHWC)


def _pad_hw(p: int) -> tuple[tuple[int, int], ...]:
    return ((0, 0), (p, p), (p, p), (0, 0))


def max_pool(x: jax.Array, k: int = 3, stride: int = 2, pad: int = 0) -> jax.Array:
    """``F.max_pool2d(x, k, stride, padding=pad)`` (padding never wins the max)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, stride, stride, 1), _pad_hw(pad))


def avg_pool_exclude_pad(x: jax.Array, k: int = 3, pad: int = 1) -> jax.Array:
    """``F.avg_pool2d(x, k, stride=1, padding=pad, count_include_pad=False)``."""
    window, strides = (1, k, k, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, _pad_hw(pad))
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, _pad_hw(pad))
    return total / count


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """``F.interpolate(x, (size, size), mode="bilinear", align_corners=False)`` on NHWC (no antialias)."""
    b, h, w, c = x.shape
    if (h, w) == (size, size):
        return x
    return jax.image.resize(x, (b, size, size, c), method="linear", antialias=False)


# ------------------------------------------------------------------------------------------ blocks


class BasicConv2d(nnx.Module):
    """torchvision's ``BasicConv2d``: conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0, *, rngs: nnx.Rngs):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nnx.Conv(
            cin,
            cout,
            (kh, kw),
            strides=(stride, stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            kernel_init=nnx.initializers.variance_scaling(2.0, "fan_in", "normal"),
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(cout, epsilon=_BN_EPS, use_running_average=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class FIDInceptionA(nnx.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad count)-1x1."""

    def __init__(self, cfg: InceptionConfig, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        c = cfg.ch
        self.branch1x1 = BasicConv2d(cin, c(64), 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, c(48), 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(c(48), c(64), 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, c(pool_features), 1, rngs=rngs)
        self.out_channels = c(64) + c(64) + c(96) + c(pool_features)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (grid reduction): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2."""

    def __init__(self, cfg: InceptionConfig, cin: int, *, rngs: nnx.Rngs):
        c = cfg.ch
        self.branch3x3 = BasicConv2d(cin, c(384), 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), 3, stride=2, rngs=rngs)
        self.out_channels = c(384) + c(96) + cin

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class FIDInceptionC(nnx.Module):
    """Mixed_6b..6e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool(no pad count)-1x1."""

    def __init__(self, cfg: InceptionConfig, cin: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c = cfg.ch
        c7 = c(channels_7x7)
        self.branch1x1 = BasicConv2d(cin, c(192), 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, c(192), (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, c(192), (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, c(192), 1, rngs=rngs)
        self.out_channels = 4 * c(192)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (grid reduction): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2."""

    def __init__(self, cfg: InceptionConfig, cin: int, *, rngs: nnx.Rngs):
        c = cfg.ch
        self.branch3x3_1 = BasicConv2d(cin, c(192), 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(c(192), c(320), 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, c(192), 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(c(192), c(192), (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(c(192), c(192), (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(c(192), c(192), 3, stride=2, rngs=rngs)
        self.out_channels = c(320) + c(192) + cin

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class FIDInceptionE(nnx.Module):
    """Mixed_7b (``pool="avg"``, FIDInceptionE_1) and Mixed_7c (``pool="max"``, FIDInceptionE_2).

    1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool 3x3/1 (pad 1)-1x1.
    """

    def __init__(self, cfg: InceptionConfig, cin: int, pool: str, *, rngs: nnx.Rngs):
        c = cfg.ch
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, c(320), 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, c(384), 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(c(384), c(384), (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(c(384), c(384), (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(448), 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(c(448), c(384), 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(c(384), c(384), (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(c(384), c(384), (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, c(192), 1, rngs=rngs)
        self.out_channels = cfg.feature_dim

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
        return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """pytorch-fid's ``InceptionV3(output_blocks=[3])`` with ``use_fid_inception=True``.

    ``__call__(images)`` takes float NHWC images in [0, 1] of any size and returns the pool3
    features ``[B, feature_dim]`` (2048). The module is inference-only (BatchNorm uses its running
    statistics); weights come from :func:`load_inception`.
    """

    def __init__(self, cfg: InceptionConfig = InceptionConfig(), *, rngs: nnx.Rngs):
        self.config = cfg
        c = cfg.ch
        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), 3, rngs=rngs)
        self.Mixed_5b = FIDInceptionA(cfg, c(192), 32, rngs=rngs)
        self.Mixed_5c = FIDInceptionA(cfg, self.Mixed_5b.out_channels, 64, rngs=rngs)
        self.Mixed_5d = FIDInceptionA(cfg, self.Mixed_5c.out_channels, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(cfg, self.Mixed_5d.out_channels, rngs=rngs)
        self.Mixed_6b = FIDInceptionC(cfg, self.Mixed_6a.out_channels, 128, rngs=rngs)
        self.Mixed_6c = FIDInceptionC(cfg, self.Mixed_6b.out_channels, 160, rngs=rngs)
        self.Mixed_6d = FIDInceptionC(cfg, self.Mixed_6c.out_channels, 160, rngs=rngs)
        self.Mixed_6e = FIDInceptionC(cfg, self.Mixed_6d.out_channels, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(cfg, self.Mixed_6e.out_channels, rngs=rngs)
        self.Mixed_7b = FIDInceptionE(cfg, self.Mixed_7a.out_channels, "avg", rngs=rngs)
        self.Mixed_7c = FIDInceptionE(cfg, self.Mixed_7b.out_channels, "max", rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(jnp.float32)
        if self.config.resize is not None:
            x = resize_bilinear(x, self.config.resize)
        if self.config.normalize_input:
            x = 2.0 * x - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return jnp.mean(x, axis=(1, 2))

    def features_uint8(self, images: jax.Array) -> jax.Array:
        """Pool3 features of uint8 NHWC images (``ToTensor``: divided by 255)."""
        return self(images.astype(jnp.float32) / 255.0)


@functools.lru_cache(maxsize=4)
def _abstract(cfg: InceptionConfig) -> InceptionV3:
    """The network with ShapeDtypeStruct leaves (tracing ~100 layers takes seconds: done once)."""
    return sio.abstract_module(lambda: InceptionV3(cfg, rngs=nnx.Rngs(0)))


def init_inception(cfg: InceptionConfig = InceptionConfig(), seed: int = 0) -> InceptionV3:
    """Random weights (tests only; not FID features) that keep activations O(1) through the network:
    He-normal convolutions, BatchNorm affine and running statistics near identity. Drawn with numpy
    (JAX's random init of ~100 layers compiles very slowly on CPU)."""
    graphdef, state = nnx.split(_abstract(cfg))
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(state):
        shape, leaf = tuple(var.shape), path[-1]
        if leaf == "kernel":
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.8, 1.2, shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.1, shape)
        flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---------------------------------------------------------------------------------- weight import

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def inception_torch_name(path: tuple) -> str:
    """NNX path -> pytorch-fid state-dict name (``Mixed_5b.branch1x1.bn.running_mean``)."""
    parts = [str(p) for p in path]
    if parts[-2] == "bn":
        parts[-1] = _BN_NAMES[parts[-1]]
    elif parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def _ignored(name: str) -> bool:
    # the 1008-way classifier, BatchNorm step counters, and the aux head of torchvision checkpoints
    return name.startswith(("fc.", "AuxLogits.")) or name.endswith(".num_batches_tracked")


def build_inception(shapes, load, cfg: InceptionConfig = InceptionConfig(), source: str = "") -> InceptionV3:
    """InceptionV3 from tensors (``shapes`` name -> shape, ``load(names)`` -> arrays), all checked."""
    return sio.import_state(
        _abstract(cfg), shapes, load, inception_torch_name, ignore=_ignored, what="FID Inception", source=source
    )


def load_inception(path: str | Path, cfg: InceptionConfig = InceptionConfig()) -> InceptionV3:
    """Loads the FID Inception from a safetensors file (see :func:`convert_pytorch_fid_weights`).

    Raises:
      ConversionError: not a safetensors file, or missing / unexpected / mis-shaped tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise sio.ConversionError(f"{path}: no such file (make it with `raphael-convert inception "
                                  f"{FID_WEIGHTS_FILE} {path}`)")
    if path.suffix in sio.PICKLE_SUFFIXES:
        raise sio.ConversionError(
            f"{path} is a pickle file, which raphael_jax never unpickles on load; convert it once with "
            f"`raphael-convert inception {path} OUT.safetensors`"
        )
    shapes = sio.safetensors_shapes([path])
    return build_inception(shapes, lambda names: sio.read_tensors([path], names), cfg, str(path))


def _check_hash(path: Path) -> None:
    """pytorch-fid names its file with the first 8 hex digits of its sha256; verify them if present."""
    m = re.search(r"-([0-9a-f]{8,})\.pth$", path.name)
    if not m:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(m.group(1)):
        raise sio.ConversionError(
            f"{path}: sha256 {digest[:16]}... does not start with {m.group(1)} (corrupt or wrong file): "
            f"re-download it from {FID_WEIGHTS_URL}"
        )


def convert_pytorch_fid_weights(src: str | Path, out: str | Path, cfg: InceptionConfig = InceptionConfig()) -> Path:
    """pytorch-fid ``.pth`` state dict -> safetensors (``torch.load(weights_only=True)``, no code runs).

    The tensors are checked against the network (names and shapes) before anything is written;
    ``out`` must not exist. All tensors are kept as they are (``fc.*`` included).
    """
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise sio.ConversionError(f"{src}: no such file (download {FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL})")
    if out.exists():
        raise sio.ConversionError(f"{out} exists; refusing to overwrite it: remove it or give a new name")
    _check_hash(src)
    sio.check_torch_file(src, f"re-download it from {FID_WEIGHTS_URL}")
    try:
        import torch  # only for this one-time conversion
    except ImportError:
        raise sio.ConversionError("converting the .pth needs torch (pip install torch)") from None
    sd = sio.torch_load_weights(torch, src, f"re-download it from {FID_WEIGHTS_URL}")
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    tensors = {k: v.detach().cpu().numpy() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    build_inception(shapes, lambda names: tensors, cfg, str(src))  # validates
    sio.write_safetensors(tensors, out)
    return out
