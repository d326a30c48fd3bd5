"""ControlNet for the RAPHAEL U-Net (paper App. 7.8: RAPHAEL conditioned on Canny edges).

Zhang et al.'s ControlNet: a trainable copy of the denoiser's encoder (time embedding, ``conv_in``,
the down path and the middle) reads ``conv_in(x_t) + HintEncoder(control image)`` and hands the
frozen U-Net one residual per skip connection plus one for the middle, each through a
zero-initialised 1x1 conv::

    down_residuals, mid_residual = ControlNet(x_t, t, text, mask, hint, scale=s)
    out = unet(x_t, t, text, mask, down_residuals=down_residuals, mid_residual=mid_residual)

(``controlled_unet_apply`` does both). With the zero convs at zero the controlled U-Net is exactly
the base U-Net, and the zero convs still receive gradients, so training starts from the base model.

The copy has the U-Net's layer structure and attribute names (``temb_fc1``, ``temb_fc2``,
``conv_in``, ``text_temb``, ``down``, ``mid_res1``, ``mid_attn``, ``mid_res2``), so
``init_from_unet`` / ``ControlNet.from_unet`` copy the base weights by path. Its RAPHAEL blocks
have no edge heads (they are called with ``with_edges=False``; their parameters would only decay).
The ControlNet's own layers are ``hint_encoder``, ``zero_convs`` (one per skip) and
``mid_zero_conv``. Its MoEs sow routing statistics like the U-Net's: take them out with
``raphael_jax.models.routing.pop_intermediates(controlnet)`` when the module is long-lived.

Hint encoder: the control image [B, H_hint, W_hint, control_channels] goes through the same
space-to-depth as the U-Net's stem, by ``hint_factor`` = H_hint / (conv_in's output height)
(default ``model.patch_size``: the hint at the sample's resolution; for a latent model with an
image-resolution hint pass 8 * patch_size), then three 3x3 convs with SiLU at conv_in's resolution
and a zero-initialised 3x3 conv to conv_in's width. Space-to-depth keeps every hint pixel (no
strided-conv information loss) and costs about one level-0 ResBlock.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from raphael_jax.models.block import RaphaelBlock
from raphael_jax.models.layers import conv, dense
from raphael_jax.models.unet import (
    RaphaelUNet,
    ResBlock,
    block_runner,
    build_down_path,
    compute_dtype,
    embed_time_and_text,
    remat_policy,
    run_down_path,
    space_to_depth,
)

# top-level attributes of a ControlNet with no counterpart in the U-Net (init_from_unet keeps them)
CONTROL_ONLY = ("hint_encoder", "zero_convs", "mid_zero_conv")


class HintEncoder(nnx.Module):
    """Control image -> conv_in's resolution and width: space-to-depth, 3 x (3x3 conv + SiLU), zero conv."""

    def __init__(self, channels: int, width: int, out: int, factor: int, *, rngs: nnx.Rngs, dtype=None):
        self.factor = factor
        self.conv1 = conv(channels * factor * factor, width, 3, rngs=rngs, dtype=dtype)
        self.conv2 = conv(width, width, 3, rngs=rngs, dtype=dtype)
        self.conv3 = conv(width, width, 3, rngs=rngs, dtype=dtype)
        self.conv_out = conv(width, out, 3, rngs=rngs, dtype=dtype, zero_init=True)

    def __call__(self, hint: jax.Array) -> jax.Array:
        h = space_to_depth(hint, self.factor) if self.factor > 1 else hint
        h = jax.nn.silu(self.conv1(h))
        h = jax.nn.silu(self.conv2(h))
        h = jax.nn.silu(self.conv3(h))
        return self.conv_out(h)


