"""DDIM sampler (Song et al. 2021) with classifier-free guidance, as one jitted ``lax.scan`` loop.

One step from ``t`` to ``t_prev`` (``abar`` from :class:`NoiseSchedule`; ``abar_prev = final_abar``
when ``t_prev < 0``):

    x0_hat, eps_hat = predict_x0_and_eps(model_out, x_t, t)        (x0_hat optionally clipped)
    sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    x_prev  = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat + sigma_t z

Classifier-free guidance on the model output (eps or v, both linear in the output):
``out = out_uncond + w (out_cond - out_uncond)``; ``w = 1`` is the conditional model, ``w = 0`` the
unconditional one. Cond and uncond are evaluated in ONE denoiser call on the batch ``[cond; uncond]``.

Parity with diffusers ``DDIMScheduler`` (checked in tests/diffusion/test_diffusion.py):

- ``timestep_spacing`` "leading" (diffusers default), "trailing" or "linspace", and ``steps_offset``
  exactly as ``DDIMScheduler.set_timesteps``.
- ``t_prev = t - T // num_steps`` for every spacing, as ``DDIMScheduler.step`` computes it.
- ``set_alpha_to_one``: ``final_abar = 1`` if True (diffusers default) else ``abar_0``
  (Stable Diffusion's scheduler config: ``set_alpha_to_one=False, steps_offset=1``).
- ``clip_x0=None`` is ``clip_sample=False``; ``clip_x0=c`` is ``clip_sample=True,
  clip_sample_range=c``. As in diffusers (``use_clipped_model_output=False``) only x0_hat is
  clipped, eps_hat is not recomputed. No dynamic thresholding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from raphael_jax.diffusion.schedule import NoiseSchedule, normalize_prediction, predict_x0_and_eps

__all__ = ["TIMESTEP_SPACINGS", "ddim_sample", "ddim_step", "ddim_timesteps"]

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(
    num_steps: int, T: int = 1000, timestep_spacing: str = "leading", steps_offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Static DDIM timesteps (descending) and their predecessors, int32 numpy ``[num_steps]`` each.

    - leading:  ``t_i = (num_steps - 1 - i) * (T // num_steps) + steps_offset``
    - trailing: ``round(arange(T, 0, -T / num_steps)) - 1``
    - linspace: ``round(linspace(0, T - 1, num_steps))[::-1]``

    ``prev = t - T // num_steps`` (negative means "use final_abar"), as in diffusers.
    """
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, T={T}], got {num_steps}")
    if timestep_spacing == "leading":
        ts = (np.arange(num_steps) * (T // num_steps)).round()[::-1].astype(np.int64) + steps_offset
    elif timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
    elif timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(
            f"unknown timestep_spacing {timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}"
        )
    if ts.max() >= T or ts.min() < 0:
        raise ValueError(f"timesteps {ts} out of range [0, {T}); check steps_offset")
    prev = ts - T // num_steps
    return ts.astype(np.int32), prev.astype(np.int32)


def _abar(sched: NoiseSchedule, t, final_abar, ndim: int) -> jax.Array:
    """``abar_t`` for int ``t`` (scalar or ``[B]``), ``final_abar`` where ``t < 0``; broadcast to ndim."""
    t = jnp.asarray(t, jnp.int32)
    a = jnp.where(t >= 0, sched.alphas_cumprod[jnp.maximum(t, 0)], final_abar)
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def ddim_step(
    sched: NoiseSchedule,
    model_out: jax.Array,
    t,
    t_prev,
    x_t: jax.Array,
    prediction: str = "epsilon",
    eta: float = 0.0,
    noise: jax.Array | None = None,
    *,
    clip_x0: float | None = None,
    set_alpha_to_one: bool = True,
    use_clipped_model_output: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update ``x_t -> x_{t_prev}`` (equations in the module docstring).

    ``t``/``t_prev`` are ints, scalars or ``[B]``; ``t_prev < 0`` uses ``final_abar`` (1 if
    ``set_alpha_to_one`` else ``abar_0``). ``noise`` (z, shaped like ``x_t``) is required when
    ``eta > 0`` and ignored otherwise. Returns ``(x_prev, x0_hat)`` in float32 (or wider).
    """
    final_abar = 1.0 if set_alpha_to_one else sched.alphas_cumprod[0]
    a_t = _abar(sched, t, final_abar, x_t.ndim)
    a_prev = _abar(sched, t_prev, final_abar, x_t.ndim)
    x0, eps = predict_x0_and_eps(sched, model_out, x_t, t, prediction)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        if use_clipped_model_output:  # diffusers use_clipped_model_output=True
            eps = (x_t - jnp.sqrt(a_t) * x0) / jnp.sqrt(jnp.maximum(1.0 - a_t, 1e-12))
    var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(var)
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - std**2) * eps
    if not (isinstance(eta, int | float) and eta == 0):
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        x_prev = x_prev + std * noise
    return x_prev, x0


def _rescale_guidance(out: jax.Array, out_c: jax.Array, phi: float) -> jax.Array:
    """Lin et al. 2024 (sec. 3.4), diffusers' ``guidance_rescale``: match the guided output's std per
    sample to the conditional one's, mixed with weight ``phi`` (against over-exposure with v and a
    zero-terminal-SNR schedule)."""
    axes = tuple(range(1, out.ndim))
    rescaled = out * (jnp.std(out_c, axis=axes, keepdims=True) / jnp.std(out, axis=axes, keepdims=True))
    return phi * rescaled + (1.0 - phi) * out


def _concat_batch(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


@functools.partial(
    jax.jit,
    static_argnames=(
        "denoise_fn",
        "num_steps",
        "eta",
        "prediction",
        "clip_x0",
        "timestep_spacing",
        "steps_offset",
        "set_alpha_to_one",
        "has_aux",
        "return_trajectory",
        "use_clipped_model_output",
        "guidance_rescale",
    ),
)
def ddim_sample(
    denoise_fn: Callable,
    sched: NoiseSchedule,
    x_T: jax.Array,
    cond: Any,
    uncond: Any = None,
    *,
    num_steps: int = 50,
    guidance: float | jax.Array = 3.0,
    eta: float = 0.0,
    prediction: str = "epsilon",
    key: jax.Array | None = None,
    clip_x0: float | None = None,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    guidance_rescale: float = 0.0,
    use_clipped_model_output: bool = False,
    params: Any = None,
    has_aux: bool = False,
    return_trajectory: bool = False,
):
    """Run ``num_steps`` DDIM steps from ``x_T`` (``[B, ...]``) with classifier-free guidance.

    Args:
      denoise_fn: ``denoise_fn(x_t, t_batch, context) -> model_out`` (or, when ``params`` is given,
        ``denoise_fn(params, x_t, t_batch, context)``); ``t_batch`` is int32 ``[N]``, ``context`` a
        pytree like ``cond``. It is a static argument: reuse the same callable to reuse the
        compiled loop, and pass large weights through ``params`` (traced) rather than closing
        over them (which bakes them into the program as constants). With ``has_aux`` it returns
        ``(model_out, aux)``.
      sched: the training :class:`NoiseSchedule`.
      x_T: initial noise ``[B, ...]``; the carry keeps its dtype, the update math runs in float32.
      cond / uncond: pytrees with leading batch axis ``B`` (e.g. text embeddings and masks).
        ``uncond=None`` disables guidance (one call on ``cond`` per step). Otherwise each step
        makes one call on ``[cond; uncond]`` (batch ``2B``) and uses
        ``out = out_u + guidance * (out_c - out_u)``.
      guidance: CFG weight ``w`` (traced: changing it does not recompile); scalar or ``[B]``.
      eta: DDIM eta (static). ``eta > 0`` needs ``key``; noise for step ``i`` is
        ``normal(split(key, num_steps)[i])``.
      prediction: ``"epsilon"`` or ``"v"`` (``"v_prediction"``).
      clip_x0, timestep_spacing, steps_offset, set_alpha_to_one: see the module docstring.
      return_trajectory: also return a dict with int32 ``timesteps``/``prev_timesteps`` ``[S]``,
        ``x`` (the sample after each step, ``[S, B, ...]``), ``x0_pred`` ``[S, B, ...]`` and, with
        ``has_aux``, ``aux`` stacked over steps (for the ``2B`` batch when guided).

    Returns:
      ``x_0`` ``[B, ...]``, or ``(x_0, trajectory)`` when ``return_trajectory``.
    """
    prediction = normalize_prediction(prediction)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and key is None:
        raise ValueError("ddim_sample with eta > 0 needs a PRNG `key`")
    ts, prevs = ddim_timesteps(num_steps, sched.num_timesteps, timestep_spacing, steps_offset)
    batch = x_T.shape[0]
    w = jnp.asarray(guidance, jnp.float32)
    w = w.reshape(w.shape + (1,) * (x_T.ndim - w.ndim))
    guided = uncond is not None
    context = _concat_batch(cond, uncond) if guided else cond

    def call(x, t_batch):
        if params is None:
            res = denoise_fn(x, t_batch, context)
        else:
            res = denoise_fn(params, x, t_batch, context)
        return res if has_aux else (res, None)

    def body(x, inputs):
        t, t_prev, step_key = inputs
        t_b = jnp.full((batch,), t, jnp.int32)
        if guided:
            out2, aux = call(jnp.concatenate([x, x], axis=0), jnp.concatenate([t_b, t_b], axis=0))
            out2 = out2.astype(jnp.float32)
            out_c, out_u = out2[:batch], out2[batch:]
            out = out_u + w * (out_c - out_u)
            if guidance_rescale > 0:
                out = _rescale_guidance(out, out_c, guidance_rescale)
        else:
            out, aux = call(x, t_b)
            out = out.astype(jnp.float32)
        noise = None if eta == 0 else jax.random.normal(step_key, x.shape, jnp.float32)
        x_prev, x0 = ddim_step(
            sched,
            out,
            t,
            t_prev,
            x.astype(jnp.float32),
            prediction,
            eta,
            noise,
            clip_x0=clip_x0,
            set_alpha_to_one=set_alpha_to_one,
            use_clipped_model_output=use_clipped_model_output,
        )
        x_prev = x_prev.astype(x_T.dtype)
        rec = (x_prev, x0.astype(x_T.dtype), aux) if return_trajectory else None
        return x_prev, rec

    keys = jax.random.split(key, num_steps) if eta > 0 else jnp.zeros((num_steps,), jnp.uint32)
    ts_j, prevs_j = jnp.asarray(ts), jnp.asarray(prevs)
    x0, rec = jax.lax.scan(body, x_T, (ts_j, prevs_j, keys))
    if not return_trajectory:
        return x0
    traj = {"timesteps": ts_j, "prev_timesteps": prevs_j, "x": rec[0], "x0_pred": rec[1]}
    if has_aux:
        traj["aux"] = rec[2]
    return x0, traj
