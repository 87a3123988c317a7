"""Independent small models trained in lockstep: one module holding E MLPs (one per seed).

Inputs are ``[E, N, in]`` and logits ``[E, N, C]``; member e only ever sees slice e, so with
``MetaPseudoLabels(batch_dim=1)`` (losses summed over members) each member follows exactly the
trajectory it would follow alone. Ten seeds then cost about one: the work is a few batched matmuls.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class StackedMLP(nn.Module):
    """E independent MLPs ``in -> hidden (x depth) -> classes`` with ReLU and dropout before the
    classifier (the paper applies dropout at the prediction of both teacher and student)."""

    def __init__(
        self,
        members: int,
        in_features: int,
        num_classes: int,
        hidden: int = 64,
        depth: int = 2,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        sizes = [in_features] + [hidden] * depth + [num_classes]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            # PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both.
            bound = 1.0 / math.sqrt(fan_in)
            w = (torch.rand(members, fan_in, fan_out, generator=generator) * 2 - 1) * bound
            b = (torch.rand(members, 1, fan_out, generator=generator) * 2 - 1) * bound
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))
        self.dropout = nn.Dropout(dropout)

    @property
    def members(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i == last:
                x = self.dropout(x)
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = torch.relu(x)
        return x
