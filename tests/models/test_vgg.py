"""VGG19 features and the perceptual loss against a PyTorch transcription of torchvision's ``vgg19().features``
read the way basicsr's ``VGGFeatureExtractor`` / ``PerceptualLoss`` read it (Real-ESRGAN, Wang et al. 2021,
Sec. 4.1), on a narrow network (``width_divisor`` 8)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from raphael_jax.convert.safetensors_io import ConversionError, write_safetensors
from raphael_jax.convert.sr_weights import load_vgg19
from raphael_jax.models.vgg import (
    DEFAULT_LAYER_WEIGHTS,
    VGG19_NAMES,
    VGG19Features,
    perceptual_loss,
    random_vgg19,
)

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

DIV = 8
# basicsr's NAMES["vgg19"], written out independently of the module under test
BASICSR_NAMES = [
    "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
    "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "conv3_4", "relu3_4", "pool3",
    "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "conv4_4", "relu4_4", "pool4",
    "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "conv5_4", "relu5_4", "pool5",
]
CFG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class TorchVGG19(nn.Module):
    """torchvision's ``vgg19`` (``make_layers(cfgs["E"])``) with every width divided by ``div``."""

    def __init__(self, div: int):
        super().__init__()
        layers, c = [], 3
        for item in CFG_E:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, item // div, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c = item // div
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c * 4, 10), nn.ReLU(True), nn.Linear(10, 5))


