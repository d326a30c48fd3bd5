"""CLIP vision tower (ViT) and the two-tower CLIP model in Flax NNX, ports of transformers' classes.

``CLIPVisionTransformer`` matches ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``;
``CLIPModel`` holds both towers and ``logit_scale`` as transformers' ``CLIPModel`` does. Weights
come from a ``save_pretrained`` safetensors directory via :mod:`raphael_jax.convert.clip_full`.

For pixels x [B, H, W, C] (already CLIP-normalized; NHWC here, NCHW in transformers), patch size p:

    e = [W_cls; Conv_pxp/p(x) flattened row-major] + W_pos          [B, 1 + (H/p)(W/p), D]
    h_0 = LN_pre(e);  h_l = encoder layer l (pre-LN, NO causal mask)  (as the text tower)
    last_hidden_state = h_N;  pooled = LN_post(h_N[:, 0]);  image_embeds = pooled @ W_proj

``CLIPModel.__call__`` returns L2-normalized ``image_embeds``/``text_embeds`` and
``logits_per_image = exp(logit_scale) * image_embeds @ text_embeds.T``, like transformers.
The encoder layers are the text tower's (:class:`~raphael_jax.models.clip_text.CLIPEncoder`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from raphael_jax.models.clip_text import (
    _ACTS,
    _W,
    CLIPEncoder,
    CLIPTextTransformer,
    _layer_norm,
    _part,
)

__all__ = ["CLIPModel", "CLIPOutput", "CLIPVisionConfig", "CLIPVisionOutput", "CLIPVisionTransformer"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of a CLIP vision tower, named as transformers' ``CLIPVisionConfig``.

    Defaults are OpenAI ViT-B/32. ``projection_dim=None``: no ``visual_projection``.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512

    def __post_init__(self):
        if self.hidden_act not in _ACTS:
            raise ValueError(f"hidden_act must be one of {_ACTS}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], with_projection: bool = True) -> CLIPVisionConfig:
        """From a ``CLIPVisionConfig`` dict or a full ``CLIPConfig`` dict (its ``vision_config``)."""
        cfg = dict(cfg)
        if "vision_config" in cfg or "vision_config_dict" in cfg:
            vis = {**(cfg.get("vision_config") or {}), **(cfg.get("vision_config_dict") or {})}
            cfg = {**vis, "projection_dim": cfg.get("projection_dim", vis.get("projection_dim"))}
        defaults = cls()
        kw = {f.name: cfg.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)}
        kw["layer_norm_eps"] = float(kw["layer_norm_eps"])
        kw["projection_dim"] = int(cfg.get("projection_dim") or 512) if with_projection else None
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # [B, 1 + P, D], encoder output (no final LayerNorm)
    pooled_output: jax.Array  # [B, D], LN_post of the class token
    hidden_states: tuple[jax.Array, ...]  # N+1 entries: LN_pre(embeddings), then each layer
    image_embeds: jax.Array | None = None  # [B, projection_dim] (not normalized)


@struct.dataclass
class CLIPOutput:
    image_embeds: jax.Array  # [B_img, P], L2-normalized
    text_embeds: jax.Array  # [B_txt, P], L2-normalized
    logits_per_image: jax.Array  # [B_img, B_txt]


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p, d = cfg.patch_size, cfg.hidden_size
        self.patch_embedding = nnx.Conv(
            cfg.num_channels,
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=_part(_W, (None, None, None, "embed")),
            rngs=rngs,
        )
        self.class_embedding = nnx.Param(_W(rngs.params(), (d,), param_dtype), out_sharding=("embed",))
        self.position_embedding = nnx.Embed(
            cfg.num_positions,
            d,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=_part(_W, (None, "embed")),
            rngs=rngs,
        )

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.patch_embedding(pixels)  # [B, H/p, W/p, D]
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1])[None])


class CLIPVisionTransformer(nnx.Module):
    """CLIP ViT image tower; attribute names follow transformers (``embeddings``, ``pre_layrnorm``
    [sic], ``encoder.layers[i]``, ``post_layernorm``, ``visual_projection``).

    ``__call__(pixel_values)`` takes CLIP-normalized NHWC pixels at ``image_size``.
    """

    def __init__(
        self, cfg: CLIPVisionConfig, *, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs
    ):
        self.config = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
        self.pre_layrnorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.encoder = CLIPEncoder(cfg, **kw)  # duck-typed: same fields as CLIPTextConfig
        self.post_layernorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        if cfg.projection_dim is not None:
            self.visual_projection = nnx.Linear(
                cfg.hidden_size,
                cfg.projection_dim,
                use_bias=False,
                kernel_init=_part(_W, ("embed", None)),
                **kw,
            )
        else:
            self.visual_projection = nnx.data(None)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        s = self.config.image_size
        if pixel_values.shape[1:3] != (s, s):
            raise ValueError(f"expected pixels [B, {s}, {s}, C], got {pixel_values.shape}")
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x, None)
            hidden_states.append(x)
        pooled = self.post_layernorm(x[:, 0])
        embeds = self.visual_projection(pooled) if self.visual_projection is not None else None
        return CLIPVisionOutput(
            last_hidden_state=x, pooled_output=pooled, hidden_states=tuple(hidden_states), image_embeds=embeds
        )


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nnx.Module):
    """Both CLIP towers (each with its projection) and the learned temperature ``logit_scale``."""

    def __init__(
        self, text_model: CLIPTextTransformer, vision_model: CLIPVisionTransformer, logit_scale: float
    ):
        if text_model.config.projection_dim is None or vision_model.config.projection_dim is None:
            raise ValueError("CLIPModel needs both towers with their projections")
        if text_model.config.projection_dim != vision_model.config.projection_dim:
            raise ValueError(
                f"projection dims differ: text {text_model.config.projection_dim}, "
                f"vision {vision_model.config.projection_dim}"
            )
        self.text_model = text_model
        self.vision_model = vision_model
        self.logit_scale = nnx.Param(jnp.asarray(logit_scale, jnp.float32))

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Projected (not normalized) text embeddings ``[B, P]``."""
        return self.text_model(input_ids, attention_mask).text_embeds

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Projected (not normalized) image embeddings ``[B, P]``."""
        return self.vision_model(pixel_values).image_embeds

    def __call__(self, input_ids, pixel_values, attention_mask=None) -> CLIPOutput:
        img = _normalize(self.get_image_features(pixel_values))
        txt = _normalize(self.get_text_features(input_ids, attention_mask))
        logits = jnp.exp(self.logit_scale[...]) * img @ txt.T
        return CLIPOutput(image_embeds=img, text_embeds=txt, logits_per_image=logits)
