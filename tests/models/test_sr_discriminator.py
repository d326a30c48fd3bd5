"""Real-ESRGAN's U-Net discriminator with spectral norm against a PyTorch transcription of basicsr's
``UNetDiscriminatorSN`` (Real-ESRGAN, Wang et al. 2021, Sec. 3.2): outputs, the power iteration's vectors,
gradients, bilinear upsampling and loading errors."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raphael_jax.convert.safetensors_io import ConversionError, abstract_module, write_safetensors
from raphael_jax.convert.sr_weights import import_discriminator, load_discriminator
from raphael_jax.models.sr_discriminator import (
    SPECTRAL_LAYERS,
    SpectralConv,
    SpectralState,
    UNetDiscriminatorConfig,
    UNetDiscriminatorSN,
    upsample_bilinear_x2,
)

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

NUM_FEAT = 8


class TorchUNetDiscriminatorSN(nn.Module):
    """basicsr / Real-ESRGAN ``UNetDiscriminatorSN``, transcribed."""

    def __init__(self, num_in_ch=3, num_feat=64, skip_connection=True):
        super().__init__()
        self.skip_connection = skip_connection
        sn = nn.utils.spectral_norm
        self.conv0 = nn.Conv2d(num_in_ch, num_feat, kernel_size=3, stride=1, padding=1)
        self.conv1 = sn(nn.Conv2d(num_feat, num_feat * 2, 4, 2, 1, bias=False))
        self.conv2 = sn(nn.Conv2d(num_feat * 2, num_feat * 4, 4, 2, 1, bias=False))
        self.conv3 = sn(nn.Conv2d(num_feat * 4, num_feat * 8, 4, 2, 1, bias=False))
        self.conv4 = sn(nn.Conv2d(num_feat * 8, num_feat * 4, 3, 1, 1, bias=False))
        self.conv5 = sn(nn.Conv2d(num_feat * 4, num_feat * 2, 3, 1, 1, bias=False))
        self.conv6 = sn(nn.Conv2d(num_feat * 2, num_feat, 3, 1, 1, bias=False))
        self.conv7 = sn(nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False))
        self.conv8 = sn(nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False))
        self.conv9 = nn.Conv2d(num_feat, 1, 3, 1, 1)

    def forward(self, x):
        lrelu = lambda t: F.leaky_relu(t, negative_slope=0.2, inplace=True)  # noqa: E731
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
        x0 = lrelu(self.conv0(x))
        x1 = lrelu(self.conv1(x0))
        x2 = lrelu(self.conv2(x1))
        x3 = lrelu(self.conv3(x2))
        x4 = lrelu(self.conv4(up(x3)))
        if self.skip_connection:
            x4 = x4 + x2
        x5 = lrelu(self.conv5(up(x4)))
        if self.skip_connection:
            x5 = x5 + x1
        x6 = lrelu(self.conv6(up(x5)))
        if self.skip_connection:
            x6 = x6 + x0
        out = lrelu(self.conv7(x6))
        out = lrelu(self.conv8(out))
        return self.conv9(out)


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _close(ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    err, scale = np.max(np.abs(ours - ref)), np.max(np.abs(ref))
    assert scale > 1e-3, f"reference too small to compare ({scale:.3g})"
    assert err <= tol * scale, f"max error {err:.3g}, max |ref| {scale:.3g}"


def _nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def pair():
    """A torch discriminator after two training forwards (u, v no longer their random start) and its state."""
    torch.manual_seed(0)
    ref = TorchUNetDiscriminatorSN(3, NUM_FEAT, skip_connection=True)
    ref.train()
    with torch.no_grad():
        for _ in range(2):
            ref(torch.rand(1, 3, 32, 32))
    x = torch.rand(2, 3, 32, 32)
    return ref, _state(ref), x


_forward = nnx.jit(lambda model, x, update: model(x, update_stats=update), static_argnums=2)


def test_state_dict_names_are_basicsr_ones(pair):
    _, sd, _ = pair
    expected = {"conv0.weight", "conv0.bias", "conv9.weight", "conv9.bias"}
    expected |= {f"{layer}.weight_{s}" for layer in SPECTRAL_LAYERS for s in ("orig", "u", "v")}
    assert set(sd) == expected


def test_eval_mode_matches_torch_and_keeps_u(pair):
    ref, sd, x = pair
    model = import_discriminator(sd)
    assert model.config == UNetDiscriminatorConfig(3, NUM_FEAT, True)
    ref.eval()
    with torch.no_grad():
        want = ref(x.clone())
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, SpectralState))}
    got = _forward(model, _nhwc(x), False)
    assert got.shape == (2, 32, 32, 1)
    _close(got, want.numpy().transpose(0, 2, 3, 1))
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, SpectralState))}
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v)
    # torch's eval forward left its vectors alone too, so both still hold the loaded ones
    np.testing.assert_array_equal(ref.conv3.weight_u.numpy(), sd["conv3.weight_u"])


def test_training_forward_matches_torch_output_vectors_and_grads(pair):
    _, sd, x = pair
    ref = TorchUNetDiscriminatorSN(3, NUM_FEAT)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    ref.train()
    out = ref(x.clone())
    out.square().sum().backward()
    model = import_discriminator(sd)

    def loss(m, xx):
        y = m(xx, update_stats=True)
        return jnp.sum(jnp.square(y)), y

    (_, got), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model, _nhwc(x))
    _close(got, out.detach().numpy().transpose(0, 2, 3, 1))
    for layer in sorted(SPECTRAL_LAYERS):
        mod = getattr(model, layer)
        # the power iteration ran once and was stored, exactly as torch's forward pre-hook did
        assert not np.allclose(np.asarray(mod.u[...]), sd[f"{layer}.weight_u"], atol=1e-6), layer
        _close(mod.u[...], getattr(ref, layer).weight_u.numpy(), 1e-5)
        _close(mod.v[...], getattr(ref, layer).weight_v.numpy(), 1e-5)
        # d loss / d weight_orig, including the path through sigma = u^T W v (u, v constant)
        _close(grads[layer]["kernel"][...], getattr(ref, layer).weight_orig.grad.numpy().transpose(2, 3, 1, 0))
    _close(grads["conv0"]["kernel"][...], ref.conv0.weight.grad.numpy().transpose(2, 3, 1, 0))
    _close(grads["conv9"]["bias"][...], ref.conv9.bias.grad.numpy())
    assert "u" not in grads["conv1"]  # spectral state is not differentiated


def test_no_skip_connection_matches_torch():
    torch.manual_seed(1)
    ref = TorchUNetDiscriminatorSN(3, NUM_FEAT, skip_connection=False)
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        ref(x.clone())  # one training forward: u, v away from their random start (sigma not ~0)
        want = ref.eval()(x.clone())
    model = import_discriminator(_state(ref), UNetDiscriminatorConfig(3, NUM_FEAT, skip_connection=False))
    _close(_forward(model, _nhwc(x), False), want.numpy().transpose(0, 2, 3, 1))


def test_train_eval_switch_controls_updates(pair):
    _, sd, x = pair
    model = import_discriminator(sd)
    u0 = np.asarray(model.conv2.u[...])
    model.eval()
    _forward(model, _nhwc(x)[:1], None)
    np.testing.assert_array_equal(model.conv2.u[...], u0)
    model.train()
    _forward(model, _nhwc(x)[:1], None)
    assert not np.allclose(model.conv2.u[...], u0, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 5, 3, 7), (1, 2, 1, 6)])
def test_upsample_bilinear_matches_torch(shape):
    x = torch.randn(*shape)
    want = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    got = upsample_bilinear_x2(_nhwc(x))
    np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)


def test_spectral_norm_converges_to_largest_singular_value():
    layer = SpectralConv(8, 16, 3, rngs=nnx.Rngs(3))
    assert float(jnp.linalg.norm(layer.u[...])) == pytest.approx(1.0, rel=1e-6)  # normalize(randn), as torch
    w_mat = np.asarray(layer.weight_matrix(), np.float64)
    top = np.linalg.svd(w_mat, compute_uv=False)[0]
    step = nnx.jit(lambda m: m.normalized_kernel(update_stats=True)[1])
    first = float(step(layer))
    assert abs(first - top) / top > 1e-2  # one step from a random u is not there yet: the test can fail
    u_before = np.asarray(layer.u[...])
    frozen = nnx.jit(lambda m: m.normalized_kernel(update_stats=False)[1])
    for _ in range(5):
        assert float(frozen(layer)) == pytest.approx(float(frozen(layer)), rel=0, abs=0)
    np.testing.assert_array_equal(layer.u[...], u_before)  # eval mode never moves u
    for _ in range(300):
        sigma = float(step(layer))
    assert abs(sigma - top) / top < 1e-3
    kernel, _ = layer.normalized_kernel(update_stats=False)
    normalized = np.asarray(kernel).transpose(3, 2, 0, 1).reshape(16, -1)
    assert np.linalg.svd(normalized, compute_uv=False)[0] == pytest.approx(1.0, rel=1e-3)


def test_rejects_sizes_not_divisible_by_8(pair):
    model = import_discriminator(pair[1])
    with pytest.raises(ValueError, match="divisible by 8"):
        model(jnp.zeros((1, 20, 32, 3)), update_stats=False)


def test_loading_errors_name_every_tensor(pair):
    sd = dict(pair[1])
    del sd["conv3.weight_u"]
    sd["conv5.weight_orig"] = np.zeros((2 * NUM_FEAT, 4 * NUM_FEAT, 4, 4), np.float32)
    sd["conv10.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ConversionError) as info:
        import_discriminator(sd)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "3 problem(s)" in msg
    assert "conv3.weight_u" in msg and "missing" in msg
    assert "conv5.weight_orig" in msg and "expected [16, 32, 3, 3], found [16, 32, 4, 4]" in msg
    assert "conv10.weight" in msg and "unexpected" in msg


def test_load_from_safetensors(pair, tmp_path):
    _, sd, x = pair
    path = tmp_path / "netD.safetensors"
    write_safetensors(sd, path)
    model = load_discriminator(path, update_stats=False)
    _close(_forward(model, _nhwc(x), False), _forward(import_discriminator(sd), _nhwc(x), False), 1e-6)
    with pytest.raises(ConversionError, match="no such file"):
        load_discriminator(tmp_path / "absent.safetensors")


def test_fresh_model_structure():
    """Built abstractly (no compile): kernels are Params with the conv axis names, u / v are SpectralState."""
    model = abstract_module(lambda: UNetDiscriminatorSN(UNetDiscriminatorConfig(num_feat=4), rngs=nnx.Rngs(0)))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert params[("conv3", "kernel")].shape == (4, 4, 16, 32)
    assert params[("conv3", "kernel")].out_sharding == (None, None, "conv_in", "conv_out")
    assert ("conv3", "bias") not in params and ("conv9", "bias") in params
    spectral = dict(nnx.to_flat_state(nnx.state(model, SpectralState)))
    assert {p[0] for p in spectral} == set(SPECTRAL_LAYERS)
    assert spectral[("conv3", "v")].shape == (16 * 4 * 4,) and spectral[("conv3", "u")].shape == (32,)