def torch_features(vgg: TorchVGG19, x, names):
    """basicsr ``VGGFeatureExtractor.forward`` (use_input_norm=True, range_norm=False)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    out = {}
    last = max(BASICSR_NAMES.index(n) for n in names)
    for key, layer in zip(BASICSR_NAMES[: last + 1], vgg.features):
        x = layer(x)
        if key in names:
            out[key] = x.clone()
    return out


def torch_perceptual_loss(vgg, sr, hr, weights):
    """basicsr ``PerceptualLoss`` with criterion l1, perceptual_weight 1, style_weight 0."""
    xf = torch_features(vgg, sr, list(weights))
    gf = torch_features(vgg, hr.detach(), list(weights))
    return sum(F.l1_loss(xf[k], gf[k].detach()) * w for k, w in weights.items())


def _close(ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    err, scale = np.max(np.abs(ours - ref)), np.max(np.abs(ref))
    assert scale > 1e-3, f"reference too small to compare ({scale:.3g})"
    assert err <= tol * scale, f"max error {err:.3g}, max |ref| {scale:.3g}"


def _nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def torch_vgg(tmp_path_factory):
    torch.manual_seed(0)
    vgg = TorchVGG19(DIV).eval()
    for m in vgg.features:
        if isinstance(m, nn.Conv2d):  # He init (activations stay O(1) through 16 convs), nonzero biases
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.uniform_(m.bias, -0.1, 0.1)
    for p in vgg.parameters():
        p.requires_grad_(False)
    path = tmp_path_factory.mktemp("vgg") / "vgg19.safetensors"
    sd = {k: v.numpy().copy() for k, v in vgg.state_dict().items()}
    write_safetensors(sd, path)
    return vgg, sd, path


def test_layer_names_and_indices():
    assert list(VGG19_NAMES) == BASICSR_NAMES
    torch_convs = [i for i, m in enumerate(TorchVGG19(16).features) if isinstance(m, nn.Conv2d)]
    assert torch_convs == [i for i, n in enumerate(VGG19_NAMES) if n.startswith("conv")]
    assert torch_convs == [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]


def test_features_and_loss_match_torch(torch_vgg):
    vgg_t, _, path = torch_vgg
    vgg = load_vgg19(path, width_divisor=DIV)
    assert vgg.layers == tuple(DEFAULT_LAYER_WEIGHTS)
    torch.manual_seed(1)
    hr = torch.rand(2, 3, 32, 32)
    sr = (hr + 0.1 * torch.randn(2, 3, 32, 32)).clamp(0, 1).requires_grad_(True)

    want = torch_features(vgg_t, sr.detach(), list(DEFAULT_LAYER_WEIGHTS))
    got = nnx.jit(lambda m, x: m(x))(vgg, _nhwc(sr))
    assert set(got) == set(want)
    for name in want:
        _close(got[name], want[name].numpy().transpose(0, 2, 3, 1))

    loss_t = torch_perceptual_loss(vgg_t, sr, hr, DEFAULT_LAYER_WEIGHTS)
    loss_t.backward()
    loss, grad = nnx.jit(lambda m, a, b: jax.value_and_grad(lambda s: perceptual_loss(m, s, b))(a))(
        vgg, _nhwc(sr), _nhwc(hr))
    assert float(loss_t.detach()) > 0.01
    assert float(loss) == pytest.approx(float(loss_t.detach()), rel=1e-4)
    _close(grad, sr.grad.numpy().transpose(0, 2, 3, 1))


def test_truncated_network_loads_full_file_and_stops_early(torch_vgg):
    vgg_t, _, path = torch_vgg
    vgg = load_vgg19(path, width_divisor=DIV, layers=("relu2_1", "pool1"))
    assert sorted(vgg.features.keys(), key=int) == ["0", "2", "5"]  # conv1_1, conv1_2, conv2_1 only
    x = torch.rand(1, 3, 16, 16)
    want = torch_features(vgg_t, x, ["relu2_1", "pool1"])
    got = nnx.jit(lambda m, a: m(a))(vgg, _nhwc(x))
    for name in ("relu2_1", "pool1"):
        _close(got[name], want[name].numpy().transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="conv5_4"):
        perceptual_loss(vgg, _nhwc(x), _nhwc(x))


def test_loading_errors_name_every_tensor(torch_vgg, tmp_path):
    sd = dict(torch_vgg[1])
    del sd["features.7.bias"]
    sd["features.10.weight"] = np.zeros((256 // DIV, 128 // DIV, 1, 1), np.float32)
    sd["features.3.weight"] = np.zeros((4,), np.float32)  # a ReLU has no weight: not silently ignored
    path = tmp_path / "bad.safetensors"
    write_safetensors(sd, path)
    with pytest.raises(ConversionError) as info:
        load_vgg19(path, width_divisor=DIV)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "3 problem(s)" in msg
    assert "features.7.bias" in msg and "missing" in msg
    assert "features.10.weight: expected [32, 16, 3, 3], found [32, 16, 1, 1]" in msg
    assert "features.3.weight" in msg and "unexpected" in msg
    assert "classifier" not in msg
    # the full-width network does not take the narrow file: every conv is named
    with pytest.raises(ConversionError, match=r"features\.34\.weight"):
        load_vgg19(torch_vgg[2], width_divisor=1)
    with pytest.raises(ConversionError, match="never unpickles"):
        load_vgg19(tmp_path / "vgg19-dcbb9e9d.pth")
    with pytest.raises(ConversionError, match="no such file"):
        load_vgg19(tmp_path / "absent.safetensors")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown layer"):
        VGG19Features(("conv6_1",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="width_divisor"):
        VGG19Features(width_divisor=3, rngs=nnx.Rngs(0))


def test_random_vgg19_is_a_frozen_he_normal_stand_in():
    layers = ("conv1_2", "conv2_2")
    vgg = random_vgg19(seed=0, width_divisor=DIV, layers=layers)
    again = random_vgg19(seed=0, width_divisor=DIV, layers=layers)
    other = random_vgg19(seed=1, width_divisor=DIV, layers=layers)
    k = np.asarray(vgg.features["7"].kernel[...])  # 3x3, 16 -> 16: fan_in 144
    np.testing.assert_array_equal(k, again.features["7"].kernel[...])
    assert not np.allclose(k, other.features["7"].kernel[...])
    assert k.std() == pytest.approx(np.sqrt(2.0 / 144), rel=0.1)
    assert not np.any(np.asarray(vgg.features["7"].bias[...]))

    weights = {"conv1_2": 0.1, "conv2_2": 1.0}
    hr = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3))
    sr = jnp.clip(hr + 0.05, 0, 1)
    fn = nnx.jit(nnx.value_and_grad(lambda m, a, b: perceptual_loss(m, a, b, weights)))
    zero, _ = fn(vgg, hr, hr)
    loss, grads = fn(vgg, sr, hr)
    assert float(zero) == 0.0 and float(loss) > 0.0
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))  # VGG weights never train
