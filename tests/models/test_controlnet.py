"""ControlNet (paper App. 7.8): zero-init identity, residual plumbing, init from the U-Net, zero-conv gradients,
axis names, control images."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from PIL import Image

from raphael_jax.config import load_config
from raphael_jax.data.edges import canny
from raphael_jax.models.controlnet import CONTROL_ONLY, ControlNet, control_image, controlled_unet_apply, init_from_unet
from raphael_jax.models.raphael import build_model
from raphael_jax.parallel.rules import logical_to_spec, rules_from_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _perturb(state, seed, std):
    """Every leaf plus N(0, std^2) noise (numpy: a jitted version takes a minute to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + std * rng.standard_normal(x.shape, np.float32)),
                        state)


def _flat(state):
    return traverse_util.flatten_dict(nnx.to_pure_dict(state))


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(os.path.join(CONFIGS, "tiny.py"))
    model = build_model(cfg)
    # a "trained" U-Net: a fresh one has zero-init conv_out / proj_out / conv2 and outputs zeros for any
    # input, which would make every equality below trivially true
    nnx.update(model.unet, _perturb(nnx.state(model.unet, nnx.Param), 7, 0.05))
    b, s = 2, cfg.data.image_size
    x = jax.random.normal(jax.random.key(0), (b, s, s, cfg.model.in_channels))
    t = jnp.array([10, 900])
    tokens = jnp.zeros((b, cfg.text.max_len), jnp.int32).at[:, :4].set(jnp.array([[3, 4, 5, 1], [6, 7, 1, 0]]))
    mask = tokens > 0
    context = model.encode_text(tokens, mask)
    hint = jax.random.uniform(jax.random.key(1), (b, s, s, 1))
    cn = ControlNet.from_unet(model, rngs=nnx.Rngs(1))
    plain = model.unet(x, t, context, mask, with_edges=False)
    assert float(jnp.abs(plain).max()) > 0
    return dict(cfg=cfg, model=model, cn=cn, x=x, t=t, tokens=tokens, mask=mask, context=context, hint=hint,
                plain=plain)


def _perturbed_controlnet(cn):
    """The ControlNet with its zero convs (and the hint encoder's last conv) set to non-zero weights."""
    out = nnx.clone(cn)
    for i, m in enumerate([*out.zero_convs, out.mid_zero_conv, out.hint_encoder.conv_out]):
        k = jax.random.key(100 + i)
        m.kernel[...] = 0.1 * jax.random.normal(k, m.kernel.shape)
        m.bias[...] = 0.1 * jax.random.normal(jax.random.fold_in(k, 1), m.bias.shape)
    return out


def test_fresh_controlnet_leaves_the_unet_unchanged(setup):
    s = setup
    out = controlled_unet_apply(s["model"].unet, s["cn"], s["x"], s["t"], s["context"], s["mask"], s["hint"],
                                with_edges=False)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(s["plain"]))
    # a RaphaelModel with its text encoder: tokens in, the same output
    out = controlled_unet_apply(s["model"], s["cn"], s["x"], s["t"], s["tokens"], s["mask"], s["hint"],
                                with_edges=False)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(s["plain"]))


def test_zero_residuals_are_exactly_no_residuals(setup):
    s = setup
    down, mid = s["cn"](s["x"], s["t"], s["context"], s["mask"], s["hint"])
    # one residual per skip connection of the U-Net: conv_in + per level num_res_blocks + downsamples
    m = s["cfg"].model
    assert len(down) == 1 + len(m.channels) * m.num_res_blocks + len(m.channels) - 1
    unet = s["model"].unet
    zeros = [jnp.zeros_like(r) for r in down]
    out = unet(s["x"], s["t"], s["context"], s["mask"], with_edges=False, down_residuals=zeros,
               mid_residual=jnp.zeros_like(mid))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(s["plain"]))
    with pytest.raises(ValueError, match="one per skip"):
        unet(s["x"], s["t"], s["context"], s["mask"], with_edges=False, down_residuals=zeros[:-1])


