"""Pooled-text conditioning of the ResBlocks (``model.text_temb``): off = no parameter, starts as a no-op,
carries the text into the ResBlocks once trained, and never reaches the time-MoE gates."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raphael_jax.config import load_config
from raphael_jax.models.routing import pop_intermediates
from raphael_jax.models.unet import RaphaelUNet

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
SMALL = ["model.channels=(16, 32)", "model.block_levels=(0, 1)", "model.self_attention_levels=(0, 0)",
         "model.head_dim=16", "model.context_dim=8", "text.width=8", "model.edge.enabled=False", "data.image_size=8"]


def _unet(text_temb, blocks=True):
    extra = [] if blocks else ["model.block_levels=(0, 0)", "model.mid_block=False"]
    cfg = load_config(os.path.join(CONFIGS, "tiny.py"), SMALL + extra + [f"model.text_temb={text_temb}"])
    return RaphaelUNet(cfg.model, rngs=nnx.Rngs(0))


def _run(unet, ctx, mask):
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    t = jnp.array([30, 700])
    out = unet(x, t, ctx, mask, with_edges=False)
    return out, pop_intermediates(unet)["time_route"]


def test_text_temb_off_has_no_parameter_and_on_starts_as_a_no_op():
    off, on = _unet(False), _unet(True)
    assert off.text_temb is None and on.text_temb is not None
    # same seed: the zero-initialised projection changes nothing at init (conv_out is zero too, so
    # compare the time embedding the ResBlocks see instead of the output)
    pooled = jnp.ones((2, 8))
    np.testing.assert_array_equal(np.asarray(on.text_temb(pooled)), np.zeros((2, on.text_temb.out_features)))


def _randomize(unet):
    if unet.text_temb is not None:
        unet.text_temb.kernel[...] = jax.random.normal(jax.random.key(3), unet.text_temb.kernel.shape)
    for m in (unet.up[0], unet.down[0]):  # open the zero-initialised second convs of two ResBlocks
        m.conv2.kernel[...] = 0.1 * jax.random.normal(jax.random.key(5), m.conv2.kernel.shape)
    unet.conv_out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(6), unet.conv_out.kernel.shape)


MASK = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
C1 = jax.random.normal(jax.random.key(4), (2, 4, 8))


def test_text_temb_carries_the_text_into_resblocks():
    off, on = _unet(False, blocks=False), _unet(True, blocks=False)  # no cross-attention anywhere
    _randomize(on)
    _randomize(off)
    c2 = C1.at[:, 0].add(3.0)
    assert float(jnp.abs(_run(on, C1, MASK)[0] - _run(on, c2, MASK)[0]).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(_run(off, C1, MASK)[0]), np.asarray(_run(off, c2, MASK)[0]))
    # padding is excluded from the pool: changing a padded token's state changes nothing
    c3 = C1.at[0, 3].add(5.0)
    np.testing.assert_allclose(np.asarray(_run(on, c3, MASK)[0]), np.asarray(_run(on, C1, MASK)[0]),
                               rtol=1e-5, atol=1e-6)


def test_text_temb_never_reaches_the_time_gates():
    unet = _unet(True)
    _randomize(unet)
    r1, r2 = _run(unet, C1, MASK)[1], _run(unet, C1 * 3.0 + 1.0, MASK)[1]
    assert len(r1) == unet.num_blocks > 0
    for a, b in zip(r1, r2, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
