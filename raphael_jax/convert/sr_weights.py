"""Loading the upscaler trainer's other networks from PyTorch weights in safetensors (nothing unpickles).

* :func:`load_discriminator` / :func:`import_discriminator`: Real-ESRGAN's U-Net discriminator with spectral
  norm (``RealESRGAN_x4plus_netD``'s ``params``, basicsr's names: ``conv1.weight_orig`` / ``weight_u`` /
  ``weight_v``) -> :class:`raphael_jax.models.sr_discriminator.UNetDiscriminatorSN`.
* :func:`load_vgg19`: torchvision's ``vgg19`` state dict -> :class:`raphael_jax.models.vgg.VGG19Features`
  (the perceptual loss).

The generator's loader is :mod:`raphael_jax.convert.esrgan`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from raphael_jax.convert.safetensors_io import (
    PICKLE_SUFFIXES,
    ConversionError,
    abstract_module,
    import_state,
    read_tensors,
    safetensors_shapes,
    torch_name,
)
from raphael_jax.models.sr_discriminator import SPECTRAL_LAYERS, UNetDiscriminatorConfig, UNetDiscriminatorSN
from raphael_jax.models.vgg import DEFAULT_LAYER_WEIGHTS, VGG19_NAMES, VGG19Features

__all__ = ["discriminator_config_from", "import_discriminator", "load_discriminator", "load_vgg19",
           "torch_param_name"]


def torch_param_name(path: tuple) -> str:
    """NNX state path -> basicsr's name: ``conv1/kernel`` -> ``conv1.weight_orig``, ``conv1/u`` ->
    ``conv1.weight_u``, ``conv1/v`` -> ``conv1.weight_v``, ``conv0/kernel`` -> ``conv0.weight``."""
    layer, leaf = str(path[0]), str(path[-1])
    if layer in SPECTRAL_LAYERS:
        return f"{layer}.weight_" + {"kernel": "orig", "u": "u", "v": "v"}[leaf]
    return f"{layer}.{'weight' if leaf == 'kernel' else leaf}"


def discriminator_config_from(shapes: Mapping[str, tuple[int, ...]],
                              skip_connection: bool = True) -> UNetDiscriminatorConfig:
    """The config whose shapes ``conv0.weight`` [num_feat, num_in_ch, 3, 3] implies (the default when absent;
    ``skip_connection`` has no weights and cannot be read from a checkpoint)."""
    shape = shapes.get("conv0.weight")
    if shape is None or len(shape) != 4:
        return UNetDiscriminatorConfig(skip_connection=skip_connection)
    return UNetDiscriminatorConfig(num_in_ch=int(shape[1]), num_feat=int(shape[0]), skip_connection=skip_connection)


def import_discriminator(tensors: Mapping[str, np.ndarray], cfg: UNetDiscriminatorConfig | None = None, *,
                         dtype=None, update_stats: bool = True, source: str = "tensors") -> UNetDiscriminatorSN:
    """A :class:`UNetDiscriminatorSN` holding basicsr's PyTorch tensors (``RealESRGAN_x4plus_netD``'s
    ``params``): ``*.weight_orig`` -> kernel (OIHW -> HWIO), ``*.weight_u`` / ``*.weight_v`` -> ``u`` / ``v``,
    ``conv0`` / ``conv9`` ``weight`` and ``bias`` as plain convs.

    ``cfg`` defaults to the one the tensors' shapes imply (:func:`discriminator_config_from`). Raises one
    :class:`ConversionError` listing every missing, unexpected and mis-shaped tensor.
    """
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    cfg = cfg if cfg is not None else discriminator_config_from(shapes)
    abstract = abstract_module(lambda: UNetDiscriminatorSN(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                                           update_stats=update_stats))
    return import_state(abstract, shapes, lambda names: {n: tensors[n] for n in names}, torch_param_name,
                        what="UNetDiscriminatorSN", source=source)


def load_discriminator(path: str | Path, cfg: UNetDiscriminatorConfig | None = None, *, dtype=None,
                       update_stats: bool = True) -> UNetDiscriminatorSN:
    """:func:`import_discriminator` from a safetensors file holding basicsr's state dict."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file (a safetensors copy of the discriminator's state dict)")
    return import_discriminator(read_tensors([path]), cfg, dtype=dtype, update_stats=update_stats,
                                source=str(path))


_FEATURE_NAME = re.compile(r"features\.(\d+)\.(weight|bias)")


def load_vgg19(path: str | Path, width_divisor: int = 1, layers: Sequence[str] = tuple(DEFAULT_LAYER_WEIGHTS), *,
               dtype=None) -> VGG19Features:
    """:class:`VGG19Features` holding torchvision's ``vgg19`` weights from a safetensors file of its state dict.

    Names are torchvision's (``features.N.weight`` OIHW -> HWIO, ``features.N.bias``); ``classifier.*`` and
    the feature convs deeper than ``layers`` need are ignored. Raises one :class:`ConversionError` listing
    every missing, unexpected and mis-shaped tensor (a ``vgg19_bn`` file, say, fails on its shapes).
    """
    path = Path(path)
    how = ("save torchvision.models.vgg19(weights='IMAGENET1K_V1').state_dict() with "
           "safetensors.torch.save_file")
    if path.suffix in PICKLE_SUFFIXES:
        raise ConversionError(f"{path} is a pickle-based file, which raphael_jax never unpickles: {how}")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file (expected a safetensors VGG19 state dict: {how})")
    abstract = abstract_module(lambda: VGG19Features(layers, width_divisor, rngs=nnx.Rngs(0), dtype=dtype))
    depth = abstract.depth

    def ignore(name: str) -> bool:
        if name.startswith("classifier."):
            return True
        m = _FEATURE_NAME.fullmatch(name)
        index = int(m.group(1)) if m else -1
        return depth <= index < len(VGG19_NAMES) and VGG19_NAMES[index].startswith("conv")

    return import_state(abstract, safetensors_shapes([path]), lambda names: read_tensors([path], names),
                        torch_name, ignore=ignore, what="VGG19 features", source=str(path))
