"""Import a diffusers ``AutoencoderKL`` (safetensors) into :class:`AutoencoderKL` (NHWC).

Accepts a ``save_pretrained`` directory (e.g. ``stabilityai/sd-vae-ft-mse`` or the ``vae`` folder
of an SD pipeline): ``config.json`` plus ``diffusion_pytorch_model.safetensors`` (or a variant such
as ``diffusion_pytorch_model.fp16.safetensors``, or a sharded ``.index.json``). Older files whose
mid-block attention is named ``query/key/value/proj_attn`` (possibly as 1x1 convs) are renamed the
way diffusers does on load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from raphael_jax.convert import safetensors_io as sio
from raphael_jax.models.autoencoder import AutoencoderKL, AutoencoderKLConfig

__all__ = ["build_autoencoder", "load_autoencoder"]

_HINT = "raphael-convert vae"
_LEGACY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_W = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _legacy_aliases(names) -> dict[str, str]:
    """New diffusers name -> legacy name present in the file (only where the new one is absent)."""
    names = set(names)
    aliases = {}
    for k in names:
        m = _LEGACY.match(k)
        if m:
            new = f"{m.group(1)}.{_NEW[m.group(2)]}.{m.group(3)}"
            if new not in names:
                aliases[new] = k
    return aliases


def _accept_1x1(name: str, found: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return bool(_ATTN_W.search(name)) and found == (*want, 1, 1)


def build_autoencoder(
    hf_config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    load,
    *,
    param_dtype: Any = jnp.float32,
    dtype: Any = None,
    source: str = "",
) -> tuple[AutoencoderKL, AutoencoderKLConfig]:
    """Builds the module from a diffusers config dict and tensors (``shapes`` + ``load(names)``)."""
    cfg = AutoencoderKLConfig.from_hf_config(hf_config)
    aliases = _legacy_aliases(shapes)
    legacy = set(aliases.values())
    shapes = {
        **{k: v for k, v in shapes.items() if k not in legacy},
        **{n: shapes[o] for n, o in aliases.items()},
    }

    def load_renamed(names):
        arrays = load([aliases.get(n, n) for n in names])
        return {n: arrays[aliases.get(n, n)] for n in names}

    abstract = sio.abstract_module(
        lambda: AutoencoderKL(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    model = sio.import_state(
        abstract,
        shapes,
        load_renamed,
        sio.torch_name,
        accept_shapes=_accept_1x1,
        what="AutoencoderKL",
        source=source,
    )
    return model, cfg


def load_autoencoder(
    src_dir: str | Path,
    *,
    variant: str | None = None,
    param_dtype: Any = jnp.float32,
    dtype: Any = None,
) -> tuple[AutoencoderKL, AutoencoderKLConfig]:
    """Loads a diffusers ``AutoencoderKL`` directory into an NHWC :class:`AutoencoderKL`.

    Args:
      src_dir: directory with ``config.json`` and the safetensors weights.
      variant: e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.
      param_dtype: parameter dtype after import (weights are cast).
      dtype: computation dtype (None: the parameters' dtype).

    Raises:
      ConversionError: pickle-only directory, or missing / unexpected / mis-shaped tensors (all
        listed in one message).
    """
    hf_config, shapes, load = sio.open_weights_dir(src_dir, "diffusion_pytorch_model", variant, hint=_HINT)
    return build_autoencoder(hf_config, shapes, load, param_dtype=param_dtype, dtype=dtype, source=str(src_dir))
