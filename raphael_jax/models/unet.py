"""The RAPHAEL denoiser: an SD-layout U-Net whose attention blocks are RAPHAEL blocks.

Layout (``model`` config): an optional ``patch_size`` space-to-depth stem (pixel models), levels
of ``channels``, ``num_res_blocks`` ResNet blocks per level on the way down (one more on the way
up, fed by skip connections), a RAPHAEL block after every ResNet block of the levels flagged in
``block_levels``, and ``ResBlock -> RaphaelBlock -> ResBlock`` in the middle. With SD's
``channels=(c, 2c, 4c, 4c)``, ``num_res_blocks=2``, ``block_levels=(1, 1, 1, 0)`` that is
2+2+2 down, 1 mid, 3+3+3 up = the paper's 16 blocks.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from raphael_jax.models.block import RaphaelBlock
from raphael_jax.models.layers import conv, dense, group_norm, timestep_embedding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# model.remat: what a RAPHAEL block keeps for its backward pass. "full" keeps only its inputs and
# recomputes the rest; "dots" keeps the outputs of its weight matmuls (projections, experts, FFNs)
# and recomputes the attention maps, norms and element-wise ops (batched dots are not saved).
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_policy(value):
    """``(enabled, policy)`` for a ``model.remat`` value (True/False: runs saved before the policies)."""
    if isinstance(value, bool):
        value = "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {tuple(REMAT_POLICIES)}, got {value!r}")
    return value != "none", REMAT_POLICIES[value]


def compute_dtype(cfg):
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    return DTYPES[cfg.dtype]


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-conv twice, timestep embedding added in between, 1x1 skip when widths differ."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, *, rngs: nnx.Rngs, dtype=None):
        self.norm1 = group_norm(cin, groups, rngs=rngs, dtype=dtype)
        self.conv1 = conv(cin, cout, 3, rngs=rngs, dtype=dtype)
        self.temb = dense(temb_dim, cout, ("embed", "conv_out"), rngs=rngs, dtype=dtype)
        self.norm2 = group_norm(cout, groups, rngs=rngs, dtype=dtype)
        self.conv2 = conv(cout, cout, 3, rngs=rngs, dtype=dtype, zero_init=True)
        self.skip = nnx.data(conv(cin, cout, 1, rngs=rngs, dtype=dtype) if cin != cout else None)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.temb(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (self.skip(x) if self.skip is not None else x) + h


class Downsample(nnx.Module):
    def __init__(self, ch: int, *, rngs: nnx.Rngs, dtype=None):
        self.conv = conv(ch, ch, 3, stride=2, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest 2x (``jnp.repeat``, far cheaper than ``jax.image.resize`` on XLA:CPU) then 3x3 conv."""

    def __init__(self, ch: int, *, rngs: nnx.Rngs, dtype=None):
        self.conv = conv(ch, ch, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    b, h, w, c = x.shape
    c0 = c // (p * p)
    return x.reshape(b, h, w, p, p, c0).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, c0)


def build_down_path(cfg, temb_dim: int, block, *, rngs: nnx.Rngs, dtype=None):
    """The encoder's layers in order, shared by the U-Net and its ControlNet copy (same construction order,
    so the same names and the same random init): ``(kinds, nnx.List of layers, skip widths, bottom width)``.
    ``block(width, level)`` builds a RAPHAEL block."""
    ch = tuple(cfg.channels)
    down, skips_ch, cur = [], [ch[0]], ch[0]
    for lvl, c in enumerate(ch):
        for _ in range(cfg.num_res_blocks):
            down.append(("res", ResBlock(cur, c, temb_dim, cfg.norm_groups, rngs=rngs, dtype=dtype)))
            cur = c
            if cfg.block_levels[lvl]:
                down.append(("attn", block(c, lvl)))
            skips_ch.append(cur)
        if lvl < len(ch) - 1:
            down.append(("down", Downsample(cur, rngs=rngs, dtype=dtype)))
            skips_ch.append(cur)
    return tuple(k for k, _ in down), nnx.List([m for _, m in down]), skips_ch, cur


