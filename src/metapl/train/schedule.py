"""Linear warm-up then cosine decay to exactly 0 (App. C.1), as a ``LambdaLR`` multiplier.

The scheduler is built from a ``functools.partial`` of :func:`warmup_cosine`, so its ``state_dict``
holds only counters (``last_epoch``), never the schedule's lengths: a run resumed with a larger
``steps`` keeps the counter and uses the new length, and the state stays loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from metapl.errors import ConfigError


def _check_lengths(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ConfigError(f"steps must be at least 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(
            f"warmup steps must be between 0 and the number of steps ({total_steps}), "
            f"got {warmup_steps}"
        )


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier for the 0-based optimizer ``step``.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, so the first step already
    moves (multiplier ``1 / warmup_steps``, small but nonzero: a zero first step would only waste a
    step) and the last warm-up step reaches 1. Then a half cosine from 1 at ``step == warmup_steps``
    down to exactly 0 at ``step == total_steps`` (and 0 beyond). With ``LambdaLR`` the optimizer's
    step ``s`` runs with ``warmup_cosine(s)``; the value 0 is reached after the last step.
    """
    _check_lengths(total_steps, warmup_steps)
    if step >= total_steps:
        return 0.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> LambdaLR:
    """A ``LambdaLR`` over every parameter group of ``optimizer`` following :func:`warmup_cosine`.

    Resume exactly by loading both ``optimizer.load_state_dict`` and ``scheduler.load_state_dict``
    (the current LR lives in the optimizer's param groups, the step counter in the scheduler).
    """
    _check_lengths(total_steps, warmup_steps)
    lr_lambda = functools.partial(warmup_cosine, total_steps=total_steps, warmup_steps=warmup_steps)
    return LambdaLR(optimizer, lr_lambda)
