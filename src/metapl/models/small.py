"""Small models for the CPU-sized experiments: a CNN for 8x8 digits and an MLP.

``digits_cnn`` is sized for scikit-learn's 8x8 grayscale digits: three 3x3 conv-BN-ReLU layers
(the second with stride 2: 8x8 -> 4x4), global average pooling, dropout, linear; about 24 k
parameters at the default width, a few ms per batch of 256 on a CPU. ``mlp`` maps the last axis
(2-D toy points, or the probability vectors of the calibration teacher of Section 4.2: "a 5-layered
MLP with ReLU") through ``depth`` hidden ReLU layers to logits.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metapl.models.layers import BN_MOMENTUM, batch_norm, conv3x3, init_conv_net, init_dense
from metapl.models.registry import register_model


class DigitsCNN(nn.Module):
    """conv(w) -> conv(2w, stride 2) -> conv(4w) -> mean pool -> dropout -> linear; BN + ReLU."""

    def __init__(
        self,
        num_classes: int,
        width: int = 16,
        dropout: float = 0.0,
        in_chans: int = 1,
        bn_momentum: float = BN_MOMENTUM,
    ):
        super().__init__()
        self.conv1 = conv3x3(in_chans, width)
        self.bn1 = batch_norm(width, bn_momentum)
        self.conv2 = conv3x3(width, 2 * width, stride=2)
        self.bn2 = batch_norm(2 * width, bn_momentum)
        self.conv3 = conv3x3(2 * width, 4 * width)
        self.bn3 = batch_norm(4 * width, bn_momentum)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * width, num_classes)
        self.num_features = 4 * width
        init_conv_net(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x))).mean(dim=(2, 3))
        return self.fc(self.dropout(x))


class MLP(nn.Module):
    """``depth`` x (linear -> ReLU) -> dropout -> linear, on the last axis of any ``[..., F]``."""

    def __init__(
        self,
        num_classes: int,
        in_features: int = 2,
        hidden: int = 128,
        depth: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.hidden = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)
        self.num_features = width
        for m in self.hidden:
            if isinstance(m, nn.Linear):
                # He init for the ReLU layers keeps the activations' scale through depth.
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        init_dense(self.fc)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.hidden(x)))


@register_model
def digits_cnn(
    num_classes: int,
    dropout: float = 0.0,
    width: int = 16,
    in_chans: int = 1,
    bn_momentum: float = BN_MOMENTUM,
) -> DigitsCNN:
    """Small CNN for 8x8 grayscale digits (any image size works: the head pools globally)."""
    return DigitsCNN(num_classes, width, dropout, in_chans, bn_momentum)


@register_model
def mlp(
    num_classes: int,
    dropout: float = 0.0,
    in_features: int = 2,
    hidden: int = 128,
    depth: int = 2,
) -> MLP:
    """MLP with ``depth`` hidden ReLU layers of width ``hidden`` (``depth=4``: a 5-layer MLP)."""
    return MLP(num_classes, in_features, hidden, depth, dropout)


class ReducedTeacher(nn.Module):
    """ReducedMPL's teacher (Section 3.2, App. C.2): a 5-layer ReLU MLP from the large teacher's
    class distribution to a calibrated one.

    Our choice (the paper does not say): the MLP predicts a *correction* to the large teacher's
    log-probabilities, with its last layer initialized to zero, so the reduced teacher starts as
    the identity map ("many actions of the reduced teacher would be close to an identity map").
    """

    def __init__(self, num_classes: int, hidden: int = 128, depth: int = 4, dropout: float = 0.0):
        super().__init__()
        self.mlp = MLP(
            num_classes, in_features=num_classes, hidden=hidden, depth=depth, dropout=dropout
        )
        nn.init.zeros_(self.mlp.fc.weight)
        nn.init.zeros_(self.mlp.fc.bias)

    def forward(self, probs: Tensor) -> Tensor:
        return probs.clamp_min(1e-8).log() + self.mlp(probs)


@register_model
def reduced_teacher(
    num_classes: int, dropout: float = 0.0, hidden: int = 128, depth: int = 4
) -> ReducedTeacher:
    """The calibration MLP of ReducedMPL (hidden 128 for CIFAR-10/SVHN, 512 for ImageNet)."""
    return ReducedTeacher(num_classes, hidden, depth, dropout)


@register_model
def digits_cnn_large(num_classes: int, dropout: float = 0.0, in_chans: int = 1) -> DigitsCNN:
    """A 3x wider digits CNN: the "large teacher" of the digits ReducedMPL demo."""
    return DigitsCNN(num_classes, width=48, dropout=dropout, in_chans=in_chans)


@register_model
def small_cnn(num_classes: int, dropout: float = 0.0, in_chans: int = 3) -> DigitsCNN:
    """The digits CNN for RGB images of any size (width 32, about 95 k parameters): the CPU-sized
    model for your own image folders (`--set model=small_cnn`); WRN-28-2 wants a GPU."""
    return DigitsCNN(num_classes, width=32, dropout=dropout, in_chans=in_chans)
