"""Edge-supervised learning (paper sec. 3.2, App. 7.2).

An ``EdgeHead`` P(M) of 5 conv layers predicts an edge map from one block's cross-attention map M,
by default the column of the pooled (EOT) text token reshaped to the block's H x W. The loss is
the focal loss (alpha 0.5, gamma 2) against the training image's edge map resized to H x W,
switched on only for ``t < T_c`` (T_c = 500 of 1000).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from raphael_jax.models.layers import conv


class EdgeHead(nnx.Module):
    """``num_layers`` 3x3 convs (GELU between) from a 1-channel attention map to 1 edge logit per pixel.

    The input map is divided by its per-sample maximum so the head sees a scale-free map.
    """

    def __init__(self, channels: int = 32, num_layers: int = 5, *, rngs: nnx.Rngs, dtype=None):
        if num_layers < 2:
            raise ValueError(f"edge head needs at least 2 conv layers, got {num_layers}")
        widths = [1] + [channels] * (num_layers - 1) + [1]
        self.convs = nnx.List([conv(widths[i], widths[i + 1], 3, rngs=rngs, dtype=dtype)
                               for i in range(num_layers)])

    def __call__(self, attn_map: jax.Array) -> jax.Array:
        """attn_map [B, H, W] -> edge logits [B, H, W]."""
        x = attn_map / (attn_map.max(axis=(1, 2), keepdims=True) + 1e-6)
        x = x[..., None]
        for i, c in enumerate(self.convs):
            x = c(x)
            if i < len(self.convs) - 1:
                x = jax.nn.gelu(x)
        return x[..., 0].astype(jnp.float32)


def select_token_map(attn: jax.Array, context_mask: jax.Array, spatial: tuple[int, int],
                     token: str = "eot") -> jax.Array:
    """The attention column the edge head reads, as an image [B, H, W].

    ``token="eot"``: the pooled token (the last real token, where the tokenizers put EOS/EOT);
    ``token="mean"``: the mean of all real tokens' columns.
    """
    b = attn.shape[0]
    if token == "eot":
        idx = jnp.maximum(context_mask.sum(axis=1) - 1, 0).astype(jnp.int32)
        col = jnp.take_along_axis(attn, idx[:, None, None], axis=2)[..., 0]
    elif token == "mean":
        m = context_mask.astype(attn.dtype)
        col = (attn * m[:, None, :]).sum(-1) / jnp.maximum(m.sum(-1), 1.0)[:, None]
    else:
        raise ValueError(f"edge.token must be 'eot' or 'mean', got {token!r}")
    return col.reshape(b, *spatial)


def focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.5, gamma: float = 2.0) -> jax.Array:
    """Element-wise binary focal loss (Lin et al.): ``-alpha_t (1 - p_t)^gamma log p_t``.

    ``p = sigmoid(logits)``, ``p_t = p`` where the target is 1 else ``1 - p``, ``alpha_t = alpha``
    where the target is 1 else ``1 - alpha``. Computed from logits for stability.
    """
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    log_p = jax.nn.log_sigmoid(logits)
    log_1mp = jax.nn.log_sigmoid(-logits)
    log_pt = targets * log_p + (1 - targets) * log_1mp
    pt = jnp.exp(log_pt)
    alpha_t = targets * alpha + (1 - targets) * (1 - alpha)
    return -alpha_t * (1 - pt) ** gamma * log_pt


def resize_edges(edges: jax.Array, spatial: tuple[int, int]) -> jax.Array:
    """Binary edge map [B, H0, W0] -> [B, H, W] by max-pooling (a cell is an edge if any pixel is)."""
    b, h0, w0 = edges.shape
    h, w = spatial
    if h0 % h or w0 % w:
        raise ValueError(f"edge map {h0}x{w0} does not tile into the block's {h}x{w} attention map")
    return edges.reshape(b, h, h0 // h, w, w0 // w).max(axis=(2, 4))


def edge_loss(edge_logits: list[jax.Array], edges: jax.Array, t: jax.Array, t_c: int,
              alpha: float = 0.5, gamma: float = 2.0) -> jax.Array:
    """``L_edge``: focal loss per block, mean over pixels, mean over blocks, only samples with t < T_c.

    Samples with ``t >= T_c`` contribute exactly zero; the sum over samples is divided by the batch
    size, so the term is the batch mean of per-sample losses with the gate applied (weight 1 in
    the total loss, as in the paper).
    """
    if not edge_logits:
        return jnp.zeros((), jnp.float32)
    gate = (t < t_c).astype(jnp.float32)
    per_block = []
    for logits in edge_logits:
        target = resize_edges(edges, logits.shape[1:])
        per_block.append(focal_loss(logits, target, alpha, gamma).mean(axis=(1, 2)))
    per_sample = jnp.stack(per_block).mean(0)
    return (per_sample * gate).sum() / t.shape[0]
