"""What every method receives and what it offers the training engine."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

# The augmented views a method can ask the engine for, besides the weakly augmented labeled batch.
VIEWS = ("labeled_strong", "unlabeled_weak", "unlabeled_strong")


@dataclass
class Batch:
    """One step's data, already augmented and on the device."""

    x_labeled: Tensor  # weak view (flip + pad-and-crop)
    y_labeled: Tensor
    x_labeled_strong: Tensor | None = None  # RandAugment + cutout
    x_unlabeled_weak: Tensor | None = None
    x_unlabeled_strong: Tensor | None = None
    # ReducedMPL / NoisyStudent: the large teacher's precomputed class distributions of the same
    # labeled and unlabeled images (computed once on the clean images).
    t_labeled: Tensor | None = None
    t_unlabeled: Tensor | None = None
    step: int = 0


class Method(Protocol):
    views: tuple[str, ...]  # which of VIEWS this method needs
    models: dict[str, nn.Module]  # "student" (always) and "teacher" (MPL)
    optimizers: dict[str, torch.optim.Optimizer]

    def step(self, batch: Batch) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def pick_view(batch: Batch, view: str) -> Tensor:
    """``"labeled_weak"`` or one of :data:`VIEWS`; a clear error if the engine did not make it."""
    tensor = batch.x_labeled if view == "labeled_weak" else getattr(batch, "x_" + view)
    if tensor is None:
        raise ValueError(f"this method needs the {view} view, which the batch does not have")
    return tensor


def average_gradients(grad_sync, model: nn.Module) -> None:
    """Data parallelism: replace every gradient of ``model`` by its mean over the processes
    (:class:`metapl.distributed.GradientAverager`), between backward and the optimizer's step;
    no-op when ``grad_sync`` is None (one process)."""
    if grad_sync is not None:
        grad_sync.mean_([p.grad for p in model.parameters() if p.grad is not None])


def optimize(
    loss: Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_sync,
    max_grad_norm: float | None = None,
) -> None:
    """One optimizer step of ``model`` on ``loss``, with gradients averaged over the processes,
    then clipped to ``max_grad_norm`` (None: not clipped), as MetaPseudoLabels clips."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(grad_sync, model)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()


class StatelessStep:
    """For methods whose step keeps no state of its own (models and optimizers keep theirs)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
