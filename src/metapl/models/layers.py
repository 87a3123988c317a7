"""Building blocks and initialization shared by the models.

BatchNorm momentum: TF's ``decay`` d keeps ``running = d * running + (1 - d) * batch``; PyTorch's
``momentum`` m keeps ``running = (1 - m) * running + m * batch``. The paper's decay 0.99 (Table 3) is
therefore ``momentum=0.01``, the default everywhere here.
"""

from __future__ import annotations

import math

from torch import nn

BN_MOMENTUM = 0.01  # TF batch-norm decay 0.99 (Table 3)


def batch_norm(channels: int, momentum: float = BN_MOMENTUM, eps: float = 1e-5) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=momentum, eps=eps)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


def init_conv_net(model: nn.Module) -> None:
    """Initialize as the MPL/WRN reference code: conv kernels N(0, 2 / fan_out) (He, fan-out mode),
    BatchNorm scale 1 and shift 0, dense kernels U(+-1/sqrt(fan_out)) with zero bias (the TF
    EfficientNet/MPL dense initializer)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            init_dense(m)


def init_dense(m: nn.Linear) -> None:
    bound = 1.0 / math.sqrt(m.out_features)
    nn.init.uniform_(m.weight, -bound, bound)
    if m.bias is not None:
        nn.init.zeros_(m.bias)