class ControlNet(nnx.Module):
    """``(down_residuals, mid_residual) = ControlNet(x_t, t, context, mask, hint)`` for a ``RaphaelUNet``.

    ``cfg`` is the U-Net's ``model`` config. ``control_channels``: channels of the hint (1 for an
    edge map); ``hint_factor``: hint resolution / conv_in's output resolution (default
    ``cfg.patch_size``); ``hint_width``: the hint encoder's width (default ``cfg.channels[0]``).
    """

    def __init__(self, cfg, *, control_channels: int = 1, hint_factor: int | None = None,
                 hint_width: int | None = None, rngs: nnx.Rngs):
        dtype = compute_dtype(cfg)
        self.cfg = cfg
        ch = tuple(cfg.channels)
        if len(cfg.block_levels) != len(ch) or len(cfg.self_attention_levels) != len(ch):
            raise ValueError("model.block_levels and model.self_attention_levels need one entry per level "
                             f"of model.channels={ch}")
        if control_channels < 1:
            raise ValueError(f"control_channels must be >= 1, got {control_channels}")
        p = cfg.patch_size
        hint_factor = p if hint_factor is None else int(hint_factor)
        if hint_factor < 1:
            raise ValueError(f"hint_factor must be >= 1, got {hint_factor}")
        temb_dim = 4 * ch[0]
        self.patch_size = p
        self.control_channels = control_channels
        self.hint_factor = hint_factor
        self.remat, self.remat_policy = remat_policy(cfg.remat)
        # the U-Net's encoder, same names and construction order (init_from_unet copies by path)
        self.temb_fc1 = dense(ch[0], temb_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.temb_fc2 = dense(temb_dim, temb_dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.conv_in = conv(cfg.in_channels * p * p, ch[0], 3, rngs=rngs, dtype=dtype)
        self.text_temb = nnx.data(dense(cfg.context_dim, temb_dim, ("context", "embed"), rngs=rngs, dtype=dtype,
                                        kernel_init=nnx.initializers.zeros_init())
                                  if cfg.text_temb else None)
        g = cfg.norm_groups
        block_cfg = copy.deepcopy(cfg)
        block_cfg.edge.enabled = False  # no edge heads in the copy

        def block(c, level):
            return RaphaelBlock(c, cfg.context_dim, temb_dim, block_cfg,
                                self_attention=bool(cfg.self_attention_levels[level]), rngs=rngs, dtype=dtype)

        self.down_kinds, self.down, skips_ch, cur = build_down_path(cfg, temb_dim, block, rngs=rngs, dtype=dtype)
        self.mid_res1 = ResBlock(cur, cur, temb_dim, g, rngs=rngs, dtype=dtype)
        self.mid_attn = nnx.data(block(cur, len(ch) - 1) if cfg.mid_block else None)
        self.mid_res2 = ResBlock(cur, cur, temb_dim, g, rngs=rngs, dtype=dtype)
        # the ControlNet's own layers
        self.hint_encoder = HintEncoder(control_channels, hint_width or ch[0], ch[0], hint_factor,
                                        rngs=rngs, dtype=dtype)
        self.zero_convs = nnx.List([conv(c, c, 1, rngs=rngs, dtype=dtype, zero_init=True) for c in skips_ch])
        self.mid_zero_conv = conv(cur, cur, 1, rngs=rngs, dtype=dtype, zero_init=True)

    @classmethod
    def from_unet(cls, unet, *, control_channels: int = 1, hint_factor: int | None = None,
                  hint_width: int | None = None, rngs: nnx.Rngs | None = None) -> ControlNet:
        """A ControlNet for ``unet`` (a ``RaphaelUNet`` or a ``RaphaelModel``) initialised from its weights."""
        unet = _base_unet(unet)
        net = cls(unet.cfg, control_channels=control_channels, hint_factor=hint_factor, hint_width=hint_width,
                  rngs=rngs if rngs is not None else nnx.Rngs(0))
        nnx.update(net, init_from_unet(nnx.state(net, nnx.Param), nnx.state(unet, nnx.Param)))
        return net

    @property
    def num_blocks(self) -> int:
        return self.down_kinds.count("attn") + int(self.mid_attn is not None)

    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, context_mask: jax.Array, hint: jax.Array,
                 *, scale: float | jax.Array = 1.0,
                 key: jax.Array | None = None) -> tuple[list[jax.Array], jax.Array]:
        """x [B, H, W, C_in]; t [B]; context [B, L, D_y] text states; mask [B, L]; hint [B, H_h, W_h, C_ctl].

        Returns ``(down_residuals, mid_residual)`` times ``scale``: one residual per skip connection of
        the U-Net (its shape) and one of the middle's output. ``key`` enables router noise (training).
        """
        dtype = compute_dtype(self.cfg)
        p, f = self.patch_size, self.hint_factor
        if hint.ndim != 4 or hint.shape[-1] != self.control_channels:
            raise ValueError(f"hint: expected [B, H, W, {self.control_channels}], got shape {hint.shape}")
        want = (x.shape[1] // p * f, x.shape[2] // p * f)
        if hint.shape[1:3] != want:
            raise ValueError(f"hint: spatial size {hint.shape[1:3]} does not match the sample {x.shape[1:3]} "
                             f"(patch_size {p}, hint_factor {f}: expected {want})")
        temb, temb_res, context = embed_time_and_text(self, t, context, context_mask, dtype)
        run_block = block_runner(self, temb, context, context_mask, key, False, False)
        h = x.astype(dtype)
        if p > 1:
            h = space_to_depth(h, p)
        h, skips = run_down_path(self, self.conv_in(h) + self.hint_encoder(hint.astype(dtype)), temb_res, run_block)
        h = self.mid_res1(h, temb_res)
        if self.mid_attn is not None:
            h = run_block(self.mid_attn, h)
        h = self.mid_res2(h, temb_res)
        down_residuals = [zc(s) * scale for zc, s in zip(self.zero_convs, skips)]
        return down_residuals, self.mid_zero_conv(h) * scale


def _base_unet(model) -> RaphaelUNet:
    """The ``RaphaelUNet`` of a ``RaphaelUNet`` or a ``RaphaelModel``."""
    return model if isinstance(model, RaphaelUNet) else model.unet


def controlled_unet_apply(unet, controlnet: ControlNet, x: jax.Array, t: jax.Array, context: jax.Array,
                          mask: jax.Array, hint: jax.Array, scale: float | jax.Array = 1.0, *,
                          key: jax.Array | None = None, **kw) -> jax.Array:
    """``unet(x, t, context, mask, key=key, down_residuals=..., mid_residual=..., **kw)`` (residuals: ``controlnet``).

    ``unet`` is a ``RaphaelUNet`` (``context``: text states) or a ``RaphaelModel`` (``context``: what
    its ``__call__`` takes; a trainable text encoder runs once and feeds both nets). ``key`` goes to the
    U-Net unchanged (same router noise as a plain call) and ``fold_in(key, 1)`` to the ControlNet;
    ``kw`` (``record_masks``, ``with_edges``) go to the U-Net.
    """
    if not isinstance(unet, RaphaelUNet) and getattr(unet, "text", None) is not None:
        context = unet.encode_text(context, mask)
    base = _base_unet(unet)
    down, mid = controlnet(x, t, context, mask, hint, scale=scale,
                           key=jax.random.fold_in(key, 1) if key is not None else None)
    return base(x, t, context, mask, key=key, down_residuals=down, mid_residual=mid, **kw)


def init_from_unet(controlnet_params: nnx.State, unet_params: nnx.State) -> nnx.State:
    """A copy of ``controlnet_params`` whose encoder weights are the U-Net's (the ControlNet's init).

    ``unet_params``: ``nnx.state(unet, nnx.Param)`` of a ``RaphaelUNet`` (or of a ``RaphaelModel``:
    its ``unet`` sub-tree is used). Every ControlNet parameter outside ``CONTROL_ONLY`` is copied
    from the same path (fresh buffers: donating one side never deletes the other); the hint encoder
    and zero convs are kept. A path missing from the U-Net or a shape mismatch raises ``ValueError``.
    """
    src = nnx.to_pure_dict(unet_params)
    if "unet" in src and "down" not in src:
        src = src["unet"]
    src = traverse_util.flatten_dict(src)
    dst = traverse_util.flatten_dict(nnx.to_pure_dict(controlnet_params))
    missing, bad = [], []
    for path, value in dst.items():
        if path[0] in CONTROL_ONLY:
            continue
        name = "/".join(map(str, path))
        if path not in src:
            missing.append(name)
        elif tuple(src[path].shape) != tuple(value.shape):
            bad.append(f"{name} {tuple(src[path].shape)} vs {tuple(value.shape)}")
        else:
            dst[path] = jnp.array(src[path], dtype=value.dtype, copy=True)
    if missing or bad:
        raise ValueError("init_from_unet: the U-Net does not match the ControlNet (built from another model "
                         f"config?); missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                         f"shape mismatch: {bad[:5]}{'...' if len(bad) > 5 else ''}")
    out = jax.tree.map(lambda v: v, controlnet_params)
    nnx.replace_by_pure_dict(out, traverse_util.unflatten_dict(dst))
    return out


CONTROL_MODES = ("canny", "map")


def control_image(path_or_array, height: int, width: int, mode: str = "canny", *,
                  edge_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """A control image for sampling: float32 [height, width, 1] in [0, 1].

    ``path_or_array``: a PNG/JPEG path or an image array (uint8, or float in [0, 1]; [H, W] or
    [H, W, C]). ``mode="canny"``: the image is resized to ``height x width`` (bilinear) and
    ``edge_fn`` (uint8 [H, W, 3] -> {0, 1} [H, W]) gives the edges at that size; pass
    ``raphael_jax.data.edges.canny`` (the model layer may not import ``data``; resizing first keeps
    one-pixel edges that a nearest downsample of a full-size edge map would drop).
    ``mode="map"``: a single-channel map (greyscale of the image) resized by nearest neighbour.
    An unreadable file raises ``ValueError`` naming it.
    """
    from PIL import Image

    if mode not in CONTROL_MODES:
        raise ValueError(f"control_image: mode must be one of {CONTROL_MODES}, got {mode!r}")
    if mode == "canny" and edge_fn is None:
        raise ValueError("control_image: mode='canny' needs edge_fn (e.g. raphael_jax.data.edges.canny)")
    if height < 1 or width < 1:
        raise ValueError(f"control_image: height and width must be positive, got {height}x{width}")
    if isinstance(path_or_array, (str, Path)):
        name = str(path_or_array)
        try:
            with Image.open(name) as im:
                im.load()
                img = im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:  # missing, unidentified, truncated
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"control image {name}: cannot read it as an image ({msg})") from None
    else:
        a = np.asarray(path_or_array)
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
            raise ValueError(f"control_image: expected an [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] array, "
                             f"got shape {a.shape}")
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        img = Image.fromarray(a).convert("RGB")
    if mode == "canny":
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        out = np.asarray(edge_fn(np.asarray(img)), np.float32)
    else:
        grey = img.convert("L")
        if grey.size != (width, height):
            grey = grey.resize((width, height), Image.Resampling.NEAREST)
        out = np.asarray(grey, np.float32) / 255.0
    return np.clip(out, 0.0, 1.0)[..., None]
