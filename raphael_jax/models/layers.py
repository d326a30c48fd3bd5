"""Small building blocks shared by the models, each parameter tagged with logical axis names.

Logical axis names used across the project (the scale-out rules map them onto the mesh):
``embed`` (model width), ``mlp`` (feed-forward hidden), ``heads`` (attention heads x head dim),
``expert`` (expert index in an expert bank), ``context`` (text-token width), ``conv_in`` /
``conv_out`` (convolution channels), ``vocab``, ``norm`` (norm scales and biases, replicated),
``gate`` (router hidden width). Models never name mesh axes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Names = tuple[str | None, ...]


def dense(in_features: int, out_features: int, names: Names, *, rngs: nnx.Rngs, use_bias: bool = True,
          dtype=None, kernel_init=None) -> nnx.Linear:
    """``nnx.Linear`` whose kernel carries ``names`` and whose bias carries ``names[-1]``."""
    kwargs = {}
    if kernel_init is not None:
        kwargs["kernel_init"] = kernel_init
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, rngs=rngs,
                      kernel_metadata={"out_sharding": tuple(names)},
                      bias_metadata={"out_sharding": (names[-1],)}, **kwargs)


def conv(in_features: int, out_features: int, kernel: int = 3, stride: int = 1, *, rngs: nnx.Rngs,
         dtype=None, zero_init: bool = False, kernel_init=None, param_dtype=jnp.float32) -> nnx.Conv:
    """NHWC 2D convolution, HWIO kernel tagged ``(None, None, conv_in, conv_out)``."""
    kwargs = {"kernel_init": nnx.initializers.zeros_init()} if zero_init else {}
    if kernel_init is not None:
        kwargs["kernel_init"] = kernel_init
    return nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride, padding="SAME",
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    kernel_metadata={"out_sharding": (None, None, "conv_in", "conv_out")},
                    bias_metadata={"out_sharding": ("conv_out",)}, **kwargs)


def group_norm(num_features: int, num_groups: int, *, rngs: nnx.Rngs, dtype=None) -> nnx.GroupNorm:
    groups = math.gcd(num_features, num_groups)
    return nnx.GroupNorm(num_features, num_groups=groups, epsilon=1e-5, dtype=dtype, rngs=rngs,
                         scale_metadata={"out_sharding": ("norm",)},
                         bias_metadata={"out_sharding": ("norm",)})


def layer_norm(num_features: int, *, rngs: nnx.Rngs, dtype=None) -> nnx.LayerNorm:
    return nnx.LayerNorm(num_features, epsilon=1e-5, dtype=dtype, rngs=rngs,
                         scale_metadata={"out_sharding": ("norm",)},
                         bias_metadata={"out_sharding": ("norm",)})


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of integer or float timesteps ``t`` [B] -> [B, dim] (cos, sin halves)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def position_embedding_2d(height: int, width: int, dim: int) -> jax.Array:
    """Fixed 2D sin-cos position embedding [H*W, dim]: half the channels encode rows, half columns."""
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (jnp.arange(quarter, dtype=jnp.float32) / max(quarter, 1)))
    ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                          indexing="ij")
    ay = ys.reshape(-1, 1) * freqs[None]
    ax = xs.reshape(-1, 1) * freqs[None]
    emb = jnp.concatenate([jnp.sin(ay), jnp.cos(ay), jnp.sin(ax), jnp.cos(ax)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - emb.shape[-1])))


class FeedForward(nnx.Module):
    """Position-wise FFN with GELU: ``W2 gelu(W1 x + b1) + b2`` (the dense layer the MoEs replace)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=None):
        self.fc1 = dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = dense(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))
