"""Reading PyTorch weights from safetensors (never pickle) and mapping them onto NNX modules.

The loaders here never unpickle. A directory that holds only pickle-based files (``.bin``,
``.pt``, ``.ckpt``, ``.pth``) is refused with a one-line error that says how to convert it; the
converter command's ``--from-pickle`` reads such files with ``torch.load(weights_only=True)``
(see :func:`read_pickle_tensors`), which loads tensors only and never runs pickled code.

Mapping PyTorch tensors onto a module is generic: every NNX parameter path has one PyTorch name
(``kernel``/``scale``/``embedding`` -> ``weight``, list indices -> ``.0``), and the layout change
follows from the parameter's kind and rank (:func:`torch_to_nnx`). All missing, unexpected and
mis-shaped tensors are reported together in one :class:`ConversionError`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

__all__ = [
    "PICKLE_SUFFIXES",
    "ConversionError",
    "abstract_module",
    "find_safetensors",
    "import_state",
    "open_weights_dir",
    "read_config",
    "read_pickle_tensors",
    "read_tensors",
    "safetensors_shapes",
    "torch_load_weights",
    "torch_to_nnx",
    "write_safetensors",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
_MAX_LISTED = 40


class ConversionError(ValueError):
    """A weight directory that cannot be imported; the message lists every problem."""


def read_config(src_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a save_pretrained directory; a one-line ConversionError when absent or not JSON."""
    src = Path(src_dir)
    if not src.is_dir():
        raise ConversionError(f"{src_dir}: no such folder (give the folder save_pretrained wrote: config.json + "
                              "*.safetensors)")
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src_dir}: no config.json (expected a save_pretrained directory): copy the "
                              "model's config.json there or give the folder save_pretrained wrote")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON (truncated or corrupt? {e}): re-download it") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} is not a JSON object (a model config): re-download it")
    return config


