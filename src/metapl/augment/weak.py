"""The weak augmentation of the SSL literature: random horizontal flip and pad-and-crop.

Both are done per image and at once for the whole batch: the flip and the crop offset of each image
only decide *which* padded pixel lands where, so one gather with per-image row and column indices
does both, with no Python loop over images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metapl.augment import rng
from metapl.augment.checks import check_images
from metapl.errors import ConfigError

PADDING_MODES = ("reflect", "replicate", "constant")


def flip_and_crop(
    images: Tensor,
    pad: int = 4,
    flip_prob: float = 0.5,
    padding_mode: str = "reflect",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pad each image by ``pad`` pixels on every side, crop a random window of the original size
    back out (offsets uniform in [0, 2*pad]) and flip that window left-right with probability
    ``flip_prob``. (Flipping first, the literature's order, gives the same distribution: a flip
    maps the column offset dx to 2*pad - dx; for a given seed the images differ.)

    ``padding_mode="constant"`` pads with 0.5 gray. Reflect padding needs ``pad`` smaller than the
    image's height and width (PyTorch's rule).
    """
    check_images(images)
    n, c, h, w = images.shape
    device = images.device
    # Draw order is fixed (flip, dy, dx) so a seeded generator always gives the same batch.
    flip = rng.bernoulli(flip_prob, n, device, generator)
    dy = rng.randint(2 * pad + 1, n, device, generator)
    dx = rng.randint(2 * pad + 1, n, device, generator)
    if pad > 0:
        if padding_mode == "reflect" and pad >= min(h, w):
            raise ValueError(f"reflect padding of {pad} px needs images larger than {h}x{w}")
        value = 0.5 if padding_mode == "constant" else None
        images = F.pad(images, (pad, pad, pad, pad), mode=padding_mode, value=value)

    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    rows = dy[:, None] + ar_h  # [N, H]
    # A flipped image reads its window's columns right to left.
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # [N, W]
    batch = torch.arange(n, device=device)[:, None, None, None]
    chan = torch.arange(c, device=device)[None, :, None, None]
    return images[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


class WeakAugment:
    """``WeakAugment(pad=4)(images, generator) -> images``: flip + pad-and-crop, per image."""

    def __init__(self, pad: int = 4, flip_prob: float = 0.5, padding_mode: str = "reflect"):
        if pad < 0:
            raise ConfigError(f"pad must be >= 0, got {pad}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ConfigError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if padding_mode not in PADDING_MODES:
            raise ConfigError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.pad = pad
        self.flip_prob = flip_prob
        self.padding_mode = padding_mode

    @torch.no_grad()
    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return flip_and_crop(images, self.pad, self.flip_prob, self.padding_mode, generator)

    def __repr__(self) -> str:
        return (
            f"WeakAugment(pad={self.pad}, flip_prob={self.flip_prob}, "
            f"padding_mode={self.padding_mode!r})"
        )
