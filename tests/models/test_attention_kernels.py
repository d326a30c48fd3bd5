"""The attention kernels (raphael_jax/models/attention_kernels.py) against the materialised ``xla`` form.

``chunked``, ``blocked`` and the Pallas TPU ``flash`` kernel (in Pallas' TPU interpret mode on CPU) must give the
same outputs, head-averaged maps and gradients as ``xla``; ``chunked`` must also bound the compiled
memory of a training step; the U-Net must give the same output with either kernel. ``cudnn`` needs an
NVIDIA GPU: here only its selection is tested (bench/gpu.py checks its values on a GPU).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raphael_jax.config import ATTENTION_IMPLS, ConfigError, load_config
from raphael_jax.models import attention_kernels
from raphael_jax.models.attention_kernels import dot_product_attention, resolve_impl
from raphael_jax.models.unet import RaphaelUNet

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _qkv(b, n, n_kv, h, d, seed=0, mask_frac=None):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(b, n, h, d).astype(np.float32))
    k, v = (jnp.asarray(r.randn(b, n_kv, h, d).astype(np.float32)) for _ in range(2))
    mask = None
    if mask_frac is not None:
        m = r.rand(b, n_kv) > mask_frac
        m[:, 0] = True  # every row keeps a real token
        mask = jnp.asarray(m)
    return q, k, v, mask


def _reference(q, k, v, mask):
    """Softmax attention in float64 NumPy: the independent reference."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bnhd,blhd->bhnl", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(np.asarray(mask)[:, None, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhnl,blhd->bnhd", p, v), p.mean(1)


@pytest.mark.parametrize("n, n_kv, chunk, masked", [(50, 50, 16, False), (37, 7, 8, True), (64, 64, 64, True)])
def test_chunked_equals_xla_and_reference(n, n_kv, chunk, masked):
    q, k, v, mask = _qkv(2, n, n_kv, 3, 8, mask_frac=0.3 if masked else None)
    want_out, want_map = _reference(q, k, v, mask)
    for impl in ("xla", "chunked"):
        out, probs = dot_product_attention(q, k, v, mask, impl=impl, chunk=chunk, need_map=True)
        np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(probs), want_map, atol=1e-6, rtol=1e-4)
        assert dot_product_attention(q, k, v, mask, impl=impl, chunk=chunk)[1] is None

    def loss(impl, q, k, v):
        out, probs = dot_product_attention(q, k, v, mask, impl=impl, chunk=chunk, need_map=True)
        return jnp.sum(jnp.sin(out)) + jnp.sum(probs * jnp.arange(n_kv))  # the map's gradient flows too

    g_xla = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    g_chk = jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_chk, g_xla, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype, chunk", [(jnp.float32, 1024), (jnp.float32, 8), (jnp.bfloat16, 1024)])
def test_blocked_equals_reference_and_xla_gradients(dtype, chunk):
    # chunk 8: 37 queries in 5 blocks (the last padded) per (batch, head) pair
    q, k, v, mask = _qkv(2, 37, 19, 3, 8, seed=2, mask_frac=0.3)
    mask = mask.at[1, :].set(False)  # a sample with no real key: uniform rows, and no gradient to its keys
    want_out, _ = _reference(q, k, v, mask.at[1, :].set(True))
    want_out[1] = np.asarray(v[1], np.float64).mean(0)  # no key: the uniform average, as ``xla`` gives
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    out, probs = dot_product_attention(q, k, v, mask, impl="blocked", chunk=chunk)
    assert probs is None and out.dtype == dtype
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), want_out, atol=tol, rtol=tol)
    for m in (mask, None):
        def loss(impl, q, k, v, m=m):
            out = dot_product_attention(q, k, v, m, impl=impl, chunk=chunk)[0]
            return jnp.sum(jnp.sin(out.astype(jnp.float32)))

        g_blk = jax.grad(lambda *a: loss("blocked", *a), argnums=(0, 1, 2))(q, k, v)
        g_xla = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
        assert max(float(jnp.abs(g.astype(jnp.float32)).max()) for g in g_xla) > 1e-2
        for a, b in zip(g_blk, g_xla, strict=True):
            assert a.dtype == dtype
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)


