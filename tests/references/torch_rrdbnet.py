"""PyTorch reference for the Real-ESRGAN generator: basicsr's ``archs/rrdbnet_arch.py`` transcribed in plain torch.

basicsr is not a dependency (it pulls in torchvision, opencv and lmdb, and its ``degradations.py`` imports a
module torchvision no longer ships), so this file copies the published network statement for statement:

- ``basicsr/archs/arch_util.py``: ``pixel_unshuffle`` (view ``[b, c, h, s, w, s]``, permute
  ``(0, 1, 3, 5, 2, 4)``: channel-major, then row offset, then column offset) and ``make_layer``
  (an ``nn.Sequential`` of ``num_block`` blocks, so the state-dict names are ``body.0.``, ``body.1.``, ...);
- ``basicsr/archs/rrdbnet_arch.py``: ``ResidualDenseBlock`` (five 3x3 convs, dense concatenation,
  LeakyReLU 0.2, ``x5 * 0.2 + x``), ``RRDB`` (``rdb1``..``rdb3``, ``out * 0.2 + x``) and ``RRDBNet``
  (``conv_first``, ``body``, ``conv_body``, two nearest x2 ``F.interpolate`` + ``conv_up1`` / ``conv_up2`` +
  LeakyReLU, ``conv_hr`` + LeakyReLU, ``conv_last``; for ``scale`` 2 / 1 the input is pixel-unshuffled by
  2 / 4 and ``conv_first`` takes 4x / 16x the channels).

The state-dict names are therefore those of ``RealESRGAN_x4plus.pth`` (under its ``params_ema`` key).
Initialisation is torch's default (the tests re-draw every parameter anyway); ``default_init_weights`` of
the original only matters for training from scratch. The LeakyReLUs are not in place (same values).
"""

import torch
import torch.nn.functional as F
from torch import nn


def pixel_unshuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """basicsr ``arch_util.pixel_unshuffle``: ``[b, c, hh, hw] -> [b, c * scale**2, hh / scale, hw / scale]``."""
    b, c, hh, hw = x.size()
    out_channel = c * (scale**2)
    assert hh % scale == 0 and hw % scale == 0
    h = hh // scale
    w = hw // scale
    x_view = x.view(b, c, h, scale, w, scale)
    return x_view.permute(0, 1, 3, 5, 2, 4).reshape(b, out_channel, h, w)


def make_layer(basic_block, num_basic_block, **kwarg):
    """basicsr ``arch_util.make_layer``."""
    layers = []
    for _ in range(num_basic_block):
        layers.append(basic_block(**kwarg))
    return nn.Sequential(*layers)


class ResidualDenseBlock(nn.Module):
    """Residual Dense Block, used in the RRDB block of ESRGAN."""

    def __init__(self, num_feat=64, num_grow_ch=32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        # Empirically, we use 0.2 to scale the residual for better performance
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual in Residual Dense Block."""

    def __init__(self, num_feat, num_grow_ch=32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x):
        out = self.rdb1(x)
        out = self.rdb2(out)
        out = self.rdb3(out)
        # Empirically, we use 0.2 to scale the residual for better performance
        return out * 0.2 + x


class RRDBNet(nn.Module):
    """Networks consisting of Residual in Residual Dense Block, used in ESRGAN and Real-ESRGAN."""

    def __init__(self, num_in_ch, num_out_ch, scale=4, num_feat=64, num_block=23, num_grow_ch=32):
        super().__init__()
        self.scale = scale
        if scale == 2:
            num_in_ch = num_in_ch * 4
        elif scale == 1:
            num_in_ch = num_in_ch * 16
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = make_layer(RRDB, num_block, num_feat=num_feat, num_grow_ch=num_grow_ch)
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        # upsample
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x):
        if self.scale == 2:
            feat = pixel_unshuffle(x, scale=2)
        elif self.scale == 1:
            feat = pixel_unshuffle(x, scale=4)
        else:
            feat = x
        feat = self.conv_first(feat)
        body_feat = self.conv_body(self.body(feat))
        feat = feat + body_feat
        # upsample
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        return out
