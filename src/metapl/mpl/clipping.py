"""Gradient clipping by total norm, as ``torch.nn.utils.clip_grad_norm_``, and its Jacobian.

clip(g) = coef * g with coef = min(1, c / (n + eps)), n = ||g|| (the L2 norm over every tensor of
g), c the max norm and eps = 1e-6 (torch's). The student's update is then U(clip(g)), so the
teacher's w = (dU/dg)^T v gains clip's Jacobian. Where clipping is active (coef < 1):

    d clip / dg = a I - b g g^T,   a = c / (n + eps),   b = c / ((n + eps)^2 n)

(d n / dg = g / n), symmetric; elsewhere it is the identity. With the clipped gradient
gc = a g, b g g^T = gc gc^T / (c n): :meth:`NormClip.jacobian_times` needs gc alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metapl.errors import ConfigError
from metapl.mpl.update_rules import sparse_embeddings

EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


def check_max_norm(name: str, value: float | None, model: nn.Module, batch_dim: int) -> None:
    """``None`` (no clipping), or a finite number > 0 for a ``model`` it can clip; else a
    ConfigError (at construction, not in the middle of a step)."""
    if value is None:
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    # "not 0 < value", so that NaN is refused too; inf would never clip
    if not number or not 0 < value < math.inf:
        raise ConfigError(
            f"{name} must be None (no clipping) or a finite number > 0, got {value!r}"
        )
    # Which dimensions of a parameter index the members is the model's business: the step cannot
    # take one norm per member, and one norm over all of them would clip each member by the
    # others' gradients.
    if batch_dim != 0:
        raise ConfigError(
            f"{name} clips by one norm over the whole model, and batch_dim={batch_dim} stacks "
            "independent ensemble members, which it would couple: clip with batch_dim=0 only"
        )
    sparse = sparse_embeddings(model)
    if sparse:  # torch has no norm of a sparse tensor (clip_grad_norm_ fails on one too)
        raise ConfigError(
            f"{name}: the module {next(iter(sparse.values()))!r} has sparse=True, and a sparse "
            "gradient has no norm in torch: use sparse=False to clip"
        )


@dataclass(frozen=True)
class NormClip:
    """What clipping ``grads`` to ``max_norm`` does: ``coef`` = min(1, max_norm / (norm + eps)).

    Built from the gradients before clipping; differentiable in them when they carry a graph (the
    double-backward step's). No host sync: whether it clips stays a tensor.
    """

    max_norm: float
    norm: Tensor
    coef: Tensor

    @classmethod
    def of(cls, grads: Sequence[Tensor | None], max_norm: float) -> NormClip:
        present = [g for g in grads if g is not None]
        if not present:
            return cls(max_norm, torch.zeros(()), torch.ones(()))
        device = present[0].device
        # the total norm as torch.nn.utils.get_total_norm computes it: a norm of the norms
        norms = [torch.linalg.vector_norm(g).to(device) for g in present]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        return cls(max_norm, norm, (max_norm / (norm + EPS)).clamp(max=1.0))

    def apply(self, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        """The clipped gradients, new tensors (differentiable)."""
        return [None if g is None else g * self.coef.to(g.device) for g in grads]

    def apply_(self, grads: Sequence[Tensor | None]) -> None:
        """Clip ``grads`` in place (the ``.grad`` an optimizer reads)."""
        with torch.no_grad():
            for g in grads:
                if g is not None:
                    g.mul_(self.coef.to(g.device))

    def jacobian_times(
        self, clipped: Sequence[Tensor | None], u: Sequence[Tensor | None]
    ) -> list[Tensor | None]:
        """(d clip / dg) u = coef u - [coef < 1] gc <gc, u> / (max_norm n), ``clipped`` = gc.

        The dot product runs over every tensor: the rank-one term couples them all, so a tensor
        whose ``u`` is None (0) still gets -[...] gc. None where the gradient is None."""
        dot = sum(
            ((g * ui).sum() for g, ui in zip(clipped, u) if g is not None and ui is not None),
            start=torch.zeros((), dtype=self.norm.dtype, device=self.norm.device),
        )
        # 0 where clipping is inactive (then the Jacobian is the identity); where n == 0 too
        rank_one = torch.where(self.coef < 1, dot / (self.max_norm * self.norm), 0.0)
        out: list[Tensor | None] = []
        for g, ui in zip(clipped, u):
            if g is None:
                out.append(ui)
                continue
            scaled = g * -rank_one.to(g.device)
            out.append(scaled if ui is None else ui * self.coef.to(g.device) + scaled)
        return out


def clip_(grads: Sequence[Tensor | None], max_norm: float | None) -> NormClip | None:
    """Clip ``grads`` in place as ``clip_grad_norm_`` does (None: no clipping)."""
    if max_norm is None:
        return None
    clip = NormClip.of(grads, max_norm)
    clip.apply_(grads)
    return clip