def _temp_bytes(impl, n, chunk):
    q, k, v, _ = _qkv(4, n, n, 2, 16)

    def step(q, k, v):
        return jax.grad(lambda q: jnp.sum(dot_product_attention(q, k, v, impl=impl, chunk=chunk)[0] ** 2))(q)

    return jax.jit(step).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes


def test_chunked_bounds_the_training_memory():
    # the materialised probabilities of one forward+backward: 4 x 2 x 2048 x 2048 float32 = 128 MiB each
    n, chunk = 2048, 128
    full, chunked = _temp_bytes("xla", n, chunk), _temp_bytes("chunked", n, chunk)
    blocked = _temp_bytes("blocked", n, chunk)
    one_map = 4 * 2 * n * n * 4
    assert full >= one_map, (full, one_map)
    assert chunked < one_map / 4, (chunked, one_map)
    assert blocked < 3 * one_map / 8, (blocked, one_map)  # a few maps of one (batch, head) pair of the 8


@pytest.mark.parametrize("masked", [False, True])
def test_flash_pallas_interpret_equals_xla(masked):
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, mask = _qkv(2, 128, 128, 2, 16, seed=1, mask_frac=0.3 if masked else None)
    want_out, _ = _reference(q, k, v, mask)

    def loss(impl, q, k, v):
        return jnp.sum(jnp.sin(dot_product_attention(q, k, v, mask, impl=impl, platform="cpu")[0]))

    with pltpu.force_tpu_interpret_mode():
        out, probs = dot_product_attention(q, k, v, mask, impl="flash", platform="cpu")
        g_flash = jax.grad(lambda *a: loss("flash", *a), argnums=(0, 1, 2))(q, k, v)
    assert probs is None
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5, rtol=1e-4)
    g_xla = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_flash, g_xla, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def test_implementation_selection():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert resolve_impl("auto", f32, "cpu") == "blocked"
    assert resolve_impl("auto", f32, "cpu", map_size=128 * 128) == "blocked"
    assert resolve_impl("auto", f32, "cpu", map_size=64 * 64) == "xla"  # small maps: the loop costs more
    assert resolve_impl("auto", f32, "cpu", need_map=True) == "xla"  # cross-attention keeps M
    assert resolve_impl("blocked", f32, "cpu", need_map=True) == "chunked"
    assert resolve_impl("blocked", bf16, "gpu") == "blocked"  # runs anywhere
    assert resolve_impl("auto", bf16, "gpu") == "cudnn"
    assert resolve_impl("auto", f32, "gpu") == "xla"           # cuDNN's flash kernel takes 16-bit inputs
    assert resolve_impl("auto", f32, "tpu") == "flash"
    assert resolve_impl("cudnn", bf16, "gpu", need_map=True) == "chunked"  # cross-attention keeps M
    assert resolve_impl("flash", f32, "tpu", need_map=True) == "chunked"
    assert resolve_impl("xla", f32, "tpu", need_map=True) == "xla"
    assert resolve_impl("chunked", f32, "cpu") == "chunked"
    with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU; this backend is 'cpu'"):
        resolve_impl("cudnn", bf16, "cpu")
    with pytest.raises(ValueError, match="needs bfloat16 or float16"):
        resolve_impl("cudnn", f32, "gpu")
    with pytest.raises(ValueError, match="Pallas TPU kernel; this backend is 'gpu'"):
        resolve_impl("flash", bf16, "gpu")
    with pytest.raises(ValueError, match="model.attention must be one of"):
        resolve_impl("splash", f32, "cpu")
    # key lengths the TPU kernel cannot tile (not a multiple of 128) run chunked, with the same values
    q, k, v, _ = _qkv(1, 20, 20, 2, 8)
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, impl="flash", platform="cpu")[0]),
                               _reference(q, k, v, None)[0], atol=2e-5, rtol=1e-4)
    assert ATTENTION_IMPLS == attention_kernels.ATTENTION_IMPLS  # the config validates what the models run


SMALL = ["model.channels=(16, 32)", "model.block_levels=(1, 1)", "model.self_attention_levels=(1, 1)",
         "model.head_dim=8", "model.context_dim=8", "text.width=8", "data.image_size=8"]


