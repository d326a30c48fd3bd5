"""Real-ESRGAN's U-Net discriminator with spectral normalization, in Flax NNX.

Real-ESRGAN (Wang et al., "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic
Data", 2021, Sec. 3.2 and Fig. 6) replaces ESRGAN's VGG-style discriminator by a U-Net that returns one
realness logit per pixel, and stabilises it with spectral normalization (Miyato et al., "Spectral
Normalization for Generative Adversarial Networks", 2018). This is basicsr's / Real-ESRGAN's
``UNetDiscriminatorSN(num_in_ch=3, num_feat=64, skip_connection=True)`` layer for layer, so the published
``RealESRGAN_x4plus_netD.pth`` loads by name (:func:`raphael_jax.convert.sr_weights.import_discriminator`):

* ``conv0`` (3x3, bias, no SN) and three SN 4x4 stride-2 convs ``conv1..conv3`` down to 1/8 resolution
  (``num_feat`` -> 2x -> 4x -> 8x channels);
* three stages of bilinear x2 upsampling (``align_corners=False``) -> SN 3x3 conv ``conv4..conv6``, each
  plus the encoder feature of the same resolution when ``skip_connection``;
* SN ``conv7``, ``conv8`` and a plain 3x3 ``conv9`` to one channel.

Every conv but ``conv9`` is followed by LeakyReLU(0.2). Images are NHWC floats in [0, 1] (Real-ESRGAN
feeds the discriminator [0, 1] images); the output is [B, H, W, 1] logits; H and W must be divisible by 8.

Spectral normalization follows ``torch.nn.utils.spectral_norm`` exactly (:class:`SpectralConv`): the
kernel ``W`` (PyTorch layout reshaped to [out, in * kh * kw]) is divided by ``sigma = u^T W v``; ``u`` and
``v`` are persistent :class:`SpectralState` variables (not trained), refreshed by one power iteration per
forward in training mode (``update_stats=True``) and left untouched in eval mode. Both vectors are kept,
as PyTorch keeps ``weight_u`` and ``weight_v``: in eval mode PyTorch uses the stored ``v`` as is, so
matching it (and a checkpoint) exactly needs it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from raphael_jax.models.layers import conv

__all__ = ["SPECTRAL_LAYERS", "SpectralConv", "SpectralState", "UNetDiscriminatorConfig", "UNetDiscriminatorSN",
           "upsample_bilinear_x2"]

#: PyTorch's default Conv2d kernel init (kaiming_uniform_ with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_TORCH_CONV_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_CONV_AXES = (None, None, "conv_in", "conv_out")

#: The spectrally normalized layers of :class:`UNetDiscriminatorSN` (``conv0`` and ``conv9`` are plain).
SPECTRAL_LAYERS = frozenset(f"conv{i}" for i in range(1, 9))


class SpectralState(nnx.BatchStat):
    """Power-iteration vectors ``u`` / ``v`` of spectral normalization: state updated in training mode, never
    trained (a :class:`flax.nnx.BatchStat`, so optimizers over ``nnx.Param`` leave it alone and filters
    that already route batch statistics route it too)."""


def _l2_normalize(x: jax.Array, eps: float) -> jax.Array:
    """``torch.nn.functional.normalize(x, dim=0, eps=eps)``: ``x / max(||x||, eps)``."""
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


class SpectralConv(nnx.Module):
    """Bias-free 2D convolution with spectral normalization, as ``spectral_norm(nn.Conv2d(..., bias=False))``.

    The kernel is stored HWIO (tagged ``(None, None, conv_in, conv_out)`` as :func:`layers.conv`);
    ``u`` [out] and ``v`` [in * kh * kw] follow PyTorch's ``weight_u`` / ``weight_v`` (the kernel as the
    [out, in * kh * kw] matrix of its OIHW layout). Padding is PyTorch's symmetric ``padding``
    (``(kernel - 1) // 2`` by default: 1 for the 3x3 and 4x4 stride-2 convs of the discriminator).

    Training mode (``update_stats=True``, the default as in PyTorch; :meth:`flax.nnx.Module.eval` /
    ``train`` switch it, a call argument overrides it): ``n_power_iterations`` steps
    ``v = normalize(W^T u)``, ``u = normalize(W v)`` without gradient, stored back; then
    ``sigma = u^T W v`` (gradient flows through ``W`` only) and the conv uses ``W / sigma``.
    Eval mode uses the stored ``u`` and ``v`` unchanged.
    """

    def __init__(self, in_features: int, out_features: int, kernel: int = 3, stride: int = 1, *,
                 padding: int | None = None, rngs: nnx.Rngs, n_power_iterations: int = 1, eps: float = 1e-12,
                 update_stats: bool = True, dtype=None, param_dtype=jnp.float32, kernel_init=None):
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        init = kernel_init if kernel_init is not None else _TORCH_CONV_INIT
        shape = (kernel, kernel, in_features, out_features)
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype), out_sharding=_CONV_AXES)
        # PyTorch: u, v = normalize(randn(out)), normalize(randn(in * kh * kw))
        u = jax.random.normal(rngs.params(), (out_features,), jnp.float32)
        v = jax.random.normal(rngs.params(), (in_features * kernel * kernel,), jnp.float32)
        self.u = SpectralState(_l2_normalize(u, eps))
        self.v = SpectralState(_l2_normalize(v, eps))
        self.stride = stride
        self.padding = (kernel - 1) // 2 if padding is None else padding
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.dtype = dtype
        # nnx's train()/eval() toggle ``use_running_average``; update_stats is its negation (as nnx.SpectralNorm)
        self.use_running_average = not update_stats

    def _resolve(self, update_stats: bool | None) -> bool:
        return (not self.use_running_average) if update_stats is None else bool(update_stats)

    def weight_matrix(self) -> jax.Array:
        """The kernel as PyTorch's [out, in * kh * kw] matrix (float32)."""
        w = self.kernel[...].astype(jnp.float32)
        return w.transpose(3, 2, 0, 1).reshape(w.shape[3], -1)

    def normalized_kernel(self, update_stats: bool | None = None) -> tuple[jax.Array, jax.Array]:
        """``(kernel / sigma, sigma)``, running (and storing) the power iteration when ``update_stats``."""
        w_mat = self.weight_matrix()
        u, v = self.u[...], self.v[...]
        if self._resolve(update_stats):
            w_const = jax.lax.stop_gradient(w_mat)
            for _ in range(self.n_power_iterations):
                v = _l2_normalize(w_const.T @ u, self.eps)
                u = _l2_normalize(w_const @ v, self.eps)
            u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
            self.u[...] = u
            self.v[...] = v
        sigma = jnp.dot(u, w_mat @ v)
        return self.kernel[...].astype(jnp.float32) / sigma, sigma

    def __call__(self, x: jax.Array, update_stats: bool | None = None) -> jax.Array:
        kernel, _ = self.normalized_kernel(update_stats)
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, self.kernel[...].dtype)
        p = self.padding
        return jax.lax.conv_general_dilated(
            x.astype(dtype), kernel.astype(dtype), (self.stride, self.stride), ((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _upsample_axis(x: jax.Array, axis: int) -> jax.Array:
    """x2 linear upsampling along ``axis`` with half-pixel centres and edge clamping (align_corners=False):
    ``out[2i] = x[i-1]/4 + 3x[i]/4``, ``out[2i+1] = 3x[i]/4 + x[i+1]/4``, indices clamped to the edge."""
    n = x.shape[axis]
    first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
    last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
    prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
    even = 0.25 * prev + 0.75 * x
    odd = 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])


def upsample_bilinear_x2(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], equal to ``F.interpolate(x, scale_factor=2, mode='bilinear',
    align_corners=False)`` (borders included)."""
    return _upsample_axis(_upsample_axis(x, 1), 2)


def _lrelu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, 0.2)


@dataclasses.dataclass(frozen=True)
class UNetDiscriminatorConfig:
    """Hyper-parameters of :class:`UNetDiscriminatorSN`, named as the original's ``__init__`` arguments."""

    num_in_ch: int = 3
    num_feat: int = 64
    skip_connection: bool = True

    def validate(self) -> UNetDiscriminatorConfig:
        for name in ("num_in_ch", "num_feat"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UNetDiscriminatorSN {name} must be >= 1, got {getattr(self, name)}")
        return self


class UNetDiscriminatorSN(nnx.Module):
    """Real-ESRGAN's U-Net discriminator: [B, H, W, num_in_ch] in [0, 1] -> [B, H, W, 1] per-pixel logits.

    ``update_stats`` (call argument, else the mode set by ``.train()`` / ``.eval()``; training by default as
    PyTorch) says whether the spectral norms' power iterations run and store their vectors. Under
    ``nnx.jit`` / ``nnx.value_and_grad`` the updated :class:`SpectralState` propagates like batch statistics.
    """

    def __init__(self, cfg: UNetDiscriminatorConfig = UNetDiscriminatorConfig(), *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32, update_stats: bool = True):
        self.config = cfg.validate()
        f = cfg.num_feat
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        sn = dict(kw, update_stats=update_stats)
        self.conv0 = conv(cfg.num_in_ch, f, 3, kernel_init=_TORCH_CONV_INIT, **kw)
        self.conv1 = SpectralConv(f, 2 * f, 4, 2, **sn)
        self.conv2 = SpectralConv(2 * f, 4 * f, 4, 2, **sn)
        self.conv3 = SpectralConv(4 * f, 8 * f, 4, 2, **sn)
        self.conv4 = SpectralConv(8 * f, 4 * f, 3, 1, **sn)
        self.conv5 = SpectralConv(4 * f, 2 * f, 3, 1, **sn)
        self.conv6 = SpectralConv(2 * f, f, 3, 1, **sn)
        self.conv7 = SpectralConv(f, f, 3, 1, **sn)
        self.conv8 = SpectralConv(f, f, 3, 1, **sn)
        self.conv9 = conv(f, 1, 3, kernel_init=_TORCH_CONV_INIT, **kw)

    def __call__(self, x: jax.Array, update_stats: bool | None = None) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.config.num_in_ch:
            raise ValueError(f"UNetDiscriminatorSN expects [B, H, W, {self.config.num_in_ch}] images, got {x.shape}")
        if x.shape[1] % 8 or x.shape[2] % 8:
            raise ValueError(f"UNetDiscriminatorSN needs H and W divisible by 8, got {x.shape[1]}x{x.shape[2]}")
        us = update_stats
        skip = self.config.skip_connection
        x0 = _lrelu(self.conv0(x))
        x1 = _lrelu(self.conv1(x0, us))
        x2 = _lrelu(self.conv2(x1, us))
        x3 = _lrelu(self.conv3(x2, us))
        x4 = _lrelu(self.conv4(upsample_bilinear_x2(x3), us))
        if skip:
            x4 = x4 + x2
        x5 = _lrelu(self.conv5(upsample_bilinear_x2(x4), us))
        if skip:
            x5 = x5 + x1
        x6 = _lrelu(self.conv6(upsample_bilinear_x2(x5), us))
        if skip:
            x6 = x6 + x0
        out = _lrelu(self.conv7(x6, us))
        out = _lrelu(self.conv8(out, us))
        return self.conv9(out)
