"""Optimizer parameter groups that put weight decay on conv and linear weights only.

Weight decay applies to the kernels, not to BatchNorm's scale/shift or to biases, as UDA's and
EfficientNet's code do (the paper does not say): decaying BN's scale fights the normalization, and
biases have no capacity to regularize.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.conv import _ConvNd

_DECAYED = (_ConvNd, nn.Linear)


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """``[{"params": conv/linear weights, "weight_decay": weight_decay},
    {"params": everything else (BN, biases, ...), "weight_decay": 0.0}]``, for any torch optimizer.

    Frozen parameters (``requires_grad=False``) are left out; shared parameters appear once.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if name == "weight" and isinstance(module, _DECAYED):
                decay.append(p)
            else:
                no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
