"""LoRA adapters: the weight-delta rule on every kernel layout, shardings, files and their errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raphael_jax.config import load_config
from raphael_jax.convert import lora_file
from raphael_jax.models import lora
from raphael_jax.models.raphael import build_model
from raphael_jax.parallel.sharding import variable_names


@pytest.fixture(scope="module")
def params():
    _, p = nnx.split(build_model(load_config("configs/tiny.py"), 0), nnx.Param)
    return p


def _leaf(tree, key):
    return lora._leaves(tree)[key]


def _random(adapters, seed=0):
    """The adapters with random (non-zero) B, so that they change the weights."""
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(adapters)))
    return {k: {"a": ab["a"].get_value(), "b": jax.random.normal(next(keys), ab["b"].shape) * 0.1}
            for k, ab in adapters.items()}


def test_targets_select_the_named_kernels(params):
    got = lora.matched_keys(params, ["attention", "experts", "gates", "convs"])
    assert "unet.down.3.attn_cross.q.kernel" in got and "unet.mid_attn.time_moe.experts.w2" in got
    assert "unet.down.3.space_moe.gate.fc1.kernel" in got and "unet.mid_res1.conv1.kernel" in got
    assert not any(k.startswith("text.") or k.endswith(".bias") or "edge_head" in k for k in got)
    assert lora.matched_keys(params, ["re:^unet\\.conv_out\\.kernel$"]) == ["unet.conv_out.kernel"]
    with pytest.raises(lora.LoraError, match="unknown target 'mlp'"):
        lora.matched_keys(params, ["mlp"])
    with pytest.raises(lora.LoraError, match="selects no parameter"):
        lora.matched_keys(params, ["re:^nothing$"])


def test_fresh_adapters_leave_the_model_unchanged(params):
    ad = lora.init_adapters(params, ["attention", "experts", "gates", "convs"], 4, jax.random.key(0))
    merged = lora.apply_lora(params, [(ad, 2.0)])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(a, b)
    assert all(float(jnp.abs(ab["a"].get_value()).sum()) > 0 for ab in ad.values())


def test_delta_per_layout(params):
    keys = ["unet.down.3.attn_cross.k.kernel", "unet.down.3.time_moe.experts.w1", "unet.mid_res1.conv1.kernel"]
    ad = _random(lora.init_adapters(params, ["attention", "experts", "convs"], 3, jax.random.key(1)))
    merged = lora.apply_lora(params, [(ad, 0.5)])
    dense, experts, conv = keys
    w = np.asarray(_leaf(params, dense).get_value())
    a, b = np.asarray(ad[dense]["a"]), np.asarray(ad[dense]["b"])
    np.testing.assert_allclose(_leaf(merged, dense).get_value(), w + 0.5 * a @ b, rtol=1e-5, atol=1e-6)
    w = np.asarray(_leaf(params, experts).get_value())
    a, b = np.asarray(ad[experts]["a"]), np.asarray(ad[experts]["b"])
    assert a.shape == (4, 64, 3) and b.shape == (4, 3, 128)
    for e in range(4):  # one independent adapter per expert
        np.testing.assert_allclose(_leaf(merged, experts).get_value()[e], w[e] + 0.5 * a[e] @ b[e],
                                   rtol=1e-5, atol=1e-6)
    # a conv adapter is a kh x kw conv into the rank followed by a 1x1 conv out of it (LoCon)
    w = _leaf(params, conv).get_value()
    a, b = ad[conv]["a"], ad[conv]["b"]
    x = jax.random.normal(jax.random.key(2), (1, 8, 8, w.shape[2]))
    dims = ("NHWC", "HWIO", "NHWC")
    conv2d = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dims)  # noqa: E731
    two_path = conv2d(x, w) + 0.5 * conv2d(conv2d(x, a), b[None, None])
    np.testing.assert_allclose(conv2d(x, _leaf(merged, conv).get_value()), two_path, rtol=1e-4, atol=1e-5)
    # two adapters add up; scale 0 is the base exactly
    twice = lora.apply_lora(params, [(ad, 0.25), (ad, 0.25)])
    np.testing.assert_allclose(_leaf(twice, dense).get_value(), _leaf(merged, dense).get_value(),
                               rtol=1e-6, atol=1e-7)
    zero = lora.apply_lora(params, [(ad, 0.0)])
    np.testing.assert_array_equal(_leaf(zero, dense).get_value(), _leaf(params, dense).get_value())


def test_adapters_carry_the_logical_names_of_their_kernel(params):
    ad = lora.init_adapters(params, ["attention", "experts", "convs"], 2, jax.random.key(0))
    for key, ab in ad.items():
        names = variable_names(_leaf(params, key))
        lead = 1 if ".experts." in key else 0
        assert variable_names(ab["a"]) == tuple(names[:-1]) + (None,), key
        assert variable_names(ab["b"]) == tuple(names[:lead]) + (None, names[-1]), key
    assert variable_names(ad["unet.mid_attn.space_moe.experts.w1"]["a"]) == ("expert", "embed", None)


def test_adapters_shard_like_their_kernels():
    """On a 2 x 2 (fsdp x tensor) mesh of CPU devices, A is split like W's input dim and B like its output."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    from raphael_jax.parallel.mesh import mesh_from_config
    from raphael_jax.parallel.rules import ShardingPlan
    from raphael_jax.parallel.sharding import tree_shardings

    cfg = load_config("configs/tiny.py", ["parallel.mesh.data=1", "parallel.mesh.fsdp=2", "parallel.mesh.tensor=2",
                                          "parallel.num_devices=4"])
    plan = ShardingPlan.from_config(cfg, mesh_from_config(cfg))
    _, p = nnx.split(nnx.eval_shape(lambda: build_model(cfg, 0)), nnx.Param)
    ad = jax.eval_shape(lambda: lora.init_adapters(p, ["experts"], 4, jax.random.key(0)))
    sh = tree_shardings(ad, plan)["unet.mid_attn.time_moe.experts.w1"]
    assert sh["a"].get_value().spec[1] is not None and sh["b"].get_value().spec[2] is not None


