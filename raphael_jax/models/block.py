"""The RAPHAEL transformer block (paper Fig. 3 / 8a): self-attn -> cross-attn -> time-MoE -> space-MoE.

Pre-norm with a residual around every sub-layer, inside SD's GroupNorm + proj_in / proj_out
wrapper (the block adds its output to the feature map it was given)::

    x = x + SelfAttn(LN(x))
    a, M = CrossAttn(LN(x), text);  x = x + a        # M: head-averaged map [B, n_x, n_y]
    x = x + TimeMoE(LN(x), t)
    x = x + SpaceMoE(LN(x), M, text)
    edge logits = EdgeHead(M[:, :, eot] as H x W)     # training-only supervision

Ablation switches (``model`` config): ``space_moe.enabled=False`` / ``time_moe.enabled=False``
replace that MoE with a plain GELU FFN of width ``ffn_mult * dim``; ``dense_ffn_mult > 0`` replaces
both with ONE FFN of that width (the dense baseline, sized to the MoE path's active FLOPs);
``edge.enabled=False`` drops the edge head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from raphael_jax.models.attention import Attention
from raphael_jax.models.edge import EdgeHead, select_token_map
from raphael_jax.models.layers import FeedForward, dense, group_norm, layer_norm
from raphael_jax.models.moe import SpaceMoE, TimeMoE


class RaphaelBlock(nnx.Module):
    def __init__(self, dim: int, context_dim: int, temb_dim: int, cfg, *, self_attention: bool = True,
                 rngs: nnx.Rngs, dtype=None):
        heads = max(1, dim // cfg.head_dim)
        self.norm_in = group_norm(dim, cfg.norm_groups, rngs=rngs, dtype=dtype)
        self.proj_in = dense(dim, dim, ("conv_in", "embed"), rngs=rngs, dtype=dtype)
        self.self_attention = self_attention
        if self_attention:
            self.ln_self = layer_norm(dim, rngs=rngs, dtype=dtype)
            self.attn_self = Attention(dim, heads, impl=cfg.attention, chunk=cfg.attention_chunk, rngs=rngs,
                                       dtype=dtype)
        self.ln_cross = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.attn_cross = Attention(dim, heads, context_dim=context_dim, pos_embed=cfg.pos_embed,
                                    impl=cfg.attention, chunk=cfg.attention_chunk, rngs=rngs, dtype=dtype)
        sm, tm = cfg.space_moe, cfg.time_moe
        self.dense_baseline = cfg.dense_ffn_mult > 0
        time_moe = space_moe = time_ffn = space_ffn = dense_ffn = None
        if self.dense_baseline:
            self.ln_dense = layer_norm(dim, rngs=rngs, dtype=dtype)
            dense_ffn = FeedForward(dim, int(cfg.dense_ffn_mult * dim), rngs=rngs, dtype=dtype)
        else:
            self.ln_time = layer_norm(dim, rngs=rngs, dtype=dtype)
            if tm.enabled:
                time_moe = TimeMoE(dim, temb_dim, tm.num_experts, int(tm.hidden_mult * dim),
                                        tm.gate_hidden, router_noise=tm.router_noise, gate_grad=tm.gate_grad,
                                        impl=tm.impl, rngs=rngs, dtype=dtype)
            else:
                time_ffn = FeedForward(dim, int(cfg.ffn_mult * dim), rngs=rngs, dtype=dtype)
            self.ln_space = layer_norm(dim, rngs=rngs, dtype=dtype)
            if sm.enabled:
                space_moe = SpaceMoE(dim, context_dim, sm.num_experts, int(sm.hidden_mult * dim),
                                          sm.gate_hidden, alpha=sm.alpha, router_noise=sm.router_noise,
                                          gate_grad=sm.gate_grad, average=sm.average, rngs=rngs, dtype=dtype)
            else:
                space_ffn = FeedForward(dim, int(cfg.ffn_mult * dim), rngs=rngs, dtype=dtype)
        self.time_moe, self.space_moe = nnx.data(time_moe), nnx.data(space_moe)
        self.time_ffn, self.space_ffn, self.dense_ffn = nnx.data(time_ffn), nnx.data(space_ffn), nnx.data(dense_ffn)
        self.edge_token = cfg.edge.token
        self.edge_head = nnx.data(EdgeHead(cfg.edge.channels, cfg.edge.num_layers, rngs=rngs, dtype=dtype)
                                  if cfg.edge.enabled else None)
        self.proj_out = dense(dim, dim, ("embed", "conv_out"), rngs=rngs, dtype=dtype,
                              kernel_init=nnx.initializers.zeros_init())

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, context_mask: jax.Array,
                 key: jax.Array | None = None, record_masks: bool = False, with_edges: bool = True):
        """x [B, H, W, C] feature map; temb [B, T]; context [B, L, D_y]; context_mask [B, L] bool."""
        b, hgt, wid, c = x.shape
        spatial = (hgt, wid)
        k_time = k_space = None
        if key is not None:
            k_time, k_space = jax.random.split(key)
        h = self.proj_in(self.norm_in(x).reshape(b, hgt * wid, c))
        if self.self_attention:
            h = h + self.attn_self(self.ln_self(h))[0]
        a, attn = self.attn_cross(self.ln_cross(h), context, context_mask, spatial=spatial)
        h = h + a
        if self.dense_baseline:
            h = h + self.dense_ffn(self.ln_dense(h))
        else:
            hn = self.ln_time(h)
            h = h + (self.time_moe(hn, temb, k_time) if self.time_moe is not None else self.time_ffn(hn))
            hn = self.ln_space(h)
            if self.space_moe is not None:
                h = h + self.space_moe(hn, attn, context, context_mask, k_space, record_masks=record_masks)
            else:
                h = h + self.space_ffn(hn)
        if self.edge_head is not None and with_edges:
            logits = self.edge_head(select_token_map(attn, context_mask, spatial, self.edge_token))
            self.sow(nnx.Intermediate, "edge_logits", logits)
        if record_masks:
            self.sow(nnx.Intermediate, "cross_attention", attn.astype(jnp.float32))
        return x + self.proj_out(h).reshape(b, hgt, wid, c)
