"""Exponential moving average of a model's weights (an evaluation copy, never trained).

Parameters are averaged; buffers (BatchNorm running statistics, ``num_batches_tracked``) are copied
from the live model, as is standard: averaging running statistics of a moving network would describe
no network in particular, while the live statistics are already a moving average.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """``p_ema = decay * p_ema + (1 - decay) * p`` after every :meth:`update`.

    ``module`` is a deep copy of the model at construction, kept in eval mode with
    ``requires_grad=False``, on the model's device (nothing is moved anywhere).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def _pairs(self, model: nn.Module, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Match by name, not position, so a model with a different structure fails loudly.
        mine = dict(getattr(self.module, f"named_{kind}")())
        theirs = dict(getattr(model, f"named_{kind}")())
        if mine.keys() != theirs.keys():
            raise ValueError(f"EMA.update: the model's {kind} differ from the averaged copy's")
        return list(mine.values()), [theirs[name] for name in mine]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s parameters and copy its buffers."""
        ema_params, params = self._pairs(model, "parameters")
        if ema_params:
            # lerp(a, b, w) = a + w (b - a) = (1 - w) a + w b with w = 1 - decay: one fused op.
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - self.decay)
        ema_buffers, buffers = self._pairs(model, "buffers")
        for ema_b, b in zip(ema_buffers, buffers):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """The averaged module's ``state_dict``: loadable into a plain model for evaluation."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the averaged weights saved by :meth:`state_dict`."""
        self.module.load_state_dict(state_dict)