def embed_time_and_text(net, t, context, context_mask, dtype):
    """``(temb, temb_res, context)`` of a U-Net or ControlNet ``net``: the timestep embedding (the RAPHAEL
    blocks' and time-MoE gates'), the ResBlocks' one (plus the pooled text with ``model.text_temb``) and the
    text states in the compute dtype."""
    temb = net.temb_fc2(jax.nn.silu(net.temb_fc1(timestep_embedding(t, net.cfg.channels[0]).astype(dtype))))
    context = context.astype(dtype)
    temb_res = temb
    if net.text_temb is not None:
        w = context_mask.astype(context.dtype)[..., None]
        pooled = (context * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        temb_res = temb + net.text_temb(pooled)
    return temb, temb_res, context


def block_runner(net, temb, context, context_mask, key, record_masks: bool, with_edges: bool):
    """``run_block(block, h)`` for ``net``'s RAPHAEL blocks in call order: each gets its own router-noise key
    (split from ``key``) and, in training, ``net``'s remat policy."""
    keys = iter(jax.random.split(key, net.num_blocks) if key is not None else [None] * net.num_blocks)

    def run_block(m, h):
        fn = lambda m, h, k: m(h, temb, context, context_mask, k, record_masks, with_edges)  # noqa: E731
        # remat in training only (the step passes the router-noise key): nothing differentiates
        # inference, and nnx.remat cannot run on weights closed over by a scan (the DDIM loop)
        if net.remat and key is not None:
            fn = nnx.remat(fn, policy=net.remat_policy)
        return fn(m, h, next(keys))

    return run_block


def run_down_path(net, h, temb_res, run_block):
    """``(h, skips)`` after ``net``'s down path from the stem output ``h``: one skip per skip connection (a
    RAPHAEL block replaces the skip of the ResBlock before it)."""
    skips = [h]
    for kind, m in zip(net.down_kinds, net.down):
        if kind == "res":
            h = m(h, temb_res)
        elif kind == "attn":
            h = run_block(m, h)
            skips[-1] = h
            continue
        else:
            h = m(h)
        skips.append(h)
    return h, skips


class RaphaelUNet(nnx.Module):
    """``eps_or_v = UNet(x_t, t, text tokens E(y), text mask)``; blocks sow routing and edge logits."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        dtype = compute_dtype(cfg)
        self.cfg = cfg
        ch = tuple(cfg.channels)
        if len(cfg.block_levels) != len(ch) or len(cfg.self_attention_levels) != len(ch):
            raise ValueError("model.block_levels and model.self_attention_levels need one entry per level "
                             f"of model.channels={ch}")
        p = cfg.patch_size
        temb_dim = 4 * ch[0]
        self.patch_size = p
        self.remat, self.remat_policy = remat_policy(cfg.remat)
        self.temb_fc1 = dense(ch[0], temb_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.temb_fc2 = dense(temb_dim, temb_dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.conv_in = conv(cfg.in_channels * p * p, ch[0], 3, rngs=rngs, dtype=dtype)
        # optional pooled-text conditioning of the ResBlocks (Imagen / SDXL style): the masked mean of
        # the text states, projected and added to the ResBlocks' timestep embedding. The RAPHAEL
        # blocks (and so the time-MoE gates) keep the pure timestep embedding.
        self.text_temb = nnx.data(dense(cfg.context_dim, temb_dim, ("context", "embed"), rngs=rngs, dtype=dtype,
                                        kernel_init=nnx.initializers.zeros_init())
                                  if cfg.text_temb else None)
        g = cfg.norm_groups

        def block(c, level):
            return RaphaelBlock(c, cfg.context_dim, temb_dim, cfg,
                                self_attention=bool(cfg.self_attention_levels[level]), rngs=rngs, dtype=dtype)

        self.down_kinds, self.down, skips_ch, cur = build_down_path(cfg, temb_dim, block, rngs=rngs, dtype=dtype)
        self.mid_res1 = ResBlock(cur, cur, temb_dim, g, rngs=rngs, dtype=dtype)
        self.mid_attn = nnx.data(block(cur, len(ch) - 1) if cfg.mid_block else None)
        self.mid_res2 = ResBlock(cur, cur, temb_dim, g, rngs=rngs, dtype=dtype)
        up = []
        for lvl in reversed(range(len(ch))):
            c = ch[lvl]
            for _ in range(cfg.num_res_blocks + 1):
                up.append(("res", ResBlock(cur + skips_ch.pop(), c, temb_dim, g, rngs=rngs, dtype=dtype)))
                cur = c
                if cfg.block_levels[lvl]:
                    up.append(("attn", block(c, lvl)))
            if lvl > 0:
                up.append(("up", Upsample(cur, rngs=rngs, dtype=dtype)))
        self.up_kinds = tuple(k for k, _ in up)
        self.up = nnx.List([m for _, m in up])
        self.norm_out = group_norm(cur, g, rngs=rngs, dtype=dtype)
        self.conv_out = conv(cur, cfg.in_channels * p * p, 3, rngs=rngs, dtype=dtype, zero_init=True)

    @property
    def num_blocks(self) -> int:
        return self.down_kinds.count("attn") + self.up_kinds.count("attn") + int(self.mid_attn is not None)

    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, context_mask: jax.Array, *,
                 key: jax.Array | None = None, record_masks: bool = False, with_edges: bool = True,
                 down_residuals: Sequence[jax.Array] | None = None,
                 mid_residual: jax.Array | None = None) -> jax.Array:
        """x [B, H, W, C_in] noisy image/latent; t [B] int timesteps; context [B, L, D_y]; mask [B, L].

        ``key`` enables router noise (training); ``record_masks`` sows region masks and attention
        maps; ``with_edges`` runs the edge heads (training only; they never feed the output).
        ``down_residuals`` (one per skip connection, in down-path order) and ``mid_residual`` are
        ControlNet residuals (``raphael_jax.models.controlnet``), added to the skips and to the
        middle's output before the up path.
        """
        dtype = compute_dtype(self.cfg)
        temb, temb_res, context = embed_time_and_text(self, t, context, context_mask, dtype)
        run_block = block_runner(self, temb, context, context_mask, key, record_masks, with_edges)
        h = x.astype(dtype)
        if self.patch_size > 1:
            h = space_to_depth(h, self.patch_size)
        h, skips = run_down_path(self, self.conv_in(h), temb_res, run_block)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals: expected {len(skips)} (one per skip connection), "
                                 f"got {len(down_residuals)}")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
        h = self.mid_res1(h, temb_res)
        if self.mid_attn is not None:
            h = run_block(self.mid_attn, h)
        h = self.mid_res2(h, temb_res)
        if mid_residual is not None:
            h = h + mid_residual.astype(h.dtype)
        for kind, m in zip(self.up_kinds, self.up):
            if kind == "res":
                h = m(jnp.concatenate([h, skips.pop()], axis=-1), temb_res)
            elif kind == "attn":
                h = run_block(m, h)
            else:
                h = m(h)
        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        if self.patch_size > 1:
            h = depth_to_space(h, self.patch_size)
        return h.astype(jnp.float32)
