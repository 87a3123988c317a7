"""Pre-activation WideResNet (Zagoruyko & Komodakis, 2016), the CIFAR/SVHN model of Section 4.1.

WRN-28-k: a 3x3 stem with 16 channels, three groups of four pre-activation blocks with 16k, 32k and
64k channels (the 2nd and 3rd group start with stride 2), then BN -> activation -> global average
pool -> dropout -> linear. WRN-28-2 has 1,467,610 parameters for 10 classes (the paper: "1.5 M").

As in the MPL and MixMatch reference code: the activation is a leaky ReLU (slope 0.2 in the MPL
code's ``relu`` helper, 0.1 in MixMatch/FixMatch; ``leaky_slope`` picks), where a block changes width
or resolution its 1x1 shortcut reads the *activated* input, BN epsilon is TF's 1e-3, BN decay 0.99.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metapl.models.layers import BN_MOMENTUM, batch_norm, conv1x1, conv3x3, init_conv_net
from metapl.models.registry import register_model


class PreActBlock(nn.Module):
    """BN -> act -> conv3x3(stride) -> BN -> act -> conv3x3, plus the (projected) input."""

    def __init__(self, c_in: int, c_out: int, stride: int, slope: float, bn):
        super().__init__()
        self.slope = slope
        self.bn1 = bn(c_in)
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn2 = bn(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.shortcut = conv1x1(c_in, c_out, stride) if stride != 1 or c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        a = F.leaky_relu(self.bn1(x), self.slope)
        residual = x if self.shortcut is None else self.shortcut(a)
        out = self.conv1(a)
        out = self.conv2(F.leaky_relu(self.bn2(out), self.slope))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-k for small images; ``forward(x [N, C, H, W]) -> logits [N, num_classes]``."""

    def __init__(
        self,
        num_classes: int,
        depth: int = 28,
        widen_factor: int = 2,
        dropout: float = 0.0,
        in_chans: int = 3,
        leaky_slope: float = 0.2,
        bn_momentum: float = BN_MOMENTUM,
        bn_eps: float = 1e-3,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        blocks_per_group = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]

        def bn(c: int) -> nn.BatchNorm2d:
            return batch_norm(c, bn_momentum, bn_eps)

        self.slope = leaky_slope
        self.stem = conv3x3(in_chans, 16)
        blocks: list[nn.Module] = []
        c_in = 16
        for group, c_out in enumerate(widths):
            for i in range(blocks_per_group):
                stride = 2 if group > 0 and i == 0 else 1
                blocks.append(PreActBlock(c_in, c_out, stride, leaky_slope, bn))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = bn(c_in)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, num_classes)
        self.num_features = c_in
        init_conv_net(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        x = F.leaky_relu(self.bn(x), self.slope).mean(dim=(2, 3))
        return self.fc(self.dropout(x))


@register_model
def wrn28_2(
    num_classes: int,
    dropout: float = 0.0,
    in_chans: int = 3,
    leaky_slope: float = 0.2,
    bn_momentum: float = BN_MOMENTUM,
    bn_eps: float = 1e-3,
) -> WideResNet:
    """WRN-28-2 (1.47 M parameters): the CIFAR-10 / SVHN model of Section 4.1."""
    return WideResNet(num_classes, 28, 2, dropout, in_chans, leaky_slope, bn_momentum, bn_eps)


@register_model
def wrn28_8(
    num_classes: int,
    dropout: float = 0.0,
    in_chans: int = 3,
    leaky_slope: float = 0.2,
    bn_momentum: float = BN_MOMENTUM,
    bn_eps: float = 1e-3,
) -> WideResNet:
    """WRN-28-8 (23.4 M parameters): the larger WRN of the SSL literature."""
    return WideResNet(num_classes, 28, 8, dropout, in_chans, leaky_slope, bn_momentum, bn_eps)
