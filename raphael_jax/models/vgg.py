"""VGG19 feature maps and the perceptual loss of ESRGAN / Real-ESRGAN, in Flax NNX.

The perceptual loss (Johnson et al., "Perceptual Losses for Real-Time Style Transfer and Super-Resolution",
2016; ESRGAN, Wang et al. 2018, Sec. 3.3, which takes the features *before* the ReLU) compares a
super-resolved image and its ground truth in the feature space of an ImageNet-trained VGG19 (Simonyan &
Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", 2015, configuration E,
no batch norm). Real-ESRGAN (Wang et al. 2021, Sec. 4.1) uses basicsr's ``PerceptualLoss`` with the
pre-activation maps ``conv1_2, conv2_2, conv3_4, conv4_4, conv5_4`` weighted ``{0.1, 0.1, 1, 1, 1}``, an L1
distance, inputs in [0, 1] normalised by the ImageNet mean / std, and loss weight 1.0
(:data:`DEFAULT_LAYER_WEIGHTS`, :func:`perceptual_loss`).

:class:`VGG19Features` mirrors torchvision's ``vgg19().features`` Sequential: the conv at index ``i`` is
``features / "i"`` here and ``features.{i}.weight`` / ``.bias`` there (convs at 0, 2, 5, 7, 10, 12, 14,
16, 19, 21, 23, 25, 28, 30, 32, 34; ReLUs after each; 2x2 max pools at 4, 9, 18, 27, 36), so torchvision's
ImageNet weights load by name (:func:`raphael_jax.convert.sr_weights.load_vgg19`). Only the layers up to
the deepest requested one exist and run (as basicsr's ``VGGFeatureExtractor``). Layers are named as
basicsr names them (``conv3_4``, ``relu3_4``, ``pool3``, ...); images are NHWC.

:func:`random_vgg19` builds the same network with random He-normal weights. It is an explicit stand-in for
runs without a pretrained VGG19 (random conv features still measure local structure, but they are not the
loss the paper trains with); nothing here falls back to it silently.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from raphael_jax.models.layers import conv

__all__ = ["DEFAULT_LAYER_WEIGHTS", "IMAGENET_MEAN", "IMAGENET_STD", "VGG19_NAMES", "VGG19Features",
           "perceptual_loss", "random_vgg19"]

#: VGG19 configuration E: output channels of each conv, ``"M"`` for a 2x2 max pool (torchvision's ``cfgs["E"]``).
_CFG_E = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def _names() -> tuple[str, ...]:
    names, block, idx = [], 1, 1
    for item in _CFG_E:
        if item == "M":
            names.append(f"pool{block}")
            block, idx = block + 1, 1
        else:
            names += [f"conv{block}_{idx}", f"relu{block}_{idx}"]
            idx += 1
    return tuple(names)


#: basicsr's names of the 37 entries of torchvision's ``vgg19().features`` (position = Sequential index).
VGG19_NAMES: tuple[str, ...] = _names()

#: Real-ESRGAN's perceptual-loss layers (pre-ReLU) and their weights (``train_realesrgan_x4plus.yml``).
DEFAULT_LAYER_WEIGHTS: Mapping[str, float] = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0,
                                              "conv5_4": 1.0}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: He-normal (Kaiming, fan-in, gain sqrt(2)) for :func:`random_vgg19`'s stand-in weights; biases are zero.
_HE_NORMAL = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


class VGG19Features(nnx.Module):
    """VGG19 (no batch norm) feature extractor: [B, H, W, 3] in [0, 1] -> ``{layer name: [B, h, w, c]}``.

    Args:
      layers: basicsr layer names to return (``conv1_2``, ``relu4_4``, ``pool2``, ...); the network stops
        after the deepest of them.
      width_divisor: channels 64 / 128 / 256 / 512 / 512 are divided by it (1 for the real network; 8 or 16
        for tiny test models).
      use_input_norm: subtract the ImageNet mean and divide by the std first (Real-ESRGAN: yes).
    """

    def __init__(self, layers: Sequence[str] = tuple(DEFAULT_LAYER_WEIGHTS), width_divisor: int = 1, *,
                 rngs: nnx.Rngs, use_input_norm: bool = True, dtype=None, param_dtype=jnp.float32):
        layers = (layers,) if isinstance(layers, str) else tuple(layers)
        unknown = [n for n in layers if n not in VGG19_NAMES]
        if unknown or not layers:
            raise ValueError(f"VGG19Features: unknown layer name(s) {unknown or '(none given)'}; "
                             f"known: {', '.join(VGG19_NAMES)}")
        if width_divisor < 1 or 64 % width_divisor:
            raise ValueError(f"VGG19Features width_divisor must divide 64, got {width_divisor}")
        self.layers = layers
        self.width_divisor = width_divisor
        self.use_input_norm = use_input_norm
        self.depth = max(VGG19_NAMES.index(n) for n in layers) + 1  # Sequential entries that run
        convs, index, c_in = {}, 0, 3
        for item in _CFG_E:
            if index >= self.depth:
                break
            if item == "M":
                index += 1
                continue
            c_out = item // width_divisor
            convs[str(index)] = conv(c_in, c_out, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                     kernel_init=_HE_NORMAL)
            c_in, index = c_out, index + 2
        self.features = nnx.Dict(convs)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"VGG19Features expects [B, H, W, 3] images, got {x.shape}")
        if self.use_input_norm:
            x = (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)
        out = {}
        for index in range(self.depth):
            name = VGG19_NAMES[index]
            if name.startswith("conv"):
                x = self.features[str(index)](x)
            elif name.startswith("relu"):
                x = jax.nn.relu(x)
            else:  # nn.MaxPool2d(2, 2): floor mode, like VALID padding
                x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            if name in self.layers:
                out[name] = x
        return out


def random_vgg19(seed: int = 0, width_divisor: int = 1, layers: Sequence[str] = tuple(DEFAULT_LAYER_WEIGHTS),
                 **kwargs) -> VGG19Features:
    """The VGG19 features with random He-normal kernels and zero biases: an EXPLICIT stand-in for the
    ImageNet-trained network when none is available (tests, smoke runs). Its "perceptual" loss is not the
    paper's; use it only when asked for by name. Weights are frozen like the pretrained ones
    (:func:`perceptual_loss` never differentiates them)."""
    return VGG19Features(layers, width_divisor, rngs=nnx.Rngs(seed), **kwargs)


def perceptual_loss(vgg: VGG19Features, sr: jax.Array, hr: jax.Array,
                    layer_weights: Mapping[str, float] = DEFAULT_LAYER_WEIGHTS) -> jax.Array:
    """basicsr's ``PerceptualLoss`` (criterion L1, no style term): ``sum_k w_k * mean|phi_k(sr) - phi_k(hr)|``.

    ``sr`` and ``hr`` are [B, H, W, 3] in [0, 1]; ``phi_k`` the VGG19 feature maps of ``layer_weights``
    (default: Real-ESRGAN's pre-ReLU ``conv1_2 .. conv5_4`` weighted 0.1, 0.1, 1, 1, 1), each L1 averaged
    over all its elements. The ground-truth features carry no gradient (basicsr detaches ``gt``), and the
    VGG weights are constants here (their gradient is zero), so the loss trains only what produced ``sr``.
    Returns a float32 scalar; multiply by the loss weight (Real-ESRGAN: 1.0) outside.
    """
    missing = [k for k in layer_weights if k not in vgg.layers]
    if missing:
        raise ValueError(f"perceptual_loss: layers {missing} are not computed by this VGG19Features "
                         f"(it returns {list(vgg.layers)})")
    if sr.shape != hr.shape:
        raise ValueError(f"perceptual_loss: sr {sr.shape} and hr {hr.shape} differ in shape")
    graphdef, state = nnx.split(vgg)
    frozen = nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))
    feats = frozen(jnp.concatenate([sr, jax.lax.stop_gradient(hr.astype(sr.dtype))], axis=0))
    b = sr.shape[0]
    total = jnp.zeros((), jnp.float32)
    for name, weight in layer_weights.items():
        f = feats[name].astype(jnp.float32)
        total = total + weight * jnp.mean(jnp.abs(f[:b] - jax.lax.stop_gradient(f[b:])))
    return total
