"""Random draws for batched augmentation, reproducible from one ``torch.Generator``.

A generator lives on one device and can only fill tensors there, while the images may live elsewhere
(a CPU generator kept in a checkpoint, images on the GPU). So every draw is made on the generator's
device and then moved to the images' device: the numbers depend only on the generator's state, never
on where the batch happens to be. The draws are a few values per image, so the copy is negligible;
it is made without a host sync (:func:`metapl.transfer.to_device`: a blocking copy to a GPU waits
for all the work queued there, about 20 per training step, so the CPU could never prepare the next
step while the GPU ran this one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from metapl.transfer import to_device


def draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where ``generator`` draws: its own device, or ``device`` without one."""
    return generator.device if generator is not None else device


def uniform(n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """``n`` float32 draws from U[0, 1), returned on ``device``."""
    draw = torch.rand(n, generator=generator, device=draw_device(generator, device))
    return to_device(draw, device)


def randint(
    high: int, n: int, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """``n`` int64 draws uniform in ``[0, high)``, returned on ``device``."""
    draw = torch.randint(high, (n,), generator=generator, device=draw_device(generator, device))
    return to_device(draw, device)


def bernoulli(
    p: float, n: int, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """``n`` booleans, each True with probability ``p``."""
    return uniform(n, device, generator) < p
