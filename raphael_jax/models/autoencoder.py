"""KL-regularised autoencoder (Stable Diffusion's KL-f8 VAE) in Flax NNX, NHWC.

RAPHAEL follows LDM and diffuses in the latent space of a pre-trained image autoencoder (the
paper (Sec. 3, following LDM) gives no details; we use the SD-style KL-f8 VAE with 4 latent channels).
This is a port of diffusers' ``AutoencoderKL`` that loads its safetensors weights (see
``raphael_jax.convert.vae``):

    moments = quant_conv(Encoder(x))          x in [-1, 1], [B, H, W, 3]
    mean, logvar = split(moments);  logvar = clip(logvar, -30, 20)
    z = mean + exp(logvar / 2) * eps,   eps ~ N(0, I)          [B, H/f, W/f, latent_channels]
    x_hat = Decoder(post_quant_conv(z))
    diffusion latents: z_s = (z - shift_factor) * scaling_factor   (shift 0; scale 0.18215 for SD1/2)

Encoder: conv_in, down blocks (ResnetBlock2D x layers_per_block, then a stride-2 conv after a
(0,1,0,1) pad except in the last block), mid block (resnet, single-head attention, resnet),
GroupNorm, SiLU, conv_out to 2 * latent_channels. Decoder mirrors it with layers_per_block + 1
resnets per block and nearest x2 upsampling followed by a 3x3 conv.

Parameters carry logical axis names (``conv_in``, ``conv_out``, ``norm``) as ``out_sharding``
metadata; ``raphael_jax`` turns flax's eager sharding off at import, and the trainer maps the names
to mesh axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussian"]


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Hyper-parameters, named as in diffusers' ``AutoencoderKL`` config. Defaults: the SD 1.x/2.x VAE."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if self.act_fn != "silu":
            raise ValueError(f"only act_fn='silu' is supported, got {self.act_fn!r}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {bad} not divisible by norm_num_groups {self.norm_num_groups}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    # diffusers' AutoencoderKL.__init__ defaults, used for keys a config.json leaves out.
    _HF_DEFAULTS = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(64,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        act_fn="silu",
        scaling_factor=0.18215,
        shift_factor=None,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
    )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> AutoencoderKLConfig:
        """Builds the config from a diffusers ``AutoencoderKL`` ``config.json`` dict."""
        cls_name = cfg.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ValueError(f"expected a diffusers AutoencoderKL config, got _class_name={cls_name!r}")
        n = len(cfg.get("block_out_channels", cls._HF_DEFAULTS["block_out_channels"]))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(cfg.get(key, [want] * n))
            if types != [want] * n:
                raise ValueError(f"{key} must be {n} x {want!r} (got {types})")
        kw = {k: cfg.get(k, v) for k, v in cls._HF_DEFAULTS.items()}
        if kw["scaling_factor"] is None:
            kw["scaling_factor"] = cls._HF_DEFAULTS["scaling_factor"]
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(d["block_out_channels"])
        return d


@struct.dataclass
class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, exp(logvar)), logvar already clipped to [-30, 20]."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


def _conv(cin: int, cout: int, k: int, *, stride: int = 1, pad: int | str = "SAME", dtype, param_dtype, rngs):
    padding = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(k, k),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
        ),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
        rngs=rngs,
    )


def _group_norm(c: int, groups: int, *, dtype, param_dtype, rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(
        c,
        num_groups=groups,
        epsilon=1e-6,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
        rngs=rngs,
    )


def _linear(c: int, *, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(
        c,
        c,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("conv_in", "conv_out")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
        rngs=rngs,
    )


class ResnetBlock2D(nnx.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 conv shortcut when channels change."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _group_norm(cin, groups, **kw)
        self.conv1 = _conv(cin, cout, 3, pad=1, **kw)
        self.norm2 = _group_norm(cout, groups, **kw)
        self.conv2 = _conv(cout, cout, 3, pad=1, **kw)
        self.conv_shortcut = _conv(cin, cout, 1, pad=0, **kw) if cin != cout else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over all H*W positions with a residual (diffusers' VAE ``Attention``)."""

    def __init__(self, c: int, groups: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = _group_norm(c, groups, **kw)
        self.to_q = _linear(c, **kw)
        self.to_k = _linear(c, **kw)
        self.to_v = _linear(c, **kw)
        self.to_out = nnx.List([_linear(c, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, 1, c)
        y = jax.nn.dot_product_attention(self.to_q(y), self.to_k(y), self.to_v(y))
        return x + self.to_out[0](y.reshape(b, h, w, c))


class MidBlock(nnx.Module):
    def __init__(self, c: int, groups: int, add_attention: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(c, c, groups, **kw), ResnetBlock2D(c, c, groups, **kw)])
        self.attentions = nnx.List([AttentionBlock(c, groups, **kw)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv (diffusers' ``Downsample2D``, padding=0)."""

    def __init__(self, c: int, *, dtype, param_dtype, rngs):
        self.conv = _conv(c, c, 3, stride=2, pad=0, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c: int, *, dtype, param_dtype, rngs):
        self.conv = _conv(c, c, 3, pad=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, add_downsample: bool, **kw):
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(n)]
        )
        self.downsamplers = nnx.List([Downsample(cout, **kw)] if add_downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, add_upsample: bool, **kw):
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, groups, **kw) for i in range(n)]
        )
        self.upsamplers = nnx.List([Upsample(cout, **kw)] if add_upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, **kw):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, pad=1, **kw)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, add_downsample=i < len(ch) - 1, **kw
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = _group_norm(ch[-1], g, **kw)
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, pad=1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, **kw):
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, ch[0], 3, pad=1, **kw)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, add_upsample=i < len(ch) - 1, **kw
                )
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = _group_norm(ch[-1], g, **kw)
        self.conv_out = _conv(ch[-1], cfg.out_channels, 3, pad=1, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers' ``AutoencoderKL`` in NHWC; attribute names follow diffusers for a plain weight import.

    Args:
      cfg: the hyper-parameters.
      dtype: computation dtype (None: the parameters' dtype).
      param_dtype: parameter dtype.
      rngs: random init (weights are normally imported, see ``raphael_jax.convert.vae``).
    """

    def __init__(self, cfg: AutoencoderKLConfig, *, dtype: Any = None, param_dtype: Any = jnp.float32, rngs):
        self.config = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        lat = cfg.latent_channels
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        self.quant_conv = _conv(2 * lat, 2 * lat, 1, pad=0, **kw) if cfg.use_quant_conv else nnx.data(None)
        self.post_quant_conv = _conv(lat, lat, 1, pad=0, **kw) if cfg.use_post_quant_conv else nnx.data(None)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor or 0.0

    def latent_dist(self, x: jax.Array) -> DiagonalGaussian:
        """q(z | x) for images x [B, H, W, in_channels] in [-1, 1]."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [B, H, W, C] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""
        dist = self.latent_dist(x)
        return dist.mean, dist.logvar

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, latent_channels] -> images [B, f*h, f*w, C_out] in about [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode_to_latents(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Images -> diffusion latents (z - shift) * scale, z sampled with ``key`` (None: the mean)."""
        dist = self.latent_dist(x)
        z = dist.mode() if key is None else dist.sample(key)
        return (z - self.shift_factor) * self.scaling_factor

    def decode_latents(self, z_scaled: jax.Array) -> jax.Array:
        """Diffusion latents -> images: decode(z / scale + shift)."""
        return self.decode(z_scaled / self.scaling_factor + self.shift_factor)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction decode(z), z ~ q(z|x) (the mean when ``key`` is None)."""
        dist = self.latent_dist(x)
        return self.decode(dist.mode() if key is None else dist.sample(key))
