"""PyTorch reference for the FID Inception: pytorch-fid 0.3.0's network transcribed in plain torch.

pytorch-fid cannot be imported here: ``pytorch_fid/inception.py`` does ``import torchvision`` and
subclasses ``torchvision.models.inception.InceptionA/C/E``, and no torchvision wheel imports beside
torch 2.13.0 (PyPI's torchvision fails with
"operator torchvision::nms does not exist"). So this file copies, statement for statement:

- torchvision ``models/inception.py``: ``BasicConv2d`` (conv bias=False, BatchNorm2d eps=0.001,
  ReLU), the ``__init__`` of ``InceptionA``..``InceptionE`` (layer names, kernels, paddings,
  strides) and the ``forward`` of ``InceptionB`` / ``InceptionD``, and the stem of ``Inception3``;
- pytorch-fid ``inception.py``: ``FIDInceptionA``, ``FIDInceptionC``, ``FIDInceptionE_1``,
  ``FIDInceptionE_2`` (forward), ``fid_inception_v3`` (which block goes where) and
  ``InceptionV3.forward`` for ``output_blocks=[3]`` (bilinear resize to 299 with
  align_corners=False, 2x - 1, blocks 0-3, adaptive average pool).

State-dict names are therefore those of ``pt_inception-2015-12-05-6726825d.pth`` (``Conv2d_1a_3x3.conv.
weight``, ``Mixed_7c.branch_pool.bn.running_var``; no ``fc``). The only addition is ``div``: every
width divided by ``div`` (at least 8; 1 = the real network), for cheap tests.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _ch(n, div):
    return n if div == 1 else max(8, n // div)


class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features, div=1):
        super().__init__()
        c = lambda n: _ch(n, div)  # noqa: E731
        self.branch1x1 = BasicConv2d(in_channels, c(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, c(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(c(48), c(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, c(pool_features), kernel_size=1)


class FIDInceptionA(InceptionA):
    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_1(x)
        branch5x5 = self.branch5x5_2(branch5x5)
        branch3x3dbl = self.branch3x3dbl_1(x)
        branch3x3dbl = self.branch3x3dbl_2(branch3x3dbl)
        branch3x3dbl = self.branch3x3dbl_3(branch3x3dbl)
        # Patch: Tensorflow's average pool does not use the padded zero's in its average calculation
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels, div=1):
        super().__init__()
        c = lambda n: _ch(n, div)  # noqa: E731
        self.branch3x3 = BasicConv2d(in_channels, c(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_1(x)
        branch3x3dbl = self.branch3x3dbl_2(branch3x3dbl)
        branch3x3dbl = self.branch3x3dbl_3(branch3x3dbl)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels, channels_7x7, div=1):
        super().__init__()
        c = lambda n: _ch(n, div)  # noqa: E731
        self.branch1x1 = BasicConv2d(in_channels, c(192), kernel_size=1)
        c7 = c(channels_7x7)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, c(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, c(192), kernel_size=1)


class FIDInceptionC(InceptionC):
    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_1(x)
        branch7x7 = self.branch7x7_2(branch7x7)
        branch7x7 = self.branch7x7_3(branch7x7)
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)
        # Patch: Tensorflow's average pool does not use the padded zero's in its average calculation
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels, div=1):
        super().__init__()
        c = lambda n: _ch(n, div)  # noqa: E731
        self.branch3x3_1 = BasicConv2d(in_channels, c(192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(c(192), c(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, c(192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(c(192), c(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c(192), c(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c(192), c(192), kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = self.branch3x3_2(branch3x3)
        branch7x7x3 = self.branch7x7x3_1(x)
        branch7x7x3 = self.branch7x7x3_2(branch7x7x3)
        branch7x7x3 = self.branch7x7x3_3(branch7x7x3)
        branch7x7x3 = self.branch7x7x3_4(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
    def __init__(self, in_channels, div=1):
        super().__init__()
        c = lambda n: _ch(n, div)  # noqa: E731
        self.branch1x1 = BasicConv2d(in_channels, c(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, c(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, c(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(448), c(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, c(192), kernel_size=1)

    def _branches(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = [self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)]
        branch3x3 = torch.cat(branch3x3, 1)
        branch3x3dbl = self.branch3x3dbl_1(x)
        branch3x3dbl = self.branch3x3dbl_2(branch3x3dbl)
        branch3x3dbl = [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)]
        branch3x3dbl = torch.cat(branch3x3dbl, 1)
        return branch1x1, branch3x3, branch3x3dbl


class FIDInceptionE_1(InceptionE):  # noqa: N801 (pytorch-fid's name)
    def forward(self, x):
        branch1x1, branch3x3, branch3x3dbl = self._branches(x)
        # Patch: Tensorflow's average pool does not use the padded zero's in its average calculation
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionE_2(InceptionE):  # noqa: N801 (pytorch-fid's name)
    def forward(self, x):
        branch1x1, branch3x3, branch3x3dbl = self._branches(x)
        # Patch: The FID Inception model uses max pooling instead of average pooling.
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionV3(nn.Module):
    """``fid_inception_v3()`` wrapped as ``InceptionV3(output_blocks=[3])`` (pool3, 2048-d at div=1)."""

    def __init__(self, div=1):
        super().__init__()
        c = lambda n: _ch(n, div)  # noqa: E731
        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), kernel_size=3)
        a_out = lambda pf: c(64) + c(64) + c(96) + c(pf)  # noqa: E731
        self.Mixed_5b = FIDInceptionA(c(192), pool_features=32, div=div)
        self.Mixed_5c = FIDInceptionA(a_out(32), pool_features=64, div=div)
        self.Mixed_5d = FIDInceptionA(a_out(64), pool_features=64, div=div)
        self.Mixed_6a = InceptionB(a_out(64), div=div)
        c6 = c(384) + c(96) + a_out(64)
        self.Mixed_6b = FIDInceptionC(c6, channels_7x7=128, div=div)
        self.Mixed_6c = FIDInceptionC(4 * c(192), channels_7x7=160, div=div)
        self.Mixed_6d = FIDInceptionC(4 * c(192), channels_7x7=160, div=div)
        self.Mixed_6e = FIDInceptionC(4 * c(192), channels_7x7=192, div=div)
        self.Mixed_7a = InceptionD(4 * c(192), div=div)
        c7 = c(320) + c(192) + 4 * c(192)
        e_out = c(320) + 4 * c(384) + c(192)
        self.Mixed_7b = FIDInceptionE_1(c7, div=div)
        self.Mixed_7c = FIDInceptionE_2(e_out, div=div)

    def forward(self, inp):
        x = F.interpolate(inp, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # Scale from range (0, 1) to range (-1, 1)
        # block 0
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        # block 1
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        # block 2
        for m in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
        ):
            x = m(x)
        # block 3
        x = self.Mixed_7a(x)
        x = self.Mixed_7b(x)
        x = self.Mixed_7c(x)
        x = F.adaptive_avg_pool2d(x, output_size=(1, 1))
        return x[:, :, 0, 0]


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that keep activations O(1) through the 48 layers (He-normal convs, BatchNorm
    affine and running statistics near identity but not equal to it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.8 + 0.4 * torch.rand(n, generator=g))
    return model.eval()
