"""CLIP text transformer (OpenAI CLIP and OpenCLIP text towers) in Flax NNX.

A port of transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` that loads their
safetensors weights (see ``raphael_jax.convert.clip``). RAPHAEL conditions on the per-token states
E_theta(y) of an OpenCLIP ViT-g/14 text tower (n_y = 77 tokens, d_y = 1024), and routes its space
experts on the same token states.

For token ids y = (y_1..y_L) the model computes

    h_0 = W_tok[y] + W_pos[0..L-1]
    h_l = h_{l-1}' + MLP(LN2(h_{l-1}')),  h_{l-1}' = h_{l-1} + Attn(LN1(h_{l-1}))   (pre-LN, causal)
    last_hidden_state = LN_final(h_N),   pooled = last_hidden_state[EOT position]
    text_embeds = pooled @ W_proj                                   (only with a projection)

``hidden_states`` is (h_0, ..., h_N) as in transformers (h_N before the final LayerNorm), so
``hidden_states[-2]`` is the penultimate layer that SD2 / SDXL condition on.

Layout: [batch, length, embed]. All parameters carry logical axis names (``vocab``, ``embed``,
``heads``, ``kv``, ``mlp``, ``norm``) as ``out_sharding`` metadata; ``raphael_jax`` turns flax's
eager sharding off at import, and the trainer maps the names to mesh axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

__all__ = ["TEXT_LAYERS", "CLIPTextConfig", "CLIPTextOutput", "CLIPTextTransformer", "check_text_layer", "gelu_exact",
           "quick_gelu", "text_states"]

_ACTS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of a CLIP text tower, named as in transformers' ``CLIPTextConfig``.

    Defaults are OpenAI CLIP ViT-L/14 (the SD 1.x text encoder). ``projection_dim=None`` means no
    ``text_projection`` (``CLIPTextModel``); an int adds it (``CLIPTextModelWithProjection``).
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None

    def __post_init__(self):
        if self.hidden_act not in _ACTS:
            raise ValueError(f"hidden_act must be one of {_ACTS}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], with_projection: bool | None = None) -> CLIPTextConfig:
        """Builds the config from a transformers ``config.json`` dict.

        Accepts a ``CLIPTextConfig`` dict or a full ``CLIPConfig`` (uses its ``text_config``).
        transformers always writes ``projection_dim``, so whether the projection exists is decided
        by ``with_projection``; when None, by ``architectures`` (``...WithProjection`` or
        ``CLIPModel``).
        """
        cfg = dict(cfg)
        archs = cfg.get("architectures") or []
        if "text_config" in cfg or "text_config_dict" in cfg:  # full CLIPModel config
            text = {**(cfg.get("text_config") or {}), **(cfg.get("text_config_dict") or {})}
            cfg = {**text, "projection_dim": cfg.get("projection_dim", text.get("projection_dim"))}
        if with_projection is None:
            with_projection = any("WithProjection" in a or a == "CLIPModel" for a in archs)
        defaults = cls()
        kw = {f.name: cfg.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)}
        # transformers' CLIPTextConfig default when the key is absent is the legacy value 2.
        kw["eos_token_id"] = int(cfg.get("eos_token_id", 2))
        kw["projection_dim"] = int(cfg.get("projection_dim") or 512) if with_projection else None
        kw["layer_norm_eps"] = float(kw["layer_norm_eps"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@struct.dataclass
class CLIPTextOutput:
    """Outputs of :class:`CLIPTextTransformer` (a pytree, so it passes through ``jax.jit``)."""

    last_hidden_state: jax.Array  # [B, L, D], after the final LayerNorm
    pooled_output: jax.Array  # [B, D], last_hidden_state at the EOT token
    hidden_states: tuple[jax.Array, ...]  # N+1 entries [B, L, D]: embeddings, then each layer
    text_embeds: jax.Array | None = None  # [B, P] when the config has a projection


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: jax.Array) -> jax.Array:
    """erf GELU (torch's default ``gelu``), used by OpenCLIP ViT-H / ViT-g / ViT-bigG."""
    return jax.nn.gelu(x, approximate=False)


def _act(name: str):
    return quick_gelu if name == "quick_gelu" else gelu_exact


def _part(init, names):
    return nnx.with_partitioning(init, names)


_W = nnx.initializers.normal(0.02)
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()


def _layer_norm(dim: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=_part(_ONES, ("norm",)),
        bias_init=_part(_ZEROS, ("norm",)),
        rngs=rngs,
    )


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=_part(_W, ("vocab", "embed")),
            rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=_part(_W, (None, "embed")),
            rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array, position_ids: jax.Array | None = None) -> jax.Array:
        if position_ids is None:
            position_ids = jnp.arange(input_ids.shape[-1])[None]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class CLIPAttention(nnx.Module):
    """Multi-head self-attention; q/k/v kernels are [embed, heads, kv], out is [heads, kv, embed]."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(
                self,
                name,
                nnx.LinearGeneral(
                    d,
                    (h, hd),
                    kernel_init=_part(_W, ("embed", "heads", "kv")),
                    bias_init=_part(_ZEROS, ("heads", "kv")),
                    **kw,
                ),
            )
        self.out_proj = nnx.LinearGeneral(
            (h, hd),
            d,
            axis=(-2, -1),
            kernel_init=_part(_W, ("heads", "kv", "embed")),
            bias_init=_part(_ZEROS, ("embed",)),
            **kw,
        )

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, L, H, Dh]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = _act(cfg.hidden_act)
        self.fc1 = nnx.Linear(
            cfg.hidden_size,
            cfg.intermediate_size,
            kernel_init=_part(_W, ("embed", "mlp")),
            bias_init=_part(_ZEROS, ("mlp",)),
            **kw,
        )
        self.fc2 = nnx.Linear(
            cfg.intermediate_size,
            cfg.hidden_size,
            kernel_init=_part(_W, ("mlp", "embed")),
            bias_init=_part(_ZEROS, ("embed",)),
            **kw,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.self_attn = CLIPAttention(cfg, **kw)
        self.layer_norm2 = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(cfg, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_hidden_layers)
            ]
        )


class CLIPTextTransformer(nnx.Module):
    """CLIP text tower (with optional ``text_projection``); see the module docstring.

    Args:
      cfg: the hyper-parameters.
      dtype: computation dtype (None: the parameters' dtype).
      param_dtype: parameter dtype.
      rngs: random init (weights are normally imported, see ``raphael_jax.convert.clip``).

    Attribute names follow transformers (``embeddings``, ``encoder.layers[i]``,
    ``final_layer_norm``, ``text_projection``), which keeps the weight import a plain renaming.
    """

    def __init__(
        self,
        cfg: CLIPTextConfig,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPTextEmbeddings(cfg, **kw)
        self.encoder = CLIPEncoder(cfg, **kw)
        self.final_layer_norm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        if cfg.projection_dim is not None:
            self.text_projection = nnx.Linear(
                cfg.hidden_size,
                cfg.projection_dim,
                use_bias=False,
                kernel_init=_part(_W, ("embed", None)),
                **kw,
            )
        else:
            self.text_projection = nnx.data(None)

    def eot_positions(self, input_ids: jax.Array) -> jax.Array:
        """Index of the pooled (EOT) token per row, exactly as transformers picks it."""
        ids = input_ids.astype(jnp.int32)
        if self.config.eos_token_id == 2:  # legacy configs: EOT has the largest id
            return jnp.argmax(ids, axis=-1)
        return jnp.argmax(ids == self.config.eos_token_id, axis=-1)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> CLIPTextOutput:
        """Encodes token ids.

        Args:
          input_ids: int [B, L], L <= max_position_embeddings.
          attention_mask: optional [B, L], 1 (True) for real tokens and 0 for padding; padded
            keys are hidden from every query (on top of the causal mask).
          position_ids: optional int [B or 1, L]; defaults to 0..L-1.
        """
        length = input_ids.shape[-1]
        x = self.embeddings(input_ids, position_ids)
        mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]  # [1, 1, Lq, Lk]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        pooled = jnp.take_along_axis(last, self.eot_positions(input_ids)[:, None, None], axis=1)[:, 0]
        text_embeds = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPTextOutput(
            last_hidden_state=last,
            pooled_output=pooled,
            hidden_states=tuple(hidden_states),
            text_embeds=text_embeds,
        )


# The hidden layer a diffusion model conditions on (``data.text_layer``; the precompute pass and the
# sampler both call :func:`text_states`, so sampling sees exactly the states training saw).
TEXT_LAYERS = ("last", "penultimate", "penultimate_ln")


def check_text_layer(layer):
    """``layer`` as used by :func:`text_states`: one of :data:`TEXT_LAYERS` or an int index (an int-like
    string such as ``"-2"`` becomes the int); ValueError otherwise."""
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        layer = int(layer)
    if isinstance(layer, bool) or (not isinstance(layer, int) and layer not in TEXT_LAYERS):
        raise ValueError(f"text_layer must be one of {TEXT_LAYERS} or an int index, got {layer!r}")
    return layer


def text_states(model: CLIPTextTransformer, input_ids: jax.Array, layer="last") -> jax.Array:
    """Per-token text states [B, L, D] (float32) of ``layer``, the encoder run without an attention mask
    (causal only, as Stable Diffusion does):

    - ``"last"``: ``last_hidden_state`` (after the final LayerNorm): E_theta(y) as in the paper and SD 1.x;
    - ``"penultimate"``: ``hidden_states[-2]`` without the final LayerNorm (SDXL);
    - ``"penultimate_ln"``: the final LayerNorm applied to ``hidden_states[-2]`` (SD 2.x);
    - an int: ``hidden_states[layer]``.
    """
    layer = check_text_layer(layer)
    out = model(input_ids)
    if layer == "last":
        h = out.last_hidden_state
    elif layer == "penultimate":
        h = out.hidden_states[-2]
    elif layer == "penultimate_ln":
        h = model.final_layer_norm(out.hidden_states[-2])
    else:
        h = out.hidden_states[layer]
    return h.astype(jnp.float32)