def test_save_load_roundtrip_and_errors(params, tmp_path):
    ad = _random(lora.init_adapters(params, ["attention", "gates"], 2, jax.random.key(3)))
    path = lora_file.save_adapters(ad, tmp_path / "a.safetensors", {"rank": 2, "alpha": 4.0, "targets": ["attention"]})
    back, meta = lora_file.load_adapters(path)
    assert meta == {"rank": 2, "alpha": 4.0, "targets": ["attention"]} and set(back) == set(ad)
    for k in ad:
        np.testing.assert_array_equal(back[k]["a"], ad[k]["a"])
        np.testing.assert_array_equal(back[k]["b"], ad[k]["b"])
    lora.check_fits(back, params, "a.safetensors")
    assert lora.adapter_scale(4.0, 2, 0.5) == 1.0 and lora.adapter_scale(0.0, 8) == 1.0
    assert lora.parse_lora_arg("x/a.safetensors:0.7") == ("x/a.safetensors", 0.7)
    assert lora.parse_lora_arg("C:/a.safetensors") == ("C:/a.safetensors", 1.0)
    # errors: not a file, truncated, not an adapter file, another model
    with pytest.raises(lora.LoraError, match="no such adapter file"):
        lora_file.load_adapters(tmp_path / "none.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(lora.LoraError, match="truncated or corrupt"):
        lora_file.load_adapters(cut)
    from safetensors.numpy import save_file
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(lora.LoraError, match="not a raphael_jax LoRA adapter file"):
        lora_file.load_adapters(tmp_path / "plain.safetensors")
    other = dict(back)
    k = "unet.down.3.attn_cross.q.kernel"
    other[k] = {"a": np.zeros((32, 2), np.float32), "b": back[k]["b"]}
    with pytest.raises(lora.LoraError, match="trained on another model"):
        lora.check_fits(other, params, "other.safetensors")
