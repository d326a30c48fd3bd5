"""A small trainable text encoder for the embedded shapes world (frozen CLIP comes from clip_text.py).

Token + learned position embeddings, pre-LN transformer layers with a padding mask (bidirectional),
final LayerNorm. Returns per-token states E(y) [B, L, width]; the pooled state is the EOT token's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from raphael_jax.models.attention import Attention
from raphael_jax.models.layers import FeedForward, layer_norm


class TextLayer(nnx.Module):
    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = layer_norm(width, rngs=rngs)
        self.attn = Attention(width, heads, context_dim=width, rngs=rngs)
        self.ln2 = layer_norm(width, rngs=rngs)
        self.mlp = FeedForward(width, 4 * width, rngs=rngs)

    def __call__(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, mask)[0]
        return x + self.mlp(self.ln2(x))


class TextEncoder(nnx.Module):
    def __init__(self, vocab_size: int, width: int, num_layers: int, num_heads: int, max_len: int, *,
                 embed_init_std: float = 1.0, rngs: nnx.Rngs):
        # Unit-scale embeddings (T5's choice) by default rather than GPT/CLIP's 0.02: a short one-seed
        # probe (tiny model fitting 64 captions at t = 999 from the text alone) learned faster with
        # them; not an ablation (text.embed_init_std selects).
        init = nnx.initializers.normal(embed_init_std)
        self.token_embed = nnx.Embed(vocab_size, width, embedding_init=init, rngs=rngs,
                                     embedding_metadata={"out_sharding": ("vocab", "context")})
        self.pos_embed = nnx.Param(init(rngs.params(), (max_len, width)), out_sharding=(None, "context"))
        self.layers = nnx.List([TextLayer(width, num_heads, rngs=rngs) for _ in range(num_layers)])
        self.ln_final = layer_norm(width, rngs=rngs)
        self.max_len = max_len

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens int32 [B, L] (L <= max_len); mask bool [B, L] -> states [B, L, width]."""
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"text has {tokens.shape[1]} tokens, the encoder takes at most {self.max_len}")
        x = self.token_embed(tokens) + self.pos_embed[...][: tokens.shape[1]][None]
        for layer in self.layers:
            x = layer(x, mask)
        return self.ln_final(x).astype(jnp.float32)
