"""Stop on NaN/Inf losses and weights before they reach a checkpoint, and turn metric tensors into
floats.

:class:`NonFiniteWatch` checks every step's metrics on their device, without a sync, and reads
what it saw with one host-device synchronisation at the steps that log, evaluate or checkpoint;
:func:`to_floats` reads the whole metrics dict with one sync instead of one per ``.item()``
(:func:`check_finite_weights` one per model): on a GPU each sync stalls the pipeline, and a step
logs a dozen values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

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


# "Never": the offset a metric holds while it has been finite at every step observed.
_NEVER = torch.iinfo(torch.int64).max


class NonFiniteWatch:
    """Every step's metrics checked for NaN/Inf where they live; read at log and checkpoint steps.

    Why: reading the losses on the host every step would make a GPU wait every step (see
    docs/design.md, "No host syncs inside a training step"), while checking only the steps that
    log would miss a loss that was NaN in between and, when the NaN spread to the weights, name a
    later step than the one that went wrong. :meth:`observe` keeps, on the metrics' device, the
    first step since the last check at which each metric was not finite (a few small kernels, no
    read); :meth:`check` reads that with one sync and raises :class:`NonFiniteLossError` naming the
    metric and its first bad step. With several processes the earliest step over all ranks is taken,
    so every rank stops at the same check with the same message.
    """

    def __init__(self, step: int):
        self._start(step)

    def _start(self, step: int) -> None:
        self._since = step  # the run's step at the last check; observations count from it
        self._observed = 0
        # (metric names, first bad observation per name as int64 on the metrics' device); a new
        # segment starts when the names change (fine-tuning's metrics follow the method's).
        self._segments: list[tuple[tuple[str, ...], torch.Tensor]] = []
        self._plain: dict[str, int] = {}  # metrics that are Python numbers: checked on the host

    def observe(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        """Record which of this step's metrics are not finite, without reading any tensor."""
        self._observed += 1
        tensors = {k: v for k, v in sorted(metrics.items()) if isinstance(v, torch.Tensor)}
        for name, value in metrics.items():
            if not isinstance(value, torch.Tensor):
                first = self._plain.get(name, _NEVER)
                self._plain[name] = first if math.isfinite(value) else min(first, self._observed)
        if not tensors:
            return
        names = tuple(tensors)
        device = next(iter(tensors.values())).device
        if not self._segments or self._segments[-1][0] != names:
            never = torch.full((len(names),), _NEVER, dtype=torch.int64, device=device)
            self._segments.append((names, never))
        firsts = self._segments[-1][1]
        values = list(tensors.values())
        with torch.no_grad():
            if all(
                t.dim() == 0 and (t.dtype, t.device) == (values[0].dtype, device) for t in values
            ):
                # The usual case, one stack: a few microseconds, where one check per loss took
                # ten times as long on a CPU (a sizeable share of the digits CNN's small steps).
                finite = torch.isfinite(torch.stack(values).to(device))
            else:
                finite = torch.stack([torch.isfinite(t).all().to(device) for t in values])
        # A Python number in masked_fill_ is a kernel argument, not a copy from the host.
        firsts.masked_fill_(~finite & (firsts == _NEVER), self._observed)

    def check(
        self,
        metrics: Mapping[str, torch.Tensor | float],
        step: int,
        earliest_over_ranks: Callable[[list[int]], list[int]] | None = None,
    ) -> None:
        """Raise :class:`NonFiniteLossError` if a metric observed since the last check was not
        finite; ``metrics`` are this step's (to say what the metric is now). Then start afresh.

        ``earliest_over_ranks`` (element-wise minimum over processes, every rank calling it at the
        same steps with the same names) makes the decision and the message the same on every rank.
        """
        names = [n for seg_names, _ in self._segments for n in seg_names] + list(self._plain)
        # A sync per segment: one, or two across the start of fine-tuning.
        firsts = [v for _, seg_firsts in self._segments for v in seg_firsts.tolist()]
        firsts += list(self._plain.values())
        if earliest_over_ranks is not None:
            firsts = earliest_over_ranks(firsts)
        since = self._since
        self._start(step)
        bad = sorted((offset, name) for name, offset in zip(names, firsts) if offset != _NEVER)
        if not bad:
            return
        offset, name = bad[0]
        now = metrics.get(name)
        if since + offset == step and now is not None:
            what = f"step {step}: {name} {_describe(now)}"
        else:
            state = "is finite again" if now is None or _is_finite(now) else _describe(now)
            what = (
                f"step {since + offset}: {name} was not finite (found at step {step}, where it "
                f"{state})"
            )
        raise NonFiniteLossError(
            f"{what}; the run stopped before writing a checkpoint. Lower the learning rate or "
            "check the inputs for NaN/Inf, then start again (the same options would fail the same "
            "way)"
        )


def _is_finite(value: torch.Tensor | float) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(value)


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
