"""Parity of the NNX (NHWC) AutoencoderKL port with diffusers (tiny random weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from raphael_jax.convert import convert, load_autoencoder, load_converted  # noqa: E402
from raphael_jax.models.autoencoder import AutoencoderKLConfig  # noqa: E402

TOL = 1e-4
AXES = {"conv_in", "conv_out", "norm", None}
NCHW_TO_NHWC = (0, 2, 3, 1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    pt = diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
    with torch.no_grad():  # GroupNorms start at 1/0: perturb everything so the mapping is exercised
        for p in pt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("vae")
    pt.save_pretrained(d, safe_serialization=True)
    return pt, d


@pytest.fixture(scope="module")
def data():
    rs = np.random.RandomState(0)
    x = rs.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)  # NCHW, as diffusers takes it
    z = rs.randn(2, 4, 16, 16).astype(np.float32)
    return x, z


def _nhwc(t):
    return np.asarray(t).transpose(NCHW_TO_NHWC)


def _err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_parity_with_diffusers(saved, data):
    pt, d = saved
    x, z = data
    model, cfg = load_autoencoder(d)
    assert cfg.block_out_channels == (16, 32) and cfg.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        dist = pt.encode(torch.tensor(x)).latent_dist
        dec = pt.decode(torch.tensor(z)).sample
    mean, logvar = jax.jit(lambda m, v: m.encode(v))(model, jnp.asarray(_nhwc(x)))
    recon = jax.jit(lambda m, v: m.decode(v))(model, jnp.asarray(_nhwc(z)))
    errs = {
        "mean": _err(mean, _nhwc(dist.mean)),
        "logvar": _err(logvar, _nhwc(dist.logvar)),
        "decode": _err(recon, _nhwc(dec)),
    }
    print(errs)
    assert mean.shape == (2, 16, 16, 4) and recon.shape == (2, 32, 32, 3)
    assert max(errs.values()) < TOL, errs


def test_latent_helpers_and_axes(saved, data):
    model, cfg = load_autoencoder(saved[1])
    x = jnp.asarray(_nhwc(data[0][:1, :, :16, :16]))  # small: these run eagerly
    mean, logvar = model.encode(x)
    key = jax.random.key(0)
    z = model.encode_to_latents(x, key)
    want = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)) * cfg.scaling_factor
    np.testing.assert_allclose(np.asarray(z), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.encode_to_latents(x)), np.asarray(mean * 0.18215), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(model.decode_latents(mean * cfg.scaling_factor)), np.asarray(model.decode(mean)), atol=1e-5
    )
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, path
        assert set(names) <= AXES, (path, names)


def test_legacy_attention_names_and_converter_round_trip(saved, data, tmp_path):
    """Old files name the mid-block attention query/key/value/proj_attn (here partly as 1x1 convs)."""
    pt, d = saved
    tensors = safetensors_numpy.load_file(str(d / "diffusion_pytorch_model.safetensors"))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in tensors.items():
        for new, name in old.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{name}.")
                if name == "query" and k.endswith("weight"):
                    v = v[:, :, None, None]
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    src = tmp_path / "legacy"
    src.mkdir()
    safetensors_numpy.save_file(legacy, str(src / "diffusion_pytorch_model.safetensors"))
    (src / "config.json").write_text((d / "config.json").read_text())
    ref, _ = load_autoencoder(d)
    x = jnp.asarray(_nhwc(data[0][:1, :, :16, :16]))  # small: these run eagerly
    want = ref(x)

    out = convert("vae", src, tmp_path / "out")
    restored, cfg = load_converted(out)
    assert isinstance(cfg, AutoencoderKLConfig) and cfg == ref.config
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(want))
