"""ResNet-50 (He et al., 2016), the ImageNet model of Section 4.1 (25.6 M parameters).

The standard post-activation bottleneck network, stages [3, 4, 6, 3], with the stride on the 3x3
convolution of a bottleneck (as torchvision and the MPL reference's ``resnet_block``), ReLU, and a
projection shortcut (1x1 conv + BN) where the shape changes. Dropout before the classifier (Table 3:
0.1 on ImageNet), BN decay 0.99, BN epsilon 1e-5 (the TF TPU ResNet's).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metapl.models.layers import BN_MOMENTUM, batch_norm, conv1x1, conv3x3, init_conv_net
from metapl.models.registry import register_model


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv1x1 -> BN, + shortcut, ReLU."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, bn):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = conv1x1(c_in, width)
        self.bn1 = bn(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = bn(width)
        self.conv3 = conv1x1(width, c_out)
        self.bn3 = bn(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv1x1(c_in, c_out, stride), bn(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + residual)


class ResNet(nn.Module):
    """Bottleneck ResNet for ImageNet-sized inputs; ``forward(x) -> logits [N, num_classes]``."""

    def __init__(
        self,
        num_classes: int,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        dropout: float = 0.0,
        in_chans: int = 3,
        bn_momentum: float = BN_MOMENTUM,
        bn_eps: float = 1e-5,
        zero_init_residual: bool = False,
    ):
        super().__init__()

        def bn(c: int) -> nn.BatchNorm2d:
            return batch_norm(c, bn_momentum, bn_eps)

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False),
            bn(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[Bottleneck] = []
        c_in = 64
        for i, n_blocks in enumerate(layers):
            width = 64 * 2**i
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(Bottleneck(c_in, width, stride, bn))
                c_in = width * Bottleneck.expansion
        self.blocks = nn.Sequential(*stages)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, num_classes)
        self.num_features = c_in
        init_conv_net(self)
        if zero_init_residual:
            # Each block starts as the identity (Goyal et al., 2017): helps very large batches.
            for m in stages:
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x)).mean(dim=(2, 3))
        return self.fc(self.dropout(x))


@register_model
def resnet50(
    num_classes: int,
    dropout: float = 0.0,
    in_chans: int = 3,
    bn_momentum: float = BN_MOMENTUM,
    bn_eps: float = 1e-5,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50: 25,557,032 parameters for 1000 classes."""
    return ResNet(
        num_classes, (3, 4, 6, 3), dropout, in_chans, bn_momentum, bn_eps, zero_init_residual
    )
