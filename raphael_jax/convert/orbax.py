"""Convert public PyTorch weights once into an orbax checkpoint that pods restore directly.

Command (``raphael_jax.cli.convert``)::

    raphael-convert clip SRC_DIR OUT_DIR [--variant fp16] [--param-dtype bfloat16]
    raphael-convert vae  SRC_DIR OUT_DIR [--from-pickle]

SRC_DIR is a transformers / diffusers ``save_pretrained`` directory. OUT_DIR must be absent or
empty (nothing is ever overwritten) and receives::

    OUT_DIR/raphael_convert.json   {"format", "kind", "config", "param_dtype", "source"}, written last
    OUT_DIR/params/                orbax StandardCheckpointer of nnx.to_pure_dict(nnx.state(module))
    OUT_DIR/source/                only with --from-pickle: config.json + a safetensors copy of the
                                   pickle weights (read with torch.load(weights_only=True))

Everything is validated before anything is written: a bad source leaves OUT_DIR untouched.
Restore with :func:`load_converted`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raphael_jax.convert import safetensors_io as sio
from raphael_jax.convert.clip import build_clip_text, load_clip_text
from raphael_jax.convert.vae import build_autoencoder, load_autoencoder
from raphael_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from raphael_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer

__all__ = ["FORMAT", "KINDS", "META", "convert", "load_converted", "save_converted"]

FORMAT = "raphael_jax.convert/1"
META = "raphael_convert.json"

# kind -> (module class, config class, safetensors loader, tensor builder, weight file stem)
KINDS: dict[str, tuple[Any, ...]] = {
    "clip": (CLIPTextTransformer, CLIPTextConfig, load_clip_text, build_clip_text, "model"),
    "vae": (
        AutoencoderKL,
        AutoencoderKLConfig,
        load_autoencoder,
        build_autoencoder,
        "diffusion_pytorch_model",
    ),
}


def _kind_of(module: nnx.Module) -> str:
    for kind, (cls, *_rest) in KINDS.items():
        if isinstance(module, cls):
            return kind
    raise TypeError(f"no converter kind for {type(module).__name__}")


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise sio.ConversionError(f"{out_dir} exists and is not an empty directory; refusing to write there")


def _param_dtype(module: nnx.Module) -> str:
    dtypes = {np.dtype(v.dtype).name for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def save_converted(module: nnx.Module, out_dir: str | Path, *, source: str = "") -> Path:
    """Writes ``module`` (a CLIP text tower or an AutoencoderKL) as an orbax checkpoint + JSON config."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    _check_out_dir(out)
    kind = _kind_of(module)
    meta = {
        "format": FORMAT,
        "kind": kind,
        "config": module.config.to_dict(),
        "param_dtype": _param_dtype(module),
        "source": source,
    }
    out.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(out / "params", nnx.to_pure_dict(nnx.state(module)))
    ckptr.wait_until_finished()
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_converted(out_dir: str | Path, *, dtype: Any = None) -> tuple[nnx.Module, Any]:
    """Restores what :func:`convert` wrote: ``(module, config)``.

    Args:
      out_dir: the converter's OUT_DIR.
      dtype: computation dtype of the rebuilt module (None: the parameters' dtype).
    """
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    meta_path = out / META
    if not meta_path.is_file():
        raise sio.ConversionError(f"{out}: no {META}; not a (complete) raphael_jax conversion")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise sio.ConversionError(
            f"{meta_path}: unknown format {meta.get('format')!r} / kind {meta.get('kind')!r}"
        )
    cls, cfg_cls, *_ = KINDS[meta["kind"]]
    cfg = cfg_cls(**meta["config"])
    param_dtype = jnp.dtype(meta["param_dtype"])
    abstract = sio.abstract_module(lambda: cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    restored = ocp.StandardCheckpointer().restore(out / "params", target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state), cfg


def convert(
    kind: str,
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    from_pickle: bool = False,
    variant: str | None = None,
    param_dtype: Any = jnp.float32,
) -> Path:
    """Imports SRC_DIR (kind ``clip`` or ``vae``), validates it fully, then writes OUT_DIR."""
    if kind not in KINDS:
        raise sio.ConversionError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    _cls, _cfg_cls, load, build, stem = KINDS[kind]
    src, out = Path(src_dir), Path(out_dir)
    _check_out_dir(out)
    tensors = None
    if from_pickle:
        hf_config = sio.read_config(src)
        tensors = sio.read_pickle_tensors(src, stem)
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        module, _ = build(hf_config, shapes, lambda names: tensors, param_dtype=param_dtype, source=str(src))
    else:
        module, _ = load(src, variant=variant, param_dtype=param_dtype)
    out = save_converted(module, out, source=str(src.absolute()))
    if tensors is not None:
        sio.write_safetensors(tensors, out / "source" / f"{stem}.safetensors")
        shutil.copyfile(src / "config.json", out / "source" / "config.json")
    return out
