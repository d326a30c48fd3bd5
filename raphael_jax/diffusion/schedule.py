"""DDPM noise schedule, forward process and training targets.

Notation (Ho et al. 2020): betas ``b_t`` for ``t = 0..T-1`` (0-based, as in diffusers),
``a_t = 1 - b_t`` and ``abar_t = prod_{s<=t} a_s``. The forward process is

    x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,    eps ~ N(0, I).

Two model parameterisations are supported: ``"epsilon"`` (the model predicts eps) and ``"v"``
(Salimans & Ho 2022; ``"v_prediction"`` is accepted as an alias):

    v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x_0.

Beta schedules match diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` ``beta_schedule`` options:
``"scaled_linear"`` (Stable Diffusion, the project default), ``"linear"`` (DDPM) and ``"cosine"``
(= diffusers ``"squaredcos_cap_v2"``, Nichol & Dhariwal 2021). Betas and cumulative products are
computed in float64 and stored as float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTIONS",
    "NoiseSchedule",
    "make_betas",
    "normalize_prediction",
    "predict_x0_and_eps",
    "q_sample",
    "sample_timesteps",
    "snr",
    "training_target",
]

BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")
PREDICTIONS = ("epsilon", "v")
_KIND_ALIASES = {"squaredcos_cap_v2": "cosine"}
_PREDICTION_ALIASES = {"v_prediction": "v", "eps": "epsilon"}
_DEFAULT_RANGE = {"scaled_linear": (0.00085, 0.012), "linear": (1e-4, 0.02)}


def make_betas(
    kind: str = "scaled_linear",
    T: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    max_beta: float = 0.999,
) -> np.ndarray:
    """Return the float64 betas ``[T]`` of a named schedule.

    - ``"scaled_linear"``: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``,
      default range 0.00085..0.012 (Stable Diffusion).
    - ``"linear"``: ``linspace(beta_start, beta_end, T)``, default range 1e-4..0.02 (DDPM).
    - ``"cosine"`` (alias ``"squaredcos_cap_v2"``): ``b_i = min(1 - f((i+1)/T) / f(i/T), max_beta)``
      with ``f(s) = cos((s + 0.008) / 1.008 * pi / 2) ** 2``; ``beta_start``/``beta_end`` are ignored.
    """
    kind = _KIND_ALIASES.get(kind, kind)
    if kind not in BETA_SCHEDULES:
        raise ValueError(
            f"unknown beta schedule {kind!r}; expected one of {BETA_SCHEDULES} (or 'squaredcos_cap_v2')"
        )
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if kind == "cosine":

        def f(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1.0 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], np.float64)
    lo, hi = _DEFAULT_RANGE[kind]
    lo = lo if beta_start is None else beta_start
    hi = hi if beta_end is None else beta_end
    if kind == "linear":
        return np.linspace(lo, hi, T, dtype=np.float64)
    return np.linspace(lo**0.5, hi**0.5, T, dtype=np.float64) ** 2


@struct.dataclass
class NoiseSchedule:
    """Frozen pytree of float32 ``[T]`` schedule arrays; ``num_timesteps`` is static.

    ``alphas_cumprod[t] = abar_t``; ``sqrt_alphas_cumprod = sqrt(abar_t)``;
    ``sqrt_one_minus_alphas_cumprod = sqrt(1 - abar_t)``.
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    num_timesteps: int = struct.field(pytree_node=False, default=1000)

    @classmethod
    def from_betas(cls, betas) -> NoiseSchedule:
        """Build from explicit betas (computed in float64, stored float32)."""
        b = np.asarray(betas, np.float64)
        if b.ndim != 1 or not np.all((b > 0) & (b < 1)):
            raise ValueError("betas must be a 1-D array with values in (0, 1)")
        a = 1.0 - b
        abar = np.cumprod(a)
        f32 = lambda v: jnp.asarray(v, jnp.float32)
        return cls(
            betas=f32(b),
            alphas=f32(a),
            alphas_cumprod=f32(abar),
            sqrt_alphas_cumprod=f32(np.sqrt(abar)),
            sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
            num_timesteps=int(b.shape[0]),
        )

    @classmethod
    def create(cls, kind: str = "scaled_linear", T: int = 1000, **kwargs) -> NoiseSchedule:
        """``NoiseSchedule.from_betas(make_betas(kind, T, **kwargs))``."""
        return cls.from_betas(make_betas(kind, T, **kwargs))


def normalize_prediction(prediction: str) -> str:
    """Map a prediction name (``"epsilon"``, ``"v"``, or the aliases ``"v_prediction"``/``"eps"``)
    to ``"epsilon"`` or ``"v"``; raise ``ValueError`` otherwise."""
    p = _PREDICTION_ALIASES.get(prediction, prediction)
    if p not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected 'epsilon' or 'v' ('v_prediction')")
    return p


def _gather(arr: jax.Array, t, ndim: int) -> jax.Array:
    """``arr[t]`` reshaped to broadcast over trailing image dims: ``t`` scalar or ``[B]`` -> ``[B,1,..]``."""
    t = jnp.asarray(t, jnp.int32)
    v = arr[t]
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def q_sample(sched: NoiseSchedule, x0: jax.Array, t, noise: jax.Array) -> jax.Array:
    """Forward process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.

    ``t`` is a scalar or int ``[B]`` (one timestep per sample, broadcast over the other axes of ``x0``).
    """
    sa = _gather(sched.sqrt_alphas_cumprod, t, x0.ndim)
    so = _gather(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return (sa * x0 + so * noise).astype(x0.dtype)


def training_target(sched: NoiseSchedule, x0: jax.Array, noise: jax.Array, t, prediction: str = "epsilon"):
    """Regression target: ``eps`` for ``"epsilon"``; ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` for
    ``"v"``."""
    p = normalize_prediction(prediction)
    if p == "epsilon":
        return noise
    sa = _gather(sched.sqrt_alphas_cumprod, t, x0.ndim)
    so = _gather(sched.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return (sa * noise - so * x0).astype(x0.dtype)


def predict_x0_and_eps(sched: NoiseSchedule, model_out: jax.Array, x_t: jax.Array, t, prediction: str):
    """Convert a model output at ``x_t`` to ``(x0_hat, eps_hat)``.

    - epsilon: ``eps = out``, ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``
    - v: ``x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v``, ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``

    Computed in at least float32 (``jnp.result_type`` of the inputs and the float32 schedule).
    """
    p = normalize_prediction(prediction)
    sa = _gather(sched.sqrt_alphas_cumprod, t, x_t.ndim)
    so = _gather(sched.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    if p == "epsilon":
        x0 = (x_t - so * model_out) / sa
        return x0, model_out.astype(x0.dtype)
    x0 = sa * x_t - so * model_out
    eps = sa * model_out + so * x_t
    return x0, eps


def snr(sched: NoiseSchedule, t) -> jax.Array:
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` at integer timesteps ``t``."""
    abar = sched.alphas_cumprod[jnp.asarray(t, jnp.int32)]
    return abar / (1.0 - abar)


def sample_timesteps(key: jax.Array, batch: int, T: int = 1000) -> jax.Array:
    """Uniform training timesteps, int32 ``[batch]`` in ``[0, T)``."""
    return jax.random.randint(key, (batch,), 0, T, dtype=jnp.int32)
