"""Import a whole transformers CLIP (both towers + logit scale) or its vision tower, from safetensors.

- :func:`load_clip_model`: a ``CLIPModel`` ``save_pretrained`` directory (e.g.
  ``openai/clip-vit-large-patch14``, ``laion/CLIP-ViT-g-14-laion2B-s12B-b42K``) ->
  :class:`~raphael_jax.models.clip_vision.CLIPModel` with ``text_model`` (the CLIP text port of
  :mod:`raphael_jax.convert.clip`), ``vision_model`` and ``logit_scale``.
- :func:`load_clip_vision`: the vision tower alone, from a ``CLIPModel``,
  ``CLIPVisionModelWithProjection`` or ``CLIPVisionModel`` directory.
- :func:`load_image_processor_config`: the preprocessing of ``preprocessor_config.json`` (resize,
  crop, mean, std), with CLIP's defaults when the file is absent.

Tensor names are transformers' (``vision_model.embeddings.patch_embedding.weight``,
``vision_model.pre_layrnorm.weight``, ``visual_projection.weight``, ``logit_scale``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from raphael_jax.convert import safetensors_io as sio
from raphael_jax.convert.clip import build_clip_text
from raphael_jax.models.clip_vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionTransformer,
)

__all__ = [
    "ClipImageProcessing",
    "build_clip_vision",
    "clip_vision_torch_name",
    "load_clip_model",
    "load_clip_vision",
    "load_image_processor_config",
]


def clip_vision_torch_name(path: tuple) -> str:
    """NNX parameter path -> transformers tensor name."""
    if path[0] == "visual_projection":
        return "visual_projection.weight"
    return "vision_model." + sio.torch_name(path)


def _ignore_vision(name: str) -> bool:
    return (
        name.startswith("text_model.")
        or name in ("text_projection.weight", "logit_scale")
        or name == "vision_model.embeddings.position_ids"
    )


def build_clip_vision(
    hf_config, shapes, load, *, param_dtype: Any = jnp.float32, dtype: Any = None, source: str = ""
) -> tuple[CLIPVisionTransformer, CLIPVisionConfig]:
    """Vision tower from a transformers config dict and tensors (``shapes`` + ``load(names)``)."""
    cfg = CLIPVisionConfig.from_hf_config(hf_config, with_projection="visual_projection.weight" in shapes)
    abstract = sio.abstract_module(
        lambda: CLIPVisionTransformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    model = sio.import_state(
        abstract,
        shapes,
        load,
        clip_vision_torch_name,
        ignore=_ignore_vision,
        what="CLIP vision tower",
        source=source,
    )
    return model, cfg


def _source(src_dir, variant):
    # a pickle-only directory: raphael-convert clip writes OUT_DIR/source/, which then loads here
    return sio.open_weights_dir(src_dir, "model", variant, hint="raphael-convert clip")


def load_clip_vision(
    src_dir: str | Path, *, variant: str | None = None, param_dtype: Any = jnp.float32, dtype: Any = None
) -> tuple[CLIPVisionTransformer, CLIPVisionConfig]:
    """The CLIP vision tower of a ``CLIPModel`` / ``CLIPVisionModel[WithProjection]`` directory."""
    hf_config, shapes, load = _source(src_dir, variant)
    return build_clip_vision(hf_config, shapes, load, param_dtype=param_dtype, dtype=dtype, source=str(src_dir))


def load_clip_model(
    src_dir: str | Path, *, variant: str | None = None, param_dtype: Any = jnp.float32, dtype: Any = None
) -> CLIPModel:
    """Both towers and ``logit_scale`` of a transformers ``CLIPModel`` directory.

    Raises:
      ConversionError: not a full CLIPModel directory (no ``text_config``/``vision_config`` or no
        ``logit_scale``), pickle-only weights, or missing / unexpected / mis-shaped tensors.
    """
    src = Path(src_dir)
    hf_config, shapes, load = _source(src, variant)
    if "text_config" not in hf_config or "vision_config" not in hf_config or "logit_scale" not in shapes:
        raise sio.ConversionError(
            f"{src}: not a full transformers CLIPModel (needs text_config, vision_config and a logit_scale "
            "tensor); for a vision-only model use load_clip_vision"
        )
    text, _ = build_clip_text(hf_config, shapes, load, param_dtype=param_dtype, dtype=dtype, source=str(src))
    vision, _ = build_clip_vision(
        hf_config, shapes, load, param_dtype=param_dtype, dtype=dtype, source=str(src)
    )
    logit_scale = float(np.asarray(load(["logit_scale"])["logit_scale"], np.float32).reshape(()))
    return CLIPModel(text, vision, logit_scale)


@dataclasses.dataclass(frozen=True)
class ClipImageProcessing:
    """CLIPImageProcessor's steps: shorter side -> ``resize`` (PIL bicubic), center crop ``crop``,
    /255, (x - mean) / std."""

    resize: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD


def load_image_processor_config(src_dir: str | Path, image_size: int | None = None) -> ClipImageProcessing:
    """From ``preprocessor_config.json`` when present, else CLIP's defaults at ``image_size``."""
    path = Path(src_dir) / "preprocessor_config.json"
    if not path.is_file():
        size = image_size or 224
        return ClipImageProcessing(resize=size, crop=size)
    cfg = json.loads(path.read_text())
    size = cfg.get("size", image_size or 224)
    resize = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else int(size)
    crop = cfg.get("crop_size", resize)
    crop = crop.get("height") if isinstance(crop, dict) else int(crop)
    return ClipImageProcessing(
        resize=int(resize),
        crop=int(crop),
        mean=tuple(float(v) for v in cfg.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(float(v) for v in cfg.get("image_std", OPENAI_CLIP_STD)),
    )
