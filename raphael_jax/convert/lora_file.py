"""LoRA adapter files: one safetensors file with the factors (``<kernel path>.lora_a`` / ``.lora_b``, float32)
and the adapter config (rank, alpha, targets, the base run and step, the subject) in its header metadata.
The adapters themselves: raphael_jax/models/lora.py."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from raphael_jax.models.lora import LoraError, _value

FORMAT = "raphael_jax.lora.v1"


def save_adapters(adapters: Mapping, path: str | Path, meta: Mapping) -> Path:
    """Write the adapters (float32) and ``meta`` (rank, alpha, targets, base, ...) as one safetensors file,
    atomically (a temporary file renamed into place)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {f"{k}.lora_{n}": np.ascontiguousarray(np.asarray(jax.device_get(_value(x)), np.float32))
               for k, ab in adapters.items() for n, x in ab.items()}
    header = {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def load_adapters(path: str | Path) -> tuple[dict, dict]:
    """``(adapters {kernel path: {"a", "b"}} of numpy arrays, meta)`` from :func:`save_adapters`'s file;
    LoraError (one line naming the file) for anything else."""
    from safetensors import safe_open

    from raphael_jax.convert.safetensors_io import ConversionError, read_tensors

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such adapter file")
    try:
        tensors = read_tensors([path])
        with safe_open(str(path), "np") as f:
            header = f.metadata() or {}
    except ConversionError as e:
        raise LoraError(str(e)) from None
    if header.get("format") != FORMAT:
        raise LoraError(f"{path} is not a raphael_jax LoRA adapter file (no format={FORMAT!r} in its header)")
    try:
        meta = {k: json.loads(v) for k, v in header.items() if k != "format"}
    except json.JSONDecodeError as e:
        raise LoraError(f"{path}: unreadable adapter metadata ({e})") from None
    for need in ("rank", "alpha"):
        if need not in meta:
            raise LoraError(f"{path}: the adapter metadata lacks {need!r}")
    adapters: dict[str, dict] = {}
    for name, x in tensors.items():
        m = re.fullmatch(r"(.+)\.lora_([ab])", name)
        if m is None:
            raise LoraError(f"{path}: tensor {name!r} is not an adapter factor (<kernel>.lora_a / .lora_b)")
        adapters.setdefault(m.group(1), {})[m.group(2)] = x
    for k, ab in adapters.items():
        if set(ab) != {"a", "b"}:
            raise LoraError(f"{path}: {k} has {sorted(ab)} but needs both lora_a and lora_b")
        a, b = ab["a"], ab["b"]
        if a.shape[-1] != meta["rank"] or b.shape[-2] != meta["rank"]:
            raise LoraError(f"{path}: {k} has rank {a.shape[-1]}/{b.shape[-2]}, the metadata says {meta['rank']}")
    return adapters, meta