def _pickle_files(src_dir: Path) -> list[Path]:
    return sorted(p for p in src_dir.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def find_safetensors(
    src_dir: str | Path, stem: str, variant: str | None = None, hint: str = ""
) -> list[Path]:
    """The safetensors file(s) holding a model's weights in a save_pretrained directory.

    Looks for ``{stem}[.{variant}].safetensors``, then its sharded form
    ``{stem}[.{variant}].safetensors.index.json``; without a variant, a directory with exactly one
    ``*.safetensors`` file uses it. Raises a one-line :class:`ConversionError` otherwise, telling
    how to convert a pickle-only directory (``hint`` is the converter command to suggest).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    if (src / name).is_file():
        return [src / name]
    index = src / f"{name}.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [src / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ConversionError(f"{index}: shard files listed but absent: {', '.join(absent)}")
        return files
    found = sorted(src.glob("*.safetensors"))
    if variant is None and len(found) == 1:
        return found
    if found:
        raise ConversionError(
            f"{src}: no {name} (nor its .index.json); found {[f.name for f in found]}: pass variant=..."
        )
    pickles = _pickle_files(src)
    if pickles:
        names = ", ".join(p.name for p in pickles)
        raise ConversionError(
            f"{src} holds only pickle-based weights ({names}), which raphael_jax never unpickles on load; "
            f"convert once with `{hint or 'raphael-convert clip|vae'} {src} OUT_DIR "
            f"--from-pickle` (torch.load(weights_only=True), also writes a safetensors copy) or re-save "
            f"with save_pretrained(dir, safe_serialization=True)"
        )
    raise ConversionError(f"{src}: no {name} and no other weight files")


def open_weights_dir(
    src_dir: str | Path, stem: str, variant: str | None = None, hint: str = ""
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], Callable[[Iterable[str]], dict[str, np.ndarray]]]:
    """A save_pretrained directory as ``(config.json dict, tensor shapes, load(names) -> arrays)``,
    the three inputs of every ``build_*`` importer (:func:`find_safetensors` picks the files)."""
    hf_config = read_config(src_dir)
    files = find_safetensors(src_dir, stem, variant, hint=hint)
    return hf_config, safetensors_shapes(files), lambda names: read_tensors(files, names)


_MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


def _not_safetensors(path: Path, why: str) -> ConversionError:
    return ConversionError(f"{path} is not a safetensors file (truncated or corrupt? {why}): re-download it "
                           "or convert it again")


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header (tensor name -> dtype, shape, data_offsets) and where the data starts; a one-line
    ConversionError naming the file when it is not a complete safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _not_safetensors(path, f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise _not_safetensors(path, f"its header length {n} does not fit in its {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _not_safetensors(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            str(info["dtype"])
        except (TypeError, KeyError, ValueError):
            raise _not_safetensors(path, f"tensor {name!r} has no dtype / shape / data_offsets") from None
        if not 0 <= begin <= stop or any(d < 0 for d in shape):
            raise _not_safetensors(path, f"tensor {name!r} has offsets {begin}..{stop}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise _not_safetensors(path, f"its tensors need {8 + n + end} bytes, the file has {size}")
    return header, 8 + n


def safetensors_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers, without reading any data."""
    shapes = {}
    for path in files:
        header, _ = _header(path)
        shapes.update({k: tuple(v["shape"]) for k, v in header.items()})
    return shapes


def read_tensors(files: Iterable[Path], names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Reads tensors (all, or only ``names``) with ``safetensors`` numpy; bfloat16 via ml_dtypes."""
    wanted = None if names is None else set(names)
    out: dict[str, np.ndarray] = {}
    for path in files:
        header, data_start = _header(path)
        try:
            with safe_open(str(path), framework="np") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if wanted is not None and key not in wanted:
                        continue
                    info = header[key]
                    if info["dtype"] == "BF16":  # numpy has no bfloat16: read the raw bytes
                        begin, end = info["data_offsets"]
                        raw = np.fromfile(path, dtype=np.uint8, count=end - begin, offset=data_start + begin)
                        out[key] = raw.view(ml_dtypes.bfloat16).reshape(info["shape"])
                    else:
                        out[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise _not_safetensors(path, str(e).splitlines()[0] if str(e) else "unreadable") from None
    return out


def read_pickle_tensors(src_dir: str | Path, stem: str) -> dict[str, np.ndarray]:
    """Reads ``{stem}.bin`` (or its index, or the one pickle file) with ``torch.load(weights_only=True)``.

    ``weights_only=True`` restricts unpickling to tensors and plain containers, so no code from the
    file runs. Needs torch. Only the converter's ``--from-pickle`` calls this.
    """
    src = Path(src_dir)
    index = src / f"{stem}.bin.index.json"
    if (src / f"{stem}.bin").is_file():
        files = [src / f"{stem}.bin"]
    elif index.is_file():
        files = [src / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = _pickle_files(src)
        if len(files) != 1:
            raise ConversionError(f"{src}: expected {stem}.bin or exactly one pickle file, found {files}")
    for path in files:
        check_torch_file(path)
    try:
        import torch  # optional dependency, only for --from-pickle
    except ImportError:
        raise ConversionError("--from-pickle needs torch (pip install torch)") from None
    out: dict[str, np.ndarray] = {}
    for path in files:
        sd = torch_load_weights(torch, path)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        for k, v in sd.items():
            if isinstance(v, torch.Tensor):
                v = v.detach()
                out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return out


_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first object of a pre-1.6 torch.save stream


def check_torch_file(path: Path, hint: str = "re-download it") -> None:
    """Checks, without torch and without unpickling, that ``path`` is laid out as ``torch.save`` writes it:
    a zip archive holding a ``data.pkl`` (torch >= 1.6) or a pickle stream whose first object is torch's
    legacy magic number (read with :mod:`pickletools`, which only lists opcodes). A one-line
    ConversionError otherwise, so a wrong file is named as such even where torch is not installed."""
    import io
    import pickletools
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ConversionError(f"{path} is not a PyTorch weights file (broken zip archive: {e}): {hint}") from None
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise ConversionError(f"{path} is not a PyTorch weights file (a zip archive without data.pkl): {hint}")
        return
    with open(path, "rb") as f:
        head = f.read(64)
    magic = None
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(head)):
            if op.name in ("LONG1", "LONG4", "LONG", "INT"):
                magic = arg
            if op.name == "STOP" or op.name not in ("PROTO", "FRAME", "LONG1", "LONG4", "LONG", "INT"):
                break
    except Exception:  # noqa: BLE001 (pickletools raises ValueError and others on garbage)
        magic = None
    if magic != _TORCH_LEGACY_MAGIC:
        raise ConversionError(f"{path} is not a PyTorch weights file (neither a torch zip archive nor a legacy "
                              f"torch.save stream: truncated or corrupt?): {hint}")


def torch_load_weights(torch, path: Path, hint: str = "re-download it"):
    """``torch.load(path, weights_only=True)``, or a one-line ConversionError naming the file when it is
    missing, truncated, corrupt or holds more than tensors."""
    if not Path(path).is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle, zip and torch raise many kinds for a bad file)
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:120]  # torch's messages run long
        raise ConversionError(f"{path} is not a PyTorch weights file that torch.load(weights_only=True) reads "
                              f"(truncated or corrupt? {type(e).__name__}: {first}): {hint}") from None


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Writes a NEW safetensors file; refuses to overwrite."""
    path = Path(path)
    if path.exists():
        raise ConversionError(f"{path} exists; refusing to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


# ---------------------------------------------------------------------------------------------
# Mapping onto NNX modules


def abstract_module(build: Callable[[], nnx.Module]) -> nnx.Module:
    """The module with ShapeDtypeStruct parameters (no memory, no mesh needed)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(build)


def _torch_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of the tensor that becomes the NNX parameter ``path`` of ``shape``."""
    leaf = path[-1]
    if leaf == "kernel":
        if len(shape) == 4:  # conv HWIO <- OIHW
            kh, kw, i, o = shape
            return (o, i, kh, kw)
        if len(shape) == 3:  # LinearGeneral: [D, H, Dh] (q/k/v) or [H, Dh, D] (out)
            if path[-2] == "out_proj":
                return (shape[2], shape[0] * shape[1])
            return (shape[1] * shape[2], shape[0])
        return (shape[1], shape[0])  # Linear [in, out] <- [out, in]
    if leaf == "bias" and len(shape) == 2:
        return (shape[0] * shape[1],)
    return shape


def torch_to_nnx(path: tuple, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reorders a PyTorch tensor into the layout of the NNX parameter ``path`` of ``shape``."""
    if path[-1] == "kernel":
        if arr.ndim == 4 and len(shape) == 4:
            return arr.transpose(2, 3, 1, 0)
        if arr.ndim == 4:  # 1x1 conv used as a linear layer (original LDM attention weights)
            arr = arr[:, :, 0, 0]
        return arr.T.reshape(shape)
    return arr.reshape(shape)


def torch_name(path: tuple) -> str:
    """NNX state path -> PyTorch parameter name (``kernel``/``scale``/``embedding`` -> ``weight``)."""
    parts = [str(p) for p in path]
    if parts[-1] in ("kernel", "scale", "embedding"):
        parts[-1] = "weight"
    return ".".join(parts)


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    more = [f"    ... and {len(items) - _MAX_LISTED} more"] if len(items) > _MAX_LISTED else []
    return [f"  {title} ({len(items)}):"] + [f"    {s}" for s in items[:_MAX_LISTED]] + more


def import_state(
    abstract: nnx.Module,
    shapes: Mapping[str, tuple[int, ...]],
    load: Callable[[list[str]], Mapping[str, np.ndarray]],
    name_of: Callable[[tuple], str],
    *,
    ignore: Callable[[str], bool] = lambda name: False,
    accept_shapes: Callable[[str, tuple[int, ...], tuple[int, ...]], bool] | None = None,
    what: str = "model",
    source: str = "",
) -> nnx.Module:
    """Fills an abstract module with PyTorch tensors, or raises ONE error listing every problem.

    Args:
      abstract: from :func:`abstract_module`.
      shapes: PyTorch tensor name -> shape of every tensor available (headers only).
      load: reads the named tensors (called only when everything checks out).
      name_of: NNX parameter path -> PyTorch name.
      ignore: PyTorch names that may be present without a parameter (buffers, other towers).
      accept_shapes: optional extra rule accepting a (name, found, expected) mismatch (e.g. 1x1 convs
        standing in for linear layers); the array then goes through :func:`torch_to_nnx` as is.
      what, source: for the error message.
    """
    graphdef, abs_state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(abs_state))
    missing, wrong, plan, claimed = [], [], [], set()
    for path, var in flat:
        name = name_of(path)
        claimed.add(name)
        want = _torch_shape(path, tuple(var.shape))
        if name not in shapes:
            missing.append(f"{name} (expected {_fmt(want)})")
            continue
        found = tuple(shapes[name])
        if found != want and not (accept_shapes and accept_shapes(name, found, want)):
            wrong.append(f"{name}: expected {_fmt(want)}, found {_fmt(found)}")
            continue
        plan.append((path, var, name))
    unexpected = [f"{k} {_fmt(s)}" for k, s in sorted(shapes.items()) if k not in claimed and not ignore(k)]
    if missing or wrong or unexpected:
        n = len(missing) + len(wrong) + len(unexpected)
        lines = [f"cannot import {what} from {source}: {n} problem(s) in the weights:"]
        lines += _listing("missing tensors", missing)
        lines += _listing("unexpected tensors", unexpected)
        lines += _listing("wrong shapes", wrong)
        raise ConversionError("\n".join(lines))
    arrays = load([name for _, _, name in plan])
    new_flat = []
    for path, var, name in plan:
        value = torch_to_nnx(path, np.asarray(arrays[name]), tuple(var.shape))
        new_flat.append((path, var.replace(jnp.asarray(value, dtype=var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))
