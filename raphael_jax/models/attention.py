"""Multi-head self- and cross-attention: projections as einsums (shardable), the attention itself
by one of the kernels of ``raphael_jax/models/attention_kernels.py`` (``model.attention``).

Cross-attention also returns the paper's map ``M = softmax(Q K^T / sqrt(d))`` averaged over heads,
shape [B, n_x, n_y], softmax over the text tokens: the space-MoE region masks and the edge head
read it.
"""
from __future__ import annotations

import jax
from flax import nnx

from raphael_jax.models.attention_kernels import dot_product_attention
from raphael_jax.models.layers import dense, position_embedding_2d


class Attention(nnx.Module):
    """Multi-head dot-product attention.

    Args:
      dim: query (image token) width.
      num_heads: number of heads; ``dim`` must divide by it.
      context_dim: text width for cross-attention, ``None`` for self-attention.
      pos_embed: add a fixed 2D sin-cos embedding to the image queries (cross-attention only);
        needs ``spatial=(H, W)`` at call time.
      impl, chunk: the attention kernel and its query block (``attention_kernels.dot_product_attention``).
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None, pos_embed: bool = False,
                 impl: str = "xla", chunk: int = 1024, rngs: nnx.Rngs, dtype=None):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.impl, self.chunk = impl, chunk
        self.head_dim = dim // num_heads
        self.is_cross = context_dim is not None
        self.pos_embed = pos_embed and self.is_cross
        kv_dim = context_dim if self.is_cross else dim
        kv_names = ("context", "heads") if self.is_cross else ("embed", "heads")
        self.q = dense(dim, dim, ("embed", "heads"), rngs=rngs, use_bias=False, dtype=dtype)
        self.k = dense(kv_dim, dim, kv_names, rngs=rngs, use_bias=False, dtype=dtype)
        self.v = dense(kv_dim, dim, kv_names, rngs=rngs, use_bias=False, dtype=dtype)
        self.out = dense(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, context_mask: jax.Array | None = None,
                 spatial: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array | None]:
        """x [B, N, D]; context [B, L, C]; context_mask [B, L] bool (True = real token).

        Returns (output [B, N, D], head-averaged probabilities [B, N, L] for cross-attention else None).
        """
        b, n, d = x.shape
        q_in = x
        if self.pos_embed:
            if spatial is None:
                raise ValueError("pos_embed cross-attention needs spatial=(H, W)")
            q_in = x + position_embedding_2d(*spatial, d).astype(x.dtype)[None]
        kv_in = context if self.is_cross else x
        q = self.q(q_in).reshape(b, n, self.num_heads, self.head_dim)
        k = self.k(kv_in).reshape(b, kv_in.shape[1], self.num_heads, self.head_dim)
        v = self.v(kv_in).reshape(b, kv_in.shape[1], self.num_heads, self.head_dim)
        out, probs = dot_product_attention(q, k, v, context_mask, impl=self.impl, chunk=self.chunk,
                                           need_map=self.is_cross)
        return self.out(out.reshape(b, n, d)), probs