def test_unet_same_output_with_chunked_attention():
    from raphael_jax.models.attention import Attention

    cfg = load_config(os.path.join(CONFIGS, "tiny.py"), SMALL + ["model.attention=chunked", "model.attention_chunk=5"])
    unet = RaphaelUNet(cfg.model, rngs=nnx.Rngs(0))
    unet.conv_out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(6), unet.conv_out.kernel.shape)
    attention = [m for _, m in nnx.iter_graph(unet) if isinstance(m, Attention)]
    assert len(attention) >= 4 and all(m.impl == "chunked" and m.chunk == 5 for m in attention)  # config -> modules
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    ctx = jax.random.normal(jax.random.key(4), (2, 4, 8))
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    outs = []
    for impl in ("chunked", "xla"):
        for m in attention:
            m.impl = impl
        graphdef, state = nnx.split(unet)
        run = jax.jit(lambda s, x, c, m, g=graphdef: nnx.merge(g, s)(x, jnp.array([30, 700]), c, m, with_edges=True)[0])
        outs.append(np.asarray(run(state, x, ctx, mask)))
    assert np.abs(outs[1]).max() > 1e-3
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_config_rejects_unknown_attention():
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(os.path.join(CONFIGS, "tiny.py"), ["model.attention=splash"])


def test_remat_policies_same_gradients_and_really_remat():
    from raphael_jax.models.unet import remat_policy

    cfg = load_config(os.path.join(CONFIGS, "tiny.py"), SMALL + ["model.remat=dots"])
    unet = RaphaelUNet(cfg.model, rngs=nnx.Rngs(0))
    assert unet.remat and unet.remat_policy is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    unet.conv_out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(6), unet.conv_out.kernel.shape)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    ctx = jax.random.normal(jax.random.key(4), (2, 4, 8))
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    grads, jaxprs = {}, {}
    for name in ("none", "full", "dots"):
        unet.remat, unet.remat_policy = remat_policy(name)
        graphdef, params, rest = nnx.split(unet, nnx.Param, ...)

        def loss(p, rest, g=graphdef):
            out = nnx.merge(g, p, rest)(x, jnp.array([30, 700]), ctx, mask, key=jax.random.key(3), with_edges=False)
            return jnp.sum(out ** 2)

        jaxprs[name] = str(jax.make_jaxpr(loss)(params, rest))  # the forward keeps the remat and its policy
        if name != "dots":  # (one compile fewer: dots differs from full only in what it keeps)
            grads[name] = jax.tree.leaves(jax.jit(jax.grad(loss))(params, rest))
    assert "remat" not in jaxprs["none"] and "checkpoint" not in jaxprs["none"]
    for name in ("full", "dots"):
        assert "remat" in jaxprs[name] or "checkpoint" in jaxprs[name]
    assert "DotsSaveable" in jaxprs["dots"] and "DotsSaveable" not in jaxprs["full"]
    for a, b in zip(grads["none"], grads["full"]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    assert max(float(jnp.abs(g).max()) for g in grads["none"]) > 1e-3
    assert remat_policy(True) == remat_policy("full") and remat_policy(False) == (False, None)  # runs saved before
    # inference (no key) runs the plain blocks, also inside a scan over closed-over weights (the DDIM loop)
    graphdef, state = nnx.split(unet)
    t = jnp.array([30, 700])
    step = lambda c, _: (c + 0.1 * nnx.merge(graphdef, state)(c, t, ctx, mask, with_edges=False), None)
    assert np.isfinite(np.asarray(jax.jit(lambda x: jax.lax.scan(step, x, None, length=2)[0])(x))).all()


def test_config_remat_values():
    from raphael_jax import config
    from raphael_jax.models import unet

    assert tuple(unet.REMAT_POLICIES) == config.REMAT_POLICIES  # models may not import the config module
    load_config(os.path.join(CONFIGS, "tiny.py"), ["model.remat=full"])
    with pytest.raises(ConfigError, match="model.remat"):
        load_config(os.path.join(CONFIGS, "tiny.py"), ["model.remat=True"])  # a string field: the raw text
