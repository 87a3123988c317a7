"""Cross-entropy losses shared by every method.

All losses return *per-example* values (shape = logits.shape[:-1]); :func:`batch_mean` reduces them.
Examples lie along ``batch_dim``. Dimensions before it index independent ensemble members trained in
lockstep (e.g. ten seeds stacked into one module): their losses are *summed*, so that each member gets
exactly the gradient it would get if trained alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def upcast(logits: Tensor) -> Tensor:
    """Losses are computed in at least float32: half-precision logits (from autocast) are upcast,
    float64 stays float64."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Per-example CE(q, p) = -sum_c q_c log p_c for a target distribution q."""
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def hard_cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-example CE against integer labels, optionally label-smoothed (PyTorch's convention:
    the target is (1 - s) * one_hot + s / C)."""
    log_p = F.log_softmax(logits, dim=-1)
    nll = -log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * log_p.mean(dim=-1)


def batch_mean(per_example: Tensor, batch_dim: int = 0) -> Tensor:
    """Mean over the examples, summed over ensemble members: one scalar to differentiate."""
    return per_example.mean(dim=batch_dim).sum()


def member_mean(per_example: Tensor, batch_dim: int = 0) -> Tensor:
    """Mean over the examples for each ensemble member (a scalar when there is no ensemble)."""
    return per_example.mean(dim=batch_dim)