def test_trained_zero_convs_change_the_output_and_scale_zero_restores_it(setup):
    s = setup
    cn = _perturbed_controlnet(s["cn"])
    args = (s["model"].unet, cn, s["x"], s["t"], s["context"], s["mask"])
    out = controlled_unet_apply(*args, s["hint"], with_edges=False)
    assert float(jnp.abs(out - s["plain"]).max()) > 1e-4
    other = controlled_unet_apply(*args, 1.0 - s["hint"], with_edges=False)
    assert float(jnp.abs(other - out).max()) > 1e-5  # the hint reaches the output
    down, mid = cn(s["x"], s["t"], s["context"], s["mask"], s["hint"], scale=0.5)
    full, mid1 = cn(s["x"], s["t"], s["context"], s["mask"], s["hint"])
    np.testing.assert_allclose(np.asarray(mid), 0.5 * np.asarray(mid1), rtol=1e-6, atol=1e-7)
    out0 = controlled_unet_apply(*args, s["hint"], 0.0, with_edges=False)
    np.testing.assert_array_equal(np.asarray(out0), np.asarray(s["plain"]))


def test_init_from_unet_copies_the_shared_subtrees(setup):
    s = setup
    unet_p = _flat(nnx.state(s["model"].unet, nnx.Param))
    cn_state = nnx.state(s["cn"], nnx.Param)
    cn_p = _flat(cn_state)
    shared = [p for p in cn_p if p[0] not in CONTROL_ONLY]
    assert {p[0] for p in shared} == {"temb_fc1", "temb_fc2", "conv_in", "text_temb", "down", "mid_res1",
                                      "mid_attn", "mid_res2"}
    assert not [p for p in cn_p if "edge_head" in p]  # no edge heads in the copy
    for p in shared:
        np.testing.assert_array_equal(np.asarray(cn_p[p]), np.asarray(unet_p[p]), err_msg="/".join(map(str, p)))
        assert cn_p[p] is not unet_p[p]  # fresh buffers
    for p in cn_p:
        if p[0] in ("zero_convs", "mid_zero_conv") or p[:2] == ("hint_encoder", "conv_out"):
            assert not np.asarray(cn_p[p]).any(), p
    # the pure function on a fresh ControlNet: shared sub-trees copied, the input state left alone
    fresh = nnx.state(ControlNet(s["cfg"].model, rngs=nnx.Rngs(3)), nnx.Param)
    before = _flat(fresh)
    copied = _flat(init_from_unet(fresh, nnx.state(s["model"], nnx.Param)))  # RaphaelModel state: its unet
    p = ("down", 0, "conv1", "kernel")
    assert not np.array_equal(np.asarray(before[p]), np.asarray(unet_p[p]))
    assert _flat(fresh)[p] is before[p]
    np.testing.assert_array_equal(np.asarray(copied[p]), np.asarray(unet_p[p]))
    np.testing.assert_array_equal(np.asarray(copied[("hint_encoder", "conv1", "kernel")]),
                                  np.asarray(before[("hint_encoder", "conv1", "kernel")]))
    # a ControlNet of another width does not take these weights
    other_cfg = load_config(os.path.join(CONFIGS, "tiny.py"), ["model.channels=(32, 64, 32)"])
    other = nnx.eval_shape(lambda: ControlNet(other_cfg.model, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="shape mismatch"):
        init_from_unet(nnx.state(other, nnx.Param), nnx.state(s["model"].unet, nnx.Param))


def test_zero_convs_get_gradients_at_init(setup):
    s = setup
    for m in (s["model"].unet, s["cn"]):
        nnx.pop(m, nnx.Intermediate)  # sown by the eager calls of the other tests
    gu, pu = nnx.split(s["model"].unet)
    gc, pc, rest = nnx.split(s["cn"], nnx.Param, ...)
    target = jax.random.normal(jax.random.key(5), s["x"].shape)

    @jax.jit
    def grad(pc, rest, pu):
        def loss(pc):
            unet, cn = nnx.merge(gu, pu), nnx.merge(gc, pc, rest)
            out = controlled_unet_apply(unet, cn, s["x"], s["t"], s["context"], s["mask"], s["hint"],
                                        with_edges=False)
            return jnp.mean((out - target) ** 2)
        return jax.grad(loss)(pc)

    g = _flat(grad(pc, rest, pu))
    zero_conv = [p for p in g if p[0] in ("zero_convs", "mid_zero_conv")]
    assert len(zero_conv) == 2 * (len(s["cn"].zero_convs) + 1)
    for p in zero_conv:
        assert float(jnp.abs(g[p]).sum()) > 0, p
    # ControlNet's property: with the zero convs at zero nothing else receives a gradient yet
    for p in g:
        if p not in zero_conv:
            assert not np.asarray(g[p]).any(), p


def test_every_controlnet_parameter_has_logical_axis_names(setup):
    cfg = setup["cfg"]
    abstract = nnx.eval_shape(lambda: ControlNet(cfg.model, control_channels=3, rngs=nnx.Rngs(0)))
    rules = rules_from_config(cfg)
    mesh = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    missing = []
    n = 0
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        where = "/".join(map(str, path))
        if names is None or len(names) != len(var.shape):
            missing.append(where)
            continue
        logical_to_spec(names, var.shape, mesh, rules, where=where)  # unknown names raise
        n += 1
    assert not missing, missing[:10]
    assert n > 50


def test_hint_factor_and_shape_checks(setup):
    s = setup
    cfg = s["cfg"].model
    # a latent-style hint at twice the sample resolution
    big = jnp.zeros((2, 64, 64, 1))
    down, mid = jax.eval_shape(
        lambda: ControlNet(cfg, hint_factor=2 * cfg.patch_size, rngs=nnx.Rngs(0))(
            s["x"], s["t"], s["context"], s["mask"], big))
    assert down[0].shape == (2, 16, 16, cfg.channels[0]) and mid.shape == (2, 4, 4, cfg.channels[-1])
    with pytest.raises(ValueError, match="does not match the sample"):
        s["cn"](s["x"], s["t"], s["context"], s["mask"], big)
    with pytest.raises(ValueError, match="expected"):
        s["cn"](s["x"], s["t"], s["context"], s["mask"], jnp.zeros((2, 32, 32, 3)))


def test_control_image_canny_map_and_bad_files(tmp_path):
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = (200, 50, 50)
    path = tmp_path / "square.png"
    Image.fromarray(img).save(path)
    edges = control_image(path, 32, 32, "canny", edge_fn=canny)
    assert edges.shape == (32, 32, 1) and edges.dtype == np.float32
    assert set(np.unique(edges)) == {0.0, 1.0}
    assert edges[..., 0][8:24, 8:24].sum() > 0 and edges[..., 0][12:20, 12:20].sum() == 0  # outline, not fill
    np.testing.assert_array_equal(control_image(img, 32, 32, "canny", edge_fn=canny), edges)  # arrays too
    grey = control_image(str(path), 16, 16, "map")
    assert grey.shape == (16, 16, 1) and 0 <= grey.min() and grey.max() <= 1
    assert grey[0, 0, 0] == 0 and grey[8, 8, 0] > 0
    with pytest.raises(ValueError, match="edge_fn"):
        control_image(path, 32, 32, "canny")
    with pytest.raises(ValueError, match="mode"):
        control_image(path, 32, 32, "hed")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match="broken.png") as e:
        control_image(bad, 32, 32, "canny", edge_fn=canny)
    assert "\n" not in str(e.value)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated.png"):
        control_image(truncated, 32, 32, "map")
    with pytest.raises(ValueError, match="missing.jpg"):
        control_image(tmp_path / "missing.jpg", 32, 32, "map")
