"""Noise schedule, training targets and the DDIM sampler against diffusers (torch) and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raphael_jax.diffusion.ddim import ddim_sample, ddim_step, ddim_timesteps
from raphael_jax.diffusion.schedule import (
    NoiseSchedule,
    make_betas,
    predict_x0_and_eps,
    q_sample,
    sample_timesteps,
    snr,
    training_target,
)

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

T = 1000
SHAPE = (2, 4, 3, 3)  # [B, C, H, W]
KIND_TO_DIFFUSERS = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
BETA_RANGE = {"scaled_linear": (0.00085, 0.012), "linear": (1e-4, 0.02), "cosine": (1e-4, 0.02)}


def _ddim_ref(kind="scaled_linear", **kw):
    lo, hi = BETA_RANGE[kind]
    kw.setdefault("clip_sample", False)
    return schedulers.DDIMScheduler(
        num_train_timesteps=T, beta_start=lo, beta_end=hi, beta_schedule=KIND_TO_DIFFUSERS[kind], **kw
    )


def _rand(seed, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# A fixed toy "denoiser": linear in x_t (channel mixing), in t, and in a context embedding.
_W = (np.eye(4) * 0.6 + 0.1 * _rand(123, (4, 4))).astype(np.float32)
_U = (0.2 * _rand(321, (4, 4))).astype(np.float32)


def toy_np(x, t, ctx=None):
    out = np.einsum("bchw,cd->bdhw", x, _W) + 0.3 * (t.astype(np.float32) / T - 0.5)[:, None, None, None]
    if ctx is not None:
        out = out + ctx["scale"][:, None, None, None] * (ctx["emb"] @ _U)[:, :, None, None]
    return out.astype(np.float32)


def toy_jax(x, t, ctx=None):
    out = jnp.einsum("bchw,cd->bdhw", x, _W) + 0.3 * (t.astype(jnp.float32) / T - 0.5)[:, None, None, None]
    if ctx is not None:
        out = out + ctx["scale"][:, None, None, None] * (ctx["emb"] @ _U)[:, :, None, None]
    return out


def toy_jax_noctx(x, t, ctx):
    return toy_jax(x, t)


def _ddim_loop_ref(ref, x, num_steps, model_fn, eta=0.0, noises=None):
    """Plain diffusers loop; returns the list of samples after each step."""
    ref.set_timesteps(num_steps)
    xs, sample = [], torch.from_numpy(x)
    for i, t in enumerate(ref.timesteps):
        out = model_fn(sample.numpy(), np.full((x.shape[0],), int(t)))
        kw = {} if noises is None else {"variance_noise": torch.from_numpy(noises[i])}
        sample = ref.step(torch.from_numpy(out), int(t), sample, eta=eta, **kw).prev_sample
        xs.append(sample.numpy().copy())
    return ref.timesteps.numpy(), xs


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
def test_betas_match_diffusers(kind):
    sched = NoiseSchedule.create(kind, T)
    lo, hi = BETA_RANGE[kind]
    for cls in (schedulers.DDPMScheduler, schedulers.DDIMScheduler):
        ref = cls(num_train_timesteps=T, beta_start=lo, beta_end=hi, beta_schedule=KIND_TO_DIFFUSERS[kind])
        np.testing.assert_allclose(make_betas(kind, T), ref.betas.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(sched.betas), ref.betas.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6)
    assert sched.alphas_cumprod.dtype == jnp.float32 and sched.num_timesteps == T


def test_schedule_defaults_and_errors():
    b = make_betas("scaled_linear", 5)
    np.testing.assert_allclose(b[[0, -1]], [0.00085, 0.012], rtol=1e-12)
    np.testing.assert_allclose(make_betas("linear", 5)[[0, -1]], [1e-4, 0.02], rtol=1e-12)
    np.testing.assert_array_equal(make_betas("squaredcos_cap_v2", 7), make_betas("cosine", 7))
    assert make_betas("cosine", 10).max() <= 0.999
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("sigmoid")
    with pytest.raises(ValueError, match="unknown prediction"):
        training_target(NoiseSchedule.create("linear", 10), jnp.zeros(2), jnp.zeros(2), 0, "x0")


def test_schedule_is_a_pytree_under_jit():
    sched = NoiseSchedule.create("linear", 50)
    leaves = jax.tree.leaves(sched)
    assert len(leaves) == 5 and all(leaf.shape == (50,) for leaf in leaves)
    f = jax.jit(lambda s, t: s.alphas_cumprod[t] * s.num_timesteps)
    np.testing.assert_allclose(f(sched, 3), np.cumprod(1 - np.linspace(1e-4, 0.02, 50))[3] * 50, rtol=1e-6)


def test_q_sample_and_targets_match_numpy_and_diffusers():
    sched = NoiseSchedule.create("scaled_linear", T)
    ref = schedulers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    abar = ref.alphas_cumprod.numpy().astype(np.float64)
    x0, eps = _rand(0, (3, 4, 5, 2)), _rand(1, (3, 4, 5, 2))
    t = np.array([0, 417, 999], np.int32)
    a = abar[t][:, None, None, None]
    xt_np = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    v_np = np.sqrt(a) * eps - np.sqrt(1 - a) * x0
    xt = q_sample(sched, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(eps))
    np.testing.assert_allclose(np.asarray(xt), xt_np, atol=2e-6)
    tt = torch.from_numpy(t.astype(np.int64))
    np.testing.assert_allclose(
        np.asarray(xt), ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), tt).numpy(), atol=2e-6
    )
    v = training_target(sched, jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t), "v")
    np.testing.assert_allclose(np.asarray(v), v_np, atol=2e-6)
    v_ref = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), tt).numpy()
    np.testing.assert_allclose(np.asarray(v), v_ref, atol=2e-6)
    e = training_target(sched, jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t), "epsilon")
    np.testing.assert_array_equal(np.asarray(e), eps)
    np.testing.assert_allclose(np.asarray(snr(sched, jnp.asarray(t))), abar[t] / (1 - abar[t]), rtol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "v_prediction"])
def test_predict_x0_and_eps_inverts_target(prediction):
    sched = NoiseSchedule.create("scaled_linear", T)
    x0, eps = jnp.asarray(_rand(2)), jnp.asarray(_rand(3))
    t = jnp.array([13, 998], jnp.int32)
    xt = q_sample(sched, x0, t, eps)
    target = training_target(sched, x0, eps, t, prediction)
    x0_hat, eps_hat = predict_x0_and_eps(sched, target, xt, t, prediction)
    np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=2e-5)
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(eps), atol=2e-5)


def test_sample_timesteps():
    t = sample_timesteps(jax.random.key(0), 20000, T)
    assert t.dtype == jnp.int32 and t.shape == (20000,)
    assert int(t.min()) >= 0 and int(t.max()) <= T - 1
    counts = np.bincount(np.asarray(t) // 100, minlength=10)
    assert counts.min() > 1800 and counts.max() < 2200  # ~2000 per decile
    np.testing.assert_array_equal(t, sample_timesteps(jax.random.key(0), 20000, T))
    assert not np.array_equal(t, sample_timesteps(jax.random.key(1), 20000, T))


# ---------------------------------------------------------------- DDIM


@pytest.mark.parametrize(
    "spacing,num_steps,offset",
    [("leading", 10, 0), ("leading", 50, 1), ("leading", 7, 0), ("trailing", 10, 0), ("trailing", 7, 0),
     ("linspace", 7, 0)],
)
def test_ddim_timesteps_match_diffusers(spacing, num_steps, offset):
    ref = _ddim_ref(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(num_steps)
    ts, prev = ddim_timesteps(num_steps, T, spacing, offset)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    np.testing.assert_array_equal(prev, ref.timesteps.numpy() - T // num_steps)
    with pytest.raises(ValueError):
        ddim_timesteps(num_steps, T, "karras")


@pytest.mark.parametrize(
    "prediction,eta,clip,set_alpha_to_one",
    [("epsilon", 0.0, None, True), ("v", 0.0, None, False), ("epsilon", 0.7, None, False),
     ("v", 1.0, 1.0, True)],
)
def test_ddim_step_matches_diffusers(prediction, eta, clip, set_alpha_to_one):
    sched = NoiseSchedule.create("scaled_linear", T)
    ref = _ddim_ref(
        prediction_type="v_prediction" if prediction == "v" else "epsilon",
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=clip is not None,
        clip_sample_range=clip or 1.0,
    )
    ref.set_timesteps(20)
    x, out, z = _rand(4), 0.8 * _rand(5), _rand(6)
    for t in (950, 500, 0):  # t=0 steps to t_prev=-50 -> final alpha
        kw = {"variance_noise": torch.from_numpy(z)} if eta > 0 else {}
        r = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=eta, **kw)
        x_prev, x0 = ddim_step(sched, jnp.asarray(out), t, t - 50, jnp.asarray(x), prediction, eta,
                               jnp.asarray(z), clip_x0=clip, set_alpha_to_one=set_alpha_to_one)
        np.testing.assert_allclose(np.asarray(x_prev), r.prev_sample.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(x0), r.pred_original_sample.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "prediction,config",
    [("epsilon", {}), ("v", {}),
     ("epsilon", {"steps_offset": 1, "set_alpha_to_one": False}),
     ("v", {"timestep_spacing": "trailing"})],
)
def test_ddim_trajectory_matches_diffusers(prediction, config):
    sched = NoiseSchedule.create("scaled_linear", T)
    ref = _ddim_ref(prediction_type="v_prediction" if prediction == "v" else "epsilon", **config)
    x_T = _rand(7)
    ts_ref, xs_ref = _ddim_loop_ref(ref, x_T, 10, toy_np)
    cond = {"emb": jnp.zeros((2, 4))}
    x0, traj = ddim_sample(toy_jax_noctx, sched, jnp.asarray(x_T), cond, None, num_steps=10,
                           prediction=prediction, return_trajectory=True, **config)
    np.testing.assert_array_equal(traj["timesteps"], ts_ref)
    np.testing.assert_allclose(np.asarray(traj["x"]), np.stack(xs_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x0), xs_ref[-1], rtol=1e-5, atol=1e-5)
    assert np.abs(xs_ref[-1] - x_T).max() > 0.1  # the loop actually moved


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_step_clipped_model_output_matches_diffusers(prediction):
    sched = NoiseSchedule.create("cosine", T)
    ref = _ddim_ref("cosine", prediction_type="v_prediction" if prediction == "v" else "epsilon",
                    clip_sample=True, clip_sample_range=1.0)
    ref.set_timesteps(20)
    x, out = _rand(14), 3.0 * _rand(15)  # large outputs: x0 is clipped at every step tested
    for t in (999, 600, 50):
        r = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), use_clipped_model_output=True)
        plain = ddim_step(sched, jnp.asarray(out), t, t - 50, jnp.asarray(x), prediction, clip_x0=1.0)[0]
        x_prev, x0 = ddim_step(sched, jnp.asarray(out), t, t - 50, jnp.asarray(x), prediction, clip_x0=1.0,
                               use_clipped_model_output=True)
        np.testing.assert_allclose(np.asarray(x_prev), r.prev_sample.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(x0), r.pred_original_sample.numpy(), rtol=1e-5, atol=1e-5)
        if t == 600:  # (at t = 999 abar ~ 0 and eps ~ x_t either way)
            assert np.abs(np.asarray(plain) - np.asarray(x_prev)).max() > 1e-2  # the option changes the step


def test_guidance_rescale_matches_diffusers():
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    sched = NoiseSchedule.create("scaled_linear", T)
    cond, uncond = _contexts()
    np_c, np_u = jax.tree.map(np.asarray, cond), jax.tree.map(np.asarray, uncond)
    w, phi = 4.0, 0.7

    def guided_np(x, t):
        out_c, out_u = toy_np(x, t, np_c), toy_np(x, t, np_u)
        g = torch.from_numpy(out_u + w * (out_c - out_u))
        return rescale_noise_cfg(g, torch.from_numpy(out_c), guidance_rescale=phi).numpy()

    ref = _ddim_ref(prediction_type="v_prediction", timestep_spacing="trailing")
    x_T = _rand(16)
    _, xs_ref = _ddim_loop_ref(ref, x_T, 10, guided_np)
    kw = {"num_steps": 10, "guidance": w, "prediction": "v", "timestep_spacing": "trailing"}
    x0 = ddim_sample(toy_jax, sched, jnp.asarray(x_T), cond, uncond, guidance_rescale=phi, **kw)
    np.testing.assert_allclose(np.asarray(x0), xs_ref[-1], rtol=1e-4, atol=1e-4)
    plain = ddim_sample(toy_jax, sched, jnp.asarray(x_T), cond, uncond, **kw)
    assert np.abs(np.asarray(plain) - np.asarray(x0)).max() > 1e-2


def _contexts():
    cond = {"emb": jnp.asarray(_rand(8, (2, 4))), "scale": jnp.array([1.0, 0.5])}
    uncond = {"emb": jnp.asarray(_rand(9, (2, 4))), "scale": jnp.array([0.3, 0.3])}
    return cond, uncond


def test_cfg_batched_call_equals_separate_calls_diffusers():
    sched = NoiseSchedule.create("scaled_linear", T)
    cond, uncond = _contexts()
    np_c, np_u = jax.tree.map(np.asarray, cond), jax.tree.map(np.asarray, uncond)
    w = 3.0

    def guided_np(x, t):
        out_c, out_u = toy_np(x, t, np_c), toy_np(x, t, np_u)
        return out_u + w * (out_c - out_u)

    ref = _ddim_ref(prediction_type="v_prediction")
    x_T = _rand(10)
    _, xs_ref = _ddim_loop_ref(ref, x_T, 10, guided_np)
    batches = []

    def spy(x, t, ctx):
        batches.append((x.shape[0], t.shape[0], ctx["emb"].shape[0]))
        return toy_jax(x, t, ctx)

    x0 = ddim_sample(spy, sched, jnp.asarray(x_T), cond, uncond, num_steps=10, guidance=w, prediction="v")
    np.testing.assert_allclose(np.asarray(x0), xs_ref[-1], rtol=1e-5, atol=1e-5)
    assert batches == [(4, 4, 4)]  # traced once, one call of batch 2B per step


def test_cfg_w1_is_conditional_and_w0_is_unconditional():
    sched = NoiseSchedule.create("scaled_linear", T)
    cond, uncond = _contexts()
    x_T = jnp.asarray(_rand(11))
    kw = {"num_steps": 8, "prediction": "epsilon"}
    only_c = ddim_sample(toy_jax, sched, x_T, cond, None, **kw)
    only_u = ddim_sample(toy_jax, sched, x_T, uncond, None, **kw)
    w1 = ddim_sample(toy_jax, sched, x_T, cond, uncond, guidance=1.0, **kw)
    w0 = ddim_sample(toy_jax, sched, x_T, cond, uncond, guidance=0.0, **kw)
    np.testing.assert_allclose(np.asarray(w1), np.asarray(only_c), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(w0), np.asarray(only_u), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(only_c) - np.asarray(only_u)).max() > 1e-2
    # per-sample guidance [B] equals running each w separately
    w_mix = ddim_sample(toy_jax, sched, x_T, cond, uncond, guidance=jnp.array([1.0, 0.0]), **kw)
    np.testing.assert_allclose(np.asarray(w_mix[0]), np.asarray(only_c[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(w_mix[1]), np.asarray(only_u[1]), rtol=1e-5, atol=1e-5)


def test_stochastic_ddim_deterministic_given_key_and_matches_diffusers():
    sched = NoiseSchedule.create("scaled_linear", T)
    cond, _ = _contexts()
    x_T = jnp.asarray(_rand(12))
    kw = {"num_steps": 5, "eta": 0.8, "prediction": "epsilon"}
    a = ddim_sample(toy_jax, sched, x_T, cond, None, key=jax.random.key(0), **kw)
    b = ddim_sample(toy_jax, sched, x_T, cond, None, key=jax.random.key(0), **kw)
    c = ddim_sample(toy_jax, sched, x_T, cond, None, key=jax.random.key(1), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
    with pytest.raises(ValueError, match="key"):
        ddim_sample(toy_jax, sched, x_T, cond, None, **kw)
    # documented noise: normal(split(key, S)[i]) at step i -> same result as diffusers with that noise
    keys = jax.random.split(jax.random.key(0), 5)
    noises = [np.array(jax.random.normal(k, SHAPE, jnp.float32)) for k in keys]
    np_c = jax.tree.map(np.asarray, cond)
    _, xs_ref = _ddim_loop_ref(_ddim_ref(), np.array(x_T), 5, lambda x, t: toy_np(x, t, np_c), 0.8, noises)
    np.testing.assert_allclose(np.asarray(a), xs_ref[-1], rtol=1e-5, atol=1e-5)


def test_params_argument_and_aux_recording():
    sched = NoiseSchedule.create("scaled_linear", T)
    cond, uncond = _contexts()
    x_T = jnp.asarray(_rand(13))

    def fn(params, x, t, ctx):
        return toy_jax(x, t, ctx) * params["gain"], {"t": t, "route": (t > 500).astype(jnp.int32)}

    kw = {"num_steps": 4, "guidance": 2.0}
    x0, traj = ddim_sample(fn, sched, x_T, cond, uncond, params={"gain": jnp.float32(1.0)}, has_aux=True,
                           return_trajectory=True, **kw)
    np.testing.assert_allclose(x0, ddim_sample(toy_jax, sched, x_T, cond, uncond, **kw), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(traj["timesteps"], [750, 500, 250, 0])
    np.testing.assert_array_equal(traj["prev_timesteps"], [500, 250, 0, -250])
    assert traj["aux"]["t"].shape == (4, 4) and traj["x0_pred"].shape == (4,) + SHAPE
    np.testing.assert_array_equal(traj["aux"]["t"][:, 0], [750, 500, 250, 0])
    np.testing.assert_array_equal(traj["aux"]["route"][:, 0], [1, 0, 0, 0])
