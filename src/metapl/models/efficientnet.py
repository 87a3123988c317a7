"""EfficientNet-B0..B7 (Tan & Le, 2019), the students of the ReducedMPL experiments (Section 4.2).

The paper trains B0 on CIFAR-10 / SVHN (32x32) and B7 on ImageNet, "with their corresponding
hyper-parameters from Tan & Le (2019)" (Appendix C.2), so this follows the TF reference model:

- stem: conv 3x3/2 (32 channels) -> BN -> SiLU;
- seven stages of MBConv blocks: [1x1 expand -> BN -> SiLU] -> depthwise kxk -> BN -> SiLU ->
  squeeze-and-excitation -> 1x1 project -> BN, plus the input when the block keeps its shape
  (stride 1, same channels), with stochastic depth on the residual branch;
- head: conv 1x1 to 1280 -> BN -> SiLU -> global average pool -> dropout -> linear.

Compound scaling multiplies every width by ``width`` (rounded to a multiple of 8, :func:`round_filters`)
and every stage's repeats by ``depth`` (rounded up, :func:`round_repeats`). BN epsilon 1e-3 and
decay 0.99 (the TF model's values). Convolutions pad symmetrically (``k // 2``) as in the PyTorch
ports, not TF's asymmetric "SAME" for stride 2; this changes no parameter and keeps any input size
>= 1 pixel at every stage (32x32 ends at 1x1).

Everything is a plain function of the parameters and the global RNG (stochastic depth draws its
mask with ``torch.rand`` on the input's device), so ``functional_call``, forward-mode AD and the
exact MPL step's RNG replay (same mask in the update and the JVP pass) work unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metapl.models.layers import BN_MOMENTUM, batch_norm, conv1x1, init_dense
from metapl.models.registry import register_model

# (expand ratio, depthwise kernel, stride of the first block, output channels, repeats) of B0.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
SE_RATIO = 0.25  # of the block's input channels

# name -> (width multiplier, depth multiplier, native resolution, dropout before the classifier)
EFFICIENTNET_PARAMS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5),
}
EFFICIENTNET_RESOLUTION: dict[str, int] = {n: p[2] for n, p in EFFICIENTNET_PARAMS.items()}


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """``channels * width`` to the nearest multiple of ``divisor``, never more than 10% below it
    (the reference ``round_filters``)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """``ceil(depth * repeats)``: the number of blocks of a stage after depth scaling."""
    return int(math.ceil(depth * repeats))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero the residual branch of each example with probability ``rate`` and
    scale the survivors by ``1 / (1 - rate)``; the identity outside training or at rate 0.

    The mask comes from the global RNG of ``x``'s device (``torch.rand``), so that replaying the RNG
    state replays the mask. It is drawn in float32 and cast, so low-precision inputs see the same
    keep probability."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = (torch.rand(shape, device=x.device) < keep).to(x.dtype)
    return x * (mask / keep)


