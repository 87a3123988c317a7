"""Random draws for batched augmentation, reproducible from one ``torch.Generator``.

A generator lives on one device and can only fill tensors there, while the images may live elsewhere
(a CPU generator kept in a checkpoint, images on the GPU). So every draw is made on the generator's
device and then moved to the images' device: the numbers depend only on the generator's state, never
on where the batch happens to be. The draws are a few values per image, so the copy is negligible;
it is made without a host sync (:func:`metapl.transfer.to_device`: a blocking copy to a GPU waits
for all the work queued there, about 20 per training step, so the CPU could never prepare the next
step while the GPU ran this one).

Under torchrun each rank augments only its own rows of the global batch (:class:`Share`), yet must
give them exactly the views one process gives: so each draw is made for the whole batch, in one
process's order, and the rank keeps its rows' values. The generator then advances as in one
process, and so does every later draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metapl.transfer import to_device


@dataclass(frozen=True)
class Share:
    """A batch that is rows ``start`` to ``start + n`` of a batch of ``total`` images (a rank's
    share of the global batch): draws are made for all ``total`` and these rows' are kept."""

    start: int
    total: int

    def keep(self, draws: Tensor, n: int) -> Tensor:
        """Rows ``start`` to ``start + n`` of ``draws`` (made for ``total`` images)."""
        if self.start < 0 or self.start + n > self.total:
            raise ValueError(
                f"rows {self.start}..{self.start + n} are not in a batch of {self.total}"
            )
        return draws[self.start : self.start + n]


def _count(n: int, share: Share | None) -> int:
    """How many values to draw for ``n`` images: the whole batch's, when they are a share of it."""
    return n if share is None else share.total


def _mine(draws: Tensor, n: int, share: Share | None) -> Tensor:
    return draws if share is None else share.keep(draws, n)


def draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where ``generator`` draws: its own device, or ``device`` without one."""
    return generator.device if generator is not None else device


def uniform(
    n: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    share: Share | None = None,
) -> Tensor:
    """``n`` float32 draws from U[0, 1), returned on ``device``."""
    draw = torch.rand(_count(n, share), generator=generator, device=draw_device(generator, device))
    return to_device(_mine(draw, n, share), device)


def randint(
    high: int,
    n: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    share: Share | None = None,
) -> Tensor:
    """``n`` int64 draws uniform in ``[0, high)``, returned on ``device``."""
    where = draw_device(generator, device)
    draw = torch.randint(high, (_count(n, share),), generator=generator, device=where)
    return to_device(_mine(draw, n, share), device)


def bernoulli(
    p: float,
    n: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    share: Share | None = None,
) -> Tensor:
    """``n`` booleans, each True with probability ``p``."""
    return uniform(n, device, generator, share) < p
