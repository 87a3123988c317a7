"""Cutout (DeVries & Taylor, 2017) on a batch: one gray square per image at a random center.

As in the RandAugment/UDA code the center is uniform over the whole image, so squares near a border
are clipped; the square is filled with 0.5 gray (128 in the uint8 code).
"""

from __future__ import annotations

import torch
from torch import Tensor

from metapl.augment import rng
from metapl.augment.checks import check_images

FILL = 0.5


def cutout_size(size: int | float, height: int, width: int) -> int:
    """Side in pixels: an ``int`` is pixels, a ``float`` is a fraction of the shorter side."""
    if isinstance(size, float):
        return int(round(size * min(height, width)))
    return int(size)


def cutout(images: Tensor, size: int | float, generator: torch.Generator | None = None) -> Tensor:
    """Fill a ``size`` x ``size`` square (clipped at the borders) of each image with gray."""
    check_images(images)
    n, _, h, w = images.shape
    side = cutout_size(size, h, w)
    device = images.device
    cy = rng.randint(h, n, device, generator)
    cx = rng.randint(w, n, device, generator)
    if side <= 0:
        return images
    top = (cy - side // 2)[:, None]
    left = (cx - side // 2)[:, None]
    ys = torch.arange(h, device=device)[None, :]
    xs = torch.arange(w, device=device)[None, :]
    in_rows = (ys >= top) & (ys < top + side)  # [N, H]
    in_cols = (xs >= left) & (xs < left + side)  # [N, W]
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # [N, 1, H, W]
    return images.masked_fill(mask, FILL)
