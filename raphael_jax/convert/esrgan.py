"""Real-ESRGAN generator weights (RRDBNet) in and out of :class:`raphael_jax.models.rrdbnet.RRDBNet`.

The published Real-ESRGAN / ESRGAN generators (``RealESRGAN_x4plus.pth``, ``RealESRGAN_x2plus.pth``,
``RealESRNet_x4plus.pth``, ``RealESRGAN_x4plus_anime_6B.pth``) are pickled PyTorch files holding
``{"params_ema": state_dict}`` (or ``{"params": state_dict}``). They are converted ONCE to safetensors:

    raphael-convert esrgan RealESRGAN_x4plus.pth weights/RealESRGAN_x4plus.safetensors

(:func:`convert_esrgan_weights`: ``torch.load(weights_only=True)``, which loads tensors only and never runs
pickled code; every tensor is checked against the network before anything is written). Loading
(:func:`load_rrdbnet`) reads safetensors only and needs no torch; the architecture (scale, blocks,
features, growth channels) is read off the tensor shapes (:func:`infer_rrdbnet_config`), so one loader
serves every published variant. Tensor names are basicsr's (``body.0.rdb1.conv1.weight``); files of the
original ESRGAN repository (``RRDB_trunk.0.RDB1.conv1.weight``, ``trunk_conv``, ``upconv1``, ``HRconv``),
the same network, are renamed on conversion.

The way back, :func:`rrdbnet_tensors` / :func:`save_rrdbnet`, writes a generator in the published layout
(PyTorch names, OIHW kernels), which basicsr's ``RRDBNet`` loads with ``load_state_dict`` (from a ``.pth``
written by :func:`save_rrdbnet` as ``{"params_ema": ...}``, or via ``safetensors.torch.load_file``).
See docs/CONVERT.md, "Real-ESRGAN upscaler weights".
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from raphael_jax.convert import safetensors_io as sio
from raphael_jax.models.rrdbnet import RRDBNet, RRDBNetConfig

__all__ = [
    "FORMAT",
    "build_rrdbnet",
    "convert_esrgan_weights",
    "describe",
    "infer_rrdbnet_config",
    "load_rrdbnet",
    "rrdbnet_tensors",
    "save_rrdbnet",
]

#: ``format`` in the metadata of the safetensors files written here.
FORMAT = "raphael_jax.rrdbnet.v1"
_HINT = "raphael-convert esrgan SRC.pth OUT.safetensors"
_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases"
_NESTING = ("params_ema", "params")  # where Real-ESRGAN / basicsr .pth files keep the state dict
_BODY = re.compile(r"^body\.(\d+)\.")
# The original ESRGAN repository (xinntao/ESRGAN, RRDB_ESRGAN_x4.pth) names the same network differently.
_LEGACY = ((re.compile(r"^RRDB_trunk\.(\d+)\.RDB(\d)\."), r"body.\1.rdb\2."),
           (re.compile(r"^trunk_conv\."), "conv_body."),
           (re.compile(r"^upconv(\d)\."), r"conv_up\1."),
           (re.compile(r"^HRconv\."), "conv_hr."))


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _conv_shape(shapes: Mapping[str, tuple], name: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shapes[name])
    if len(shape) != 4:
        raise sio.ConversionError(f"{name} has shape {_fmt(shape)}: an RRDBNet conv weight is 4-d "
                                  "[out, in, 3, 3] (not an RRDBNet (Real-ESRGAN) state dict?)")
    return shape


def infer_rrdbnet_config(shapes: Mapping[str, tuple], *, scale: int | None = None) -> RRDBNetConfig:
    """The :class:`RRDBNetConfig` of a state dict, from its tensor shapes (PyTorch names and layout) alone.

    ``num_feat`` is ``conv_first``'s output channels, ``num_out_ch`` ``conv_last``'s, ``num_grow_ch``
    ``body.0.rdb1.conv1``'s, ``num_block`` the number of distinct ``body.N.`` indices. The scale follows from
    ``conv_first``'s input channels, ``num_in_ch * unshuffle**2``, taking ``num_in_ch == num_out_ch`` (as every
    published model): ``num_out_ch`` channels -> x4, 4x that -> x2, 16x that -> x1 (3, 12, 48 for RGB).
    ``scale`` overrides that guess for a model whose input and output channels differ. Nothing is checked
    beyond what these shapes say; :func:`build_rrdbnet` checks every tensor.

    Raises:
      ConversionError: not an RRDBNet state dict (no ``conv_first.weight`` / ``conv_last.weight``), or
        channel counts that fit no scale.
    """
    if "conv_first.weight" not in shapes:
        extra = ""
        if any(re.match(r"^body\.\d+\.weight$", k) for k in shapes):
            extra = (" (its body.N.weight tensors look like SRVGGNetCompact, the architecture of "
                     "realesr-general-x4v3 / realesr-animevideov3, which is not supported)")
        elif any(k.startswith("model.") for k in shapes):
            extra = " (model.N.* names: the oldest ESRGAN layout, not supported; use the basicsr/Real-ESRGAN files)"
        raise sio.ConversionError(
            f"not an RRDBNet (Real-ESRGAN) state dict: no conv_first.weight{extra}; SRVGGNetCompact files such as "
            f"realesr-general-x4v3.pth are a different architecture and not supported: use RealESRGAN_x4plus.pth, "
            f"RealESRGAN_x2plus.pth, RealESRNet_x4plus.pth or RealESRGAN_x4plus_anime_6B.pth ({_RELEASES})")
    if "conv_last.weight" not in shapes:
        raise sio.ConversionError("not an RRDBNet (Real-ESRGAN) state dict: conv_first.weight but no "
                                  "conv_last.weight (a partial or foreign file?)")
    num_feat, c_in = _conv_shape(shapes, "conv_first.weight")[:2]
    num_out_ch = _conv_shape(shapes, "conv_last.weight")[0]
    blocks = {int(m.group(1)) for k in shapes if (m := _BODY.match(k))}
    grow = shapes.get("body.0.rdb1.conv1.weight")
    num_grow_ch = _conv_shape(shapes, "body.0.rdb1.conv1.weight")[0] if grow is not None else RRDBNetConfig.num_grow_ch
    if scale is None:
        by_ratio = {1: 4, 4: 2, 16: 1}
        ratio = c_in / num_out_ch
        if ratio not in by_ratio:
            raise sio.ConversionError(
                f"conv_first.weight takes {c_in} input channels and conv_last.weight gives {num_out_ch}: fits no "
                f"RRDBNet scale (expected {num_out_ch} for x4, {4 * num_out_ch} for x2, {16 * num_out_ch} for x1); "
                "pass scale= when the input and output channels differ")
        scale = by_ratio[int(ratio)]
    if scale not in (1, 2, 4):
        raise sio.ConversionError(f"RRDBNet scale must be 1, 2 or 4, got {scale}")
    unshuffle = 4 // scale
    if c_in % (unshuffle * unshuffle):
        raise sio.ConversionError(f"conv_first.weight takes {c_in} input channels: not a multiple of "
                                  f"{unshuffle * unshuffle}, so not an x{scale} RRDBNet")
    return RRDBNetConfig(num_in_ch=c_in // (unshuffle * unshuffle), num_out_ch=num_out_ch, scale=scale,
                         num_feat=num_feat, num_block=len(blocks), num_grow_ch=num_grow_ch).validate()


def describe(cfg: RRDBNetConfig) -> str:
    """One phrase naming the architecture: ``RRDBNet x4, 23 blocks, 64 features`` (+ what differs from RGB / 32)."""
    text = f"RRDBNet x{cfg.scale}, {cfg.num_block} blocks, {cfg.num_feat} features"
    if cfg.num_grow_ch != RRDBNetConfig.num_grow_ch:
        text += f", {cfg.num_grow_ch} growth channels"
    if (cfg.num_in_ch, cfg.num_out_ch) != (3, 3):
        text += f", {cfg.num_in_ch} -> {cfg.num_out_ch} channels"
    return text


def build_rrdbnet(
    shapes: Mapping[str, tuple[int, ...]],
    load,
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    source: str = "",
    scale: int | None = None,
) -> RRDBNet:
    """The :class:`RRDBNet` holding a state dict given as ``shapes`` (PyTorch names) + ``load(names) -> arrays``.

    Raises one :class:`ConversionError` listing every missing, unexpected and mis-shaped tensor; ``load`` is
    called only when all of them check out.
    """
    cfg = infer_rrdbnet_config(shapes, scale=scale)
    abstract = sio.abstract_module(lambda: RRDBNet(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return sio.import_state(abstract, shapes, load, sio.torch_name, what=f"RRDBNet ({describe(cfg)})",
                            source=source)


def _nested_prefix(names) -> str | None:
    for key in _NESTING:
        if any(n.startswith(key + ".") for n in names):
            return key
    return None


def load_rrdbnet(path: str | Path, *, dtype: Any = None, param_dtype: Any = jnp.float32,
                 scale: int | None = None) -> RRDBNet:
    """Loads an RRDBNet ``.safetensors`` file (what ``raphael-convert esrgan`` or :func:`save_rrdbnet` wrote, or any
    safetensors file with basicsr's tensor names) into :class:`RRDBNet`. Never unpickles; needs no torch.

    The header is checked first (a truncated or foreign file, names and shapes against the architecture they
    imply), then the tensors are read; ``param_dtype`` is the parameters' dtype after import, ``dtype`` the
    computation dtype (None: the parameters'). ``scale`` as in :func:`infer_rrdbnet_config`.

    Raises:
      ConversionError: no such file, a pickle (``.pth``) file, not safetensors, not an RRDBNet, or tensors
        missing / unexpected / mis-shaped (all listed in one message).
    """
    path = Path(path)
    if not path.is_file():
        raise sio.ConversionError(f"{path}: no such file (convert a Real-ESRGAN .pth once with `{_HINT}`)")
    if path.suffix in sio.PICKLE_SUFFIXES:
        raise sio.ConversionError(f"{path} is a pickle-based PyTorch file, which raphael_jax never unpickles on load: "
                                  f"convert it once with `{_HINT}`")
    shapes = sio.safetensors_shapes([path])
    nested = _nested_prefix(shapes)
    if nested:
        raise sio.ConversionError(f"{path} holds tensors named {nested}.* (the .pth's nesting kept in the names): "
                                  f"convert the original .pth with `{_HINT}`, which takes the state dict out of "
                                  f"{nested!r}")
    return build_rrdbnet(shapes, lambda names: sio.read_tensors([path], names), dtype=dtype,
                         param_dtype=param_dtype, source=str(path), scale=scale)


def _legacy_renamed(tensors: dict[str, Any]) -> dict[str, Any]:
    """basicsr names for a state dict of the original ESRGAN repository (unchanged when it has basicsr's)."""
    if not any(k.startswith("RRDB_trunk.") or k.startswith("trunk_conv.") for k in tensors):
        return tensors
    out = {}
    for k, v in tensors.items():
        for pattern, new in _LEGACY:
            k = pattern.sub(new, k)
        out[k] = v
    return out


def _pick_state_dict(obj: Any, src: Path, key: str | None) -> tuple[dict, str]:
    """The state dict inside a loaded ``.pth`` and the key it came from ("" for a flat state dict)."""
    if not isinstance(obj, dict):
        raise sio.ConversionError(f"{src} holds a {type(obj).__name__}, not a state dict: give a Real-ESRGAN .pth "
                                  f"({_RELEASES})")
    keys = [str(k) for k in obj]
    shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
    if key is not None:
        if key not in obj:
            raise sio.ConversionError(f"--key {key}: {src} has no such key (its top-level keys: {shown})")
        chosen = key
    else:
        chosen = next((k for k in _NESTING if isinstance(obj.get(k), dict)), "")
    sd = obj[chosen] if chosen else obj
    if not isinstance(sd, dict):
        raise sio.ConversionError(f"--key {key}: {src}[{key!r}] is a {type(sd).__name__}, not a state dict")
    return sd, chosen


def convert_esrgan_weights(src: str | Path, out: str | Path, *, key: str | None = None) -> Path:
    """A Real-ESRGAN / ESRGAN ``.pth`` -> a NEW ``.safetensors`` file that :func:`load_rrdbnet` loads.

    Reads ``src`` with ``torch.load(weights_only=True)`` (tensors and plain containers only; no code from the
    file runs; needs torch) after checking, without torch, that it is laid out as ``torch.save`` writes it.
    The state dict is ``src[key]``, or by default ``params_ema`` if present, else ``params``, else the file
    itself (a flat state dict). Every tensor is checked against the RRDBNet its shapes imply BEFORE anything
    is written; ``out`` must end in ``.safetensors`` and must not exist. The file's metadata records
    ``{"format": FORMAT, "source": src's name, "key": the key used}``. Returns ``out``.
    """
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise sio.ConversionError(f"{src}: no such file (download RealESRGAN_x4plus.pth or another RRDBNet model "
                                  f"from {_RELEASES})")
    if out.suffix != ".safetensors":
        raise sio.ConversionError(f"{out}: the output must be a new .safetensors file (name it *.safetensors)")
    if out.exists():
        raise sio.ConversionError(f"{out} exists; refusing to overwrite it: remove it or give a new name")
    if src.suffix == ".safetensors":
        raise sio.ConversionError(f"{src} is already a safetensors file: nothing to convert; load it as it is "
                                  "(raphael-upscale --weights, raphael_jax.convert.esrgan.load_rrdbnet)")
    hint = f"re-download it from {_RELEASES}"
    sio.check_torch_file(src, hint)
    try:
        import torch  # only for this one-time conversion
    except ImportError:
        raise sio.ConversionError("converting the .pth needs torch (pip install torch)") from None
    sd, chosen = _pick_state_dict(sio.torch_load_weights(torch, src, hint), src, key)
    tensors = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            tensors[str(k)] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    tensors = _legacy_renamed(tensors)
    if not tensors:
        raise sio.ConversionError(f"{src}{'[' + repr(chosen) + ']' if chosen else ''} holds no tensors: not an "
                                  f"RRDBNet (Real-ESRGAN) state dict")
    build_rrdbnet({k: tuple(v.shape) for k, v in tensors.items()}, lambda names: tensors,
                  source=f"{src}" + (f" (key {chosen!r})" if chosen else ""))  # validates; raises before writing
    _write(tensors, out, {"format": FORMAT, "source": src.name, "key": chosen}, overwrite=False)
    return out


def rrdbnet_tensors(model: RRDBNet, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The generator's parameters as a PyTorch state dict: basicsr names, OIHW conv kernels, ``dtype`` arrays
    (float32 by default, as the published files). The inverse of :func:`build_rrdbnet`."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = np.asarray(jnp.asarray(var.value, dtype=dtype))
        if path[-1] == "kernel":
            arr = arr.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        out[sio.torch_name(path)] = np.ascontiguousarray(arr)
    return out


def _write(tensors: Mapping[str, np.ndarray], path: Path, metadata: dict[str, str], *, overwrite: bool) -> None:
    """Writes safetensors through a temporary file in the same folder, renamed into place when complete (so a
    crash never leaves a half-written ``path``); refuses an existing ``path`` unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise sio.ConversionError(f"{path} exists; refusing to overwrite it: remove it or give a new name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix in sio.PICKLE_SUFFIXES:
            import torch  # a .pth for basicsr / Real-ESRGAN's own loaders

            torch.save({"params_ema": {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}}, tmp)
        else:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never replaces a file
            except FileExistsError:
                raise sio.ConversionError(f"{path} exists; refusing to overwrite it: remove it or give a new name"
                                          ) from None
            except OSError:  # a filesystem without hard links: the check above has to do
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_rrdbnet(model: RRDBNet, path: str | Path, *, source: str = "raphael_jax", overwrite: bool = False) -> Path:
    """Writes the generator in the published layout (:func:`rrdbnet_tensors`) for basicsr / Real-ESRGAN.

    ``*.safetensors`` (no torch needed): metadata ``{"format": FORMAT, "source": source, "key": ""}``; loads
    back with :func:`load_rrdbnet`, or in torch with ``RRDBNet(...).load_state_dict(safetensors.torch.load_file(
    path))``. ``*.pth`` (needs torch): ``torch.save({"params_ema": state_dict})``, the layout Real-ESRGAN's
    ``RealESRGANer`` and basicsr's ``load_network`` read. Written atomically (temporary file + rename); an
    existing ``path`` is refused unless ``overwrite``. Returns ``path``.
    """
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix not in sio.PICKLE_SUFFIXES:
        raise sio.ConversionError(f"{path}: name the generator file *.safetensors (or *.pth for torch.save)")
    _write(rrdbnet_tensors(model), path, {"format": FORMAT, "source": str(source), "key": ""}, overwrite=overwrite)
    return path
