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
    """Fill a ``size`` x ``size`` square (clipped at the borders) of each image with gray.

    Returns a new contiguous batch whatever the layout of ``images``."""
    check_images(images)
    return _cutout(images, size, generator, in_place=False)


def _cutout(
    images: Tensor,
    size: int | float,
    generator: torch.Generator | None,
    in_place: bool,
    share: rng.Share | None = None,
) -> Tensor:
    """:func:`cutout`, written into ``images`` itself when ``in_place`` (which must then be a
    contiguous batch the caller owns: StrongAugment's fresh RandAugment output); ``share`` as in
    :func:`metapl.augment.rand_augment`."""
    n, c, h, w = images.shape
    side = cutout_size(size, h, w)
    device = images.device
    cy = rng.randint(h, n, device, generator, share)
    cx = rng.randint(w, n, device, generator, share)
    if side <= 0:
        return images
    out = images if in_place else images.clone(memory_format=torch.contiguous_format)
    # Only the square's pixels are written, by one scatter along each image plane, instead of a
    # masked fill of the whole batch (a broadcast [N, 1, H, W] mask made masked_fill several times
    # slower than a copy). Rows and columns past a border are clamped onto the border: the row
    # (column) of the center is always inside the image, so a clamped index still lies in the
    # clipped square and only writes the same gray twice. The index and the gray are expanded
    # views over the channels, so only [N, side * side] offsets are computed.
    steps = torch.arange(side, device=device)
    rows = (cy[:, None] - side // 2 + steps).clamp(0, h - 1)  # [N, side]
    cols = (cx[:, None] - side // 2 + steps).clamp(0, w - 1)  # [N, side]
    pixels = ((rows * w)[:, :, None] + cols[:, None, :]).view(n, 1, side * side)
    pixels = pixels.expand(n, c, side * side)
    gray = out.new_full((1, 1, 1), FILL).expand(n, c, side * side)
    out.view(n, c, h * w).scatter_(2, pixels, gray)
    return out
