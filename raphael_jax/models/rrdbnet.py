"""RRDBNet, the generator of ESRGAN / Real-ESRGAN, in Flax NNX (the paper's upscaler, App. 7.8).

RAPHAEL's 4096 x 6144 showcase images come from "a tailor-made SR-GAN" in the style of Real-ESRGAN
on top of the diffusion model's output (the paper, App. 7.8). This is that generator's
published architecture (Wang et al., ESRGAN 2018 and Real-ESRGAN 2021), parameter for parameter, so
the public Real-ESRGAN weights load by name (``raphael_jax/convert/esrgan.py``):

* ``conv_first``: 3x3 conv from the input to ``num_feat`` channels. For ``scale`` 2 (or 1) the
  input is first pixel-unshuffled by 2 (or 4), as the original does, so the body always runs at a
  quarter of the output resolution.
* ``body``: ``num_block`` RRDBs. An RRDB is three residual dense blocks, ``x + 0.2 * rdb3(rdb2(rdb1(x)))``;
  a residual dense block is five 3x3 convs, each seeing the block input and every earlier output
  (``num_grow_ch`` channels each, LeakyReLU 0.2), ``x + 0.2 * conv5(...)``.
* ``conv_body``, a global residual, then two (nearest x2 upsampling -> 3x3 conv -> LeakyReLU)
  stages, ``conv_hr`` + LeakyReLU and ``conv_last`` to ``num_out_ch`` channels.

Images are NHWC floats in [0, 1] (the original's range). Parameter paths mirror the PyTorch
module names (``body.0.rdb1.conv1.weight`` is ``body / 0 / rdb1 / conv1 / kernel``); every kernel
carries the logical axis names ``(None, None, conv_in, conv_out)`` of ``raphael_jax/models/layers.py``.

Initialisation follows the original (``default_init_weights``): Kaiming-normal convs scaled by 0.1
inside the dense blocks, zero biases, PyTorch's default elsewhere (approximated by LeCun-uniform).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from raphael_jax.models.layers import conv

__all__ = ["PRESETS", "RRDB", "RRDBNet", "RRDBNetConfig", "ResidualDenseBlock", "pixel_unshuffle",
           "receptive_radius"]


@dataclasses.dataclass(frozen=True)
class RRDBNetConfig:
    """Hyper-parameters of :class:`RRDBNet`, named as the original's ``__init__`` arguments."""

    num_in_ch: int = 3
    num_out_ch: int = 3
    scale: int = 4
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32

    def validate(self) -> RRDBNetConfig:
        if self.scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet scale must be 1, 2 or 4 (as the original), got {self.scale}")
        for name in ("num_in_ch", "num_out_ch", "num_feat", "num_grow_ch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RRDBNet {name} must be >= 1, got {getattr(self, name)}")
        if int(self.num_block) < 0:
            raise ValueError(f"RRDBNet num_block must be >= 0, got {self.num_block}")
        return self

    @property
    def unshuffle(self) -> int:
        """Pixel-unshuffle factor of the input: 1 for x4, 2 for x2, 4 for x1."""
        return 4 // self.scale


#: The published Real-ESRGAN generators (their ``.pth`` files' architectures).
PRESETS: dict[str, RRDBNetConfig] = {
    "RealESRGAN_x4plus": RRDBNetConfig(scale=4),
    "RealESRNet_x4plus": RRDBNetConfig(scale=4),
    "RealESRGAN_x2plus": RRDBNetConfig(scale=2),
    "RealESRGAN_x4plus_anime_6B": RRDBNetConfig(scale=4, num_block=6),
}


def receptive_radius(cfg: RRDBNetConfig) -> float:
    """Input pixels an output pixel can see to either side (every 3x3 conv adds one pixel at its scale).

    ``conv_first``, 15 convs per RRDB and ``conv_body`` run at ``1 / unshuffle`` of the input
    resolution (``unshuffle`` input pixels each), ``conv_up1`` at 2x that, ``conv_up2``, ``conv_hr`` and
    ``conv_last`` at 4x. A tile halo of at least this many input pixels makes tiling exact
    (``raphael_jax/models/upscale_tiling.py``).
    """
    u = cfg.unshuffle
    return u * (2 + 15 * cfg.num_block) + u / 2 + 3 * u / 4


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/f, W/f, C f f], channels ordered as PyTorch's (channel, row offset, column offset)."""
    if factor == 1:
        return x
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"pixel_unshuffle by {factor} needs sides divisible by {factor}, got {h}x{w}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // factor, w // factor, c * factor * factor)


def _upsample_nearest(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _lrelu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, 0.2)


_DENSE_INIT = nnx.initializers.variance_scaling(0.02, "fan_in", "normal")  # kaiming_normal_ (gain 2) x 0.1


class ResidualDenseBlock(nnx.Module):
    """Five densely connected 3x3 convs; ``x + 0.2 * conv5(cat(x, x1..x4))``."""

    def __init__(self, num_feat: int, num_grow_ch: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, kernel_init=_DENSE_INIT, param_dtype=param_dtype)
        self.conv1 = conv(num_feat, num_grow_ch, **kw)
        self.conv2 = conv(num_feat + num_grow_ch, num_grow_ch, **kw)
        self.conv3 = conv(num_feat + 2 * num_grow_ch, num_grow_ch, **kw)
        self.conv4 = conv(num_feat + 3 * num_grow_ch, num_grow_ch, **kw)
        self.conv5 = conv(num_feat + 4 * num_grow_ch, num_feat, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        feats = [x]
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(_lrelu(layer(jnp.concatenate(feats, axis=-1))))
        return x + 0.2 * self.conv5(jnp.concatenate(feats, axis=-1))


class RRDB(nnx.Module):
    """Residual in residual dense block: ``x + 0.2 * rdb3(rdb2(rdb1(x)))``."""

    def __init__(self, num_feat: int, num_grow_ch: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nnx.Module):
    """The Real-ESRGAN generator: [B, H, W, num_in_ch] in [0, 1] -> [B, 4H/u.., ...] (``scale`` x the input)."""

    def __init__(self, cfg: RRDBNetConfig = RRDBNetConfig(), *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.config = cfg.validate()
        f = cfg.num_feat
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv_first = conv(cfg.num_in_ch * cfg.unshuffle**2, f, **kw)
        self.body = nnx.List([RRDB(f, cfg.num_grow_ch, **kw) for _ in range(cfg.num_block)])
        self.conv_body = conv(f, f, **kw)
        self.conv_up1 = conv(f, f, **kw)
        self.conv_up2 = conv(f, f, **kw)
        self.conv_hr = conv(f, f, **kw)
        self.conv_last = conv(f, cfg.num_out_ch, **kw)

    @property
    def scale(self) -> int:
        return self.config.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        feat = self.conv_first(pixel_unshuffle(x, self.config.unshuffle))
        body = feat
        for block in self.body:
            body = block(body)
        feat = feat + self.conv_body(body)
        feat = _lrelu(self.conv_up1(_upsample_nearest(feat)))
        feat = _lrelu(self.conv_up2(_upsample_nearest(feat)))
        return self.conv_last(_lrelu(self.conv_hr(feat)))
