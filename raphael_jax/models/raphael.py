"""``RaphaelModel``: the text encoder (when trainable) and the RAPHAEL U-Net, built from a config."""
from __future__ import annotations

import jax
from flax import nnx

from raphael_jax.models.text_encoder import TextEncoder
from raphael_jax.models.unet import RaphaelUNet


class RaphaelModel(nnx.Module):
    """Denoiser plus (for ``text.kind == "small"``) its trainable text encoder.

    With a frozen external encoder (``text.kind == "external"``: CLIP, precomputed embeddings) the
    model holds only the U-Net and ``__call__`` takes the text states directly as ``context``.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        tc = config.text
        if tc.kind not in ("small", "external"):
            raise ValueError(f"text.kind must be 'small' or 'external', got {tc.kind!r}")
        self.text = nnx.data(TextEncoder(tc.vocab_size, tc.width, tc.num_layers, tc.num_heads, tc.max_len,
                                          embed_init_std=tc.embed_init_std, rngs=rngs)
                              if tc.kind == "small" else None)
        self.unet = RaphaelUNet(config.model, rngs=rngs)

    def encode_text(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        if self.text is None:
            raise ValueError("this model reads external text states; pass context= instead of tokens")
        return self.text(tokens, mask)

    def __call__(self, x_t, t, context, mask, **kwargs):
        """``context`` is token ids [B, L] (small encoder) or text states [B, L, D_y] (external)."""
        if self.text is not None:
            context = self.text(context, mask)
        return self.unet(x_t, t, context, mask, **kwargs)


def build_model(config, seed: int = 0) -> RaphaelModel:
    return RaphaelModel(config, rngs=nnx.Rngs(seed))
