"""Import a transformers CLIP text tower (safetensors) into :class:`CLIPTextTransformer`.

Accepts a ``save_pretrained`` directory of ``CLIPTextModel`` (SD 1.x/2.x ``text_encoder``),
``CLIPTextModelWithProjection`` (SDXL ``text_encoder_2``) or a full ``CLIPModel`` (its vision
tower is skipped): ``config.json`` plus ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from raphael_jax.convert import safetensors_io as sio
from raphael_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer

__all__ = ["build_clip_text", "clip_torch_name", "load_clip_text"]

_HINT = "raphael-convert clip"
_FULL_CLIP_EXTRA = ("visual_projection.weight", "logit_scale")


def clip_torch_name(path: tuple) -> str:
    """NNX parameter path -> transformers tensor name."""
    if path[0] == "text_projection":
        return "text_projection.weight"
    return "text_model." + sio.torch_name(path)


def _ignored(full_clip: bool):
    def ignore(name: str) -> bool:
        if name == "text_model.embeddings.position_ids":  # a buffer in older checkpoints
            return True
        return full_clip and (name.startswith("vision_model.") or name in _FULL_CLIP_EXTRA)

    return ignore


def build_clip_text(
    hf_config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    load,
    *,
    param_dtype: Any = jnp.float32,
    dtype: Any = None,
    source: str = "",
) -> tuple[CLIPTextTransformer, CLIPTextConfig]:
    """Builds the module from a transformers config dict and tensors (``shapes`` + ``load(names)``)."""
    archs = hf_config.get("architectures") or []
    with_projection = "text_projection.weight" in shapes or any("WithProjection" in a for a in archs)
    cfg = CLIPTextConfig.from_hf_config(hf_config, with_projection=with_projection)
    abstract = sio.abstract_module(
        lambda: CLIPTextTransformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    model = sio.import_state(
        abstract,
        shapes,
        load,
        clip_torch_name,
        ignore=_ignored("text_config" in hf_config or "text_config_dict" in hf_config),
        what="CLIP text encoder",
        source=source,
    )
    return model, cfg


def load_clip_text(
    src_dir: str | Path,
    *,
    variant: str | None = None,
    param_dtype: Any = jnp.float32,
    dtype: Any = None,
) -> tuple[CLIPTextTransformer, CLIPTextConfig]:
    """Loads a transformers CLIP text model directory into a :class:`CLIPTextTransformer`.

    Args:
      src_dir: directory with ``config.json`` and the safetensors weights.
      variant: e.g. ``"fp16"`` for ``model.fp16.safetensors``.
      param_dtype: parameter dtype after import (weights are cast).
      dtype: computation dtype (None: the parameters' dtype).

    Raises:
      ConversionError: pickle-only directory, or missing / unexpected / mis-shaped tensors (all
        listed in one message).
    """
    hf_config, shapes, load = sio.open_weights_dir(src_dir, "model", variant, hint=_HINT)
    return build_clip_text(hf_config, shapes, load, param_dtype=param_dtype, dtype=dtype, source=str(src_dir))