class SqueezeExcite(nn.Module):
    """Global average pool -> 1x1 conv (reduce) -> SiLU -> 1x1 conv (expand) -> sigmoid gate."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.silu(self.reduce(x.mean(dim=(2, 3), keepdim=True)))
        return x * torch.sigmoid(self.expand(s))


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation; a residual (with stochastic depth)
    only when the block keeps its shape."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        drop_path_rate: float,
        bn,
    ):
        super().__init__()
        mid = c_in * expand_ratio
        self.expand = None
        if expand_ratio != 1:
            self.expand = nn.Sequential(conv1x1(c_in, mid), bn(mid), nn.SiLU())
        self.depthwise = nn.Conv2d(
            mid, mid, kernel, stride=stride, padding=kernel // 2, groups=mid, bias=False
        )
        self.bn_depthwise = bn(mid)
        self.se = SqueezeExcite(mid, max(1, int(c_in * SE_RATIO)))
        self.project = conv1x1(mid, c_out)
        self.bn_project = bn(c_out)
        self.has_residual = stride == 1 and c_in == c_out
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:
        out = x if self.expand is None else self.expand(x)
        out = F.silu(self.bn_depthwise(self.depthwise(out)))
        out = self.bn_project(self.project(self.se(out)))
        if not self.has_residual:
            return out
        return x + drop_path(out, self.drop_path_rate, self.training)


class EfficientNet(nn.Module):
    """EfficientNet with the given compound scaling; ``forward(x [N, C, H, W]) -> logits``.

    ``drop_path`` is the stochastic-depth rate of the last block; block ``i`` of ``n`` (counted
    over all stages, from 0) drops with rate ``drop_path * i / n``, as in the reference.
    """

    def __init__(
        self,
        num_classes: int,
        width: float = 1.0,
        depth: float = 1.0,
        dropout: float = 0.2,
        drop_path: float = 0.2,
        in_chans: int = 3,
        bn_momentum: float = BN_MOMENTUM,
        bn_eps: float = 1e-3,
    ):
        super().__init__()

        def bn(c: int) -> nn.BatchNorm2d:
            return batch_norm(c, bn_momentum, bn_eps)

        c_stem = round_filters(STEM_CHANNELS, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, c_stem, 3, stride=2, padding=1, bias=False), bn(c_stem), nn.SiLU()
        )
        n_blocks = sum(round_repeats(r, depth) for *_, r in STAGES)
        blocks: list[nn.Module] = []
        c_in = c_stem
        for expand_ratio, kernel, stride, channels, repeats in STAGES:
            c_out = round_filters(channels, width)
            for i in range(round_repeats(repeats, depth)):
                rate = drop_path * len(blocks) / n_blocks
                s = stride if i == 0 else 1
                blocks.append(MBConv(c_in, c_out, kernel, s, expand_ratio, rate, bn))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        c_head = round_filters(HEAD_CHANNELS, width)
        self.head = nn.Sequential(conv1x1(c_in, c_head), bn(c_head), nn.SiLU())
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c_head, num_classes)
        self.num_features = c_head
        init_efficientnet(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x))).mean(dim=(2, 3))
        return self.fc(self.dropout(x))


def init_efficientnet(model: nn.Module) -> None:
    """The TF reference initialization: conv kernels N(0, 2 / fan_out) with TF's fan-out
    ``k_h * k_w * out_channels / groups`` (for a depthwise conv that is ``k_h * k_w``, not PyTorch's
    ``k_h * k_w * channels``), zero conv biases, BN scale 1 / shift 0, dense U(+-1/sqrt(fan_out))."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            k_h, k_w = m.kernel_size
            fan_out = k_h * k_w * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            init_dense(m)


def _efficientnet(
    name: str,
    num_classes: int,
    dropout: float,
    drop_path: float,
    in_chans: int,
    bn_momentum: float,
    bn_eps: float,
) -> EfficientNet:
    width, depth, _, _ = EFFICIENTNET_PARAMS[name]
    return EfficientNet(
        num_classes, width, depth, dropout, drop_path, in_chans, bn_momentum, bn_eps
    )


def _register_variant(name: str):
    """Register ``name`` (efficientnet_b0..b7) as a constructor whose default dropout is the
    variant's own; the signature stays explicit so ``create_model`` can check keyword options."""
    width, depth, resolution, variant_dropout = EFFICIENTNET_PARAMS[name]

    def constructor(
        num_classes: int,
        dropout: float = variant_dropout,
        drop_path: float = 0.2,
        in_chans: int = 3,
        bn_momentum: float = BN_MOMENTUM,
        bn_eps: float = 1e-3,
    ) -> EfficientNet:
        return _efficientnet(name, num_classes, dropout, drop_path, in_chans, bn_momentum, bn_eps)

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = (
        f"EfficientNet-{name[-2:].upper()} (width x{width}, depth x{depth}, native {resolution} px, "
        f"dropout {variant_dropout}). B0 is the CIFAR-10/SVHN student of Section 4.2, B7 the "
        "ImageNet one."
    )
    return register_model(constructor)


efficientnet_b0 = _register_variant("efficientnet_b0")
efficientnet_b1 = _register_variant("efficientnet_b1")
efficientnet_b2 = _register_variant("efficientnet_b2")
efficientnet_b3 = _register_variant("efficientnet_b3")
efficientnet_b4 = _register_variant("efficientnet_b4")
efficientnet_b5 = _register_variant("efficientnet_b5")
efficientnet_b6 = _register_variant("efficientnet_b6")
efficientnet_b7 = _register_variant("efficientnet_b7")
