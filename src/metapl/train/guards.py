"""Stop on NaN/Inf losses and weights before they reach a checkpoint, and turn metric tensors into
floats.

:func:`check_finite` and :func:`to_floats` cost one host-device synchronisation for the whole
metrics dict instead of one per ``.item()`` (:func:`check_finite_weights` one per model): on a GPU
each sync stalls the pipeline, and a step logs a dozen values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from metapl.errors import NonFiniteLossError


def _describe(value: torch.Tensor | float) -> str:
    """``is nan``, ``is inf``, ``contains nan and -inf``, ...: what is wrong with ``value``."""
    values = value.detach().reshape(-1).tolist() if isinstance(value, torch.Tensor) else [value]
    kinds = sorted({repr(float(v)) for v in values if not math.isfinite(v)})
    if not kinds:
        return "is not finite"
    return ("is " if len(values) == 1 else "contains ") + " and ".join(kinds)


def check_finite(metrics: Mapping[str, torch.Tensor | float], step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the first (by sorted name) non-finite metric.

    Tensors may have any shape (every element must be finite); plain numbers are checked on the host.
    """
    tensors = [v for v in metrics.values() if isinstance(v, torch.Tensor)]
    floats_ok = all(math.isfinite(v) for v in metrics.values() if not isinstance(v, torch.Tensor))
    tensors_ok = True
    if tensors:
        device = tensors[0].device
        # Per-tensor checks stay on the device; one stack + .item() is the only sync.
        flags = torch.stack([torch.isfinite(t.detach()).all().to(device) for t in tensors])
        tensors_ok = bool(flags.all().item())
    if floats_ok and tensors_ok:
        return
    for name in sorted(metrics):
        value = metrics[name]
        finite = (
            bool(torch.isfinite(value.detach()).all())
            if isinstance(value, torch.Tensor)
            else math.isfinite(value)
        )
        if not finite:
            raise NonFiniteLossError(
                f"step {step}: {name} {_describe(value)}; the run stopped before writing a "
                "checkpoint. Lower the learning rate or check the inputs for NaN/Inf, then start "
                "again (the same options would fail the same way)"
            )


def check_finite_weights(models: Mapping[str, nn.Module], step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the first non-finite parameter or buffer.

    The loss guard alone lets through the step whose loss was finite but whose update overflowed
    (e.g. BatchNorm running variances that reach inf while the batch statistics keep the loss
    finite); such weights must not reach a checkpoint or a results file either.
    """
    for model_name, model in models.items():
        tensors = [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]
        if not tensors:
            continue
        device = tensors[0][1].device
        flags = torch.stack([torch.isfinite(v.detach()).all().to(device) for _, v in tensors])
        if bool(flags.all().item()):
            continue
        name, value = next((k, v) for k, v in tensors if not bool(torch.isfinite(v).all()))
        raise NonFiniteLossError(
            f"step {step}: {model_name} weight {name} {_describe(value)}; the run stopped before "
            "writing a checkpoint. Lower the learning rate or check the inputs for NaN/Inf, then "
            "start again (the same options would fail the same way)"
        )


def to_floats(metrics: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Scalar metrics (tensors or numbers) as Python floats, in the input's order.

    Tensors are stacked per (device, dtype), normally a single group, and read with one ``.tolist()``.
    """
    groups: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"metric {name} has shape {tuple(value.shape)}, not a scalar")
            groups.setdefault((value.device, value.dtype), {})[name] = value
    converted: dict[str, float] = {}
    for group in groups.values():
        stacked = torch.stack([t.detach().reshape(()) for t in group.values()])
        converted.update(zip(group, (float(v) for v in stacked.tolist())))
    return {
        name: converted[name] if name in converted else float(value)
        for name, value in metrics.items()
    }
