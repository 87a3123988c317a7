"""The weak augmentation of the SSL literature: random horizontal flip and pad-and-crop.

Both are done per image and at once for the whole batch: the flip and the crop offset of each image
only decide *which* padded pixel lands where, so one gather with per-image row and column indices
does both, with no Python loop over images. Reflect and replicate padding are folded into those
indices (a border pixel is a copy of an image pixel), so only constant padding builds a padded batch.
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
    share: rng.Share | None = None,
) -> Tensor:
    """Pad each image by ``pad`` pixels on every side, crop a random window of the original size
    back out (offsets uniform in [0, 2*pad]) and flip that window left-right with probability
    ``flip_prob``. (Flipping first, the literature's order, gives the same distribution: a flip
    maps the column offset dx to 2*pad - dx; for a given seed the images differ.)

    ``padding_mode="constant"`` pads with 0.5 gray. Reflect padding needs ``pad`` smaller than the
    image's height and width (PyTorch's rule).

    ``share``: ``images`` are these rows of a larger batch (a rank's share under torchrun), and get
    the views that batch's rows get (:class:`metapl.augment.rng.Share`).
    """
    check_images(images)
    n, c, h, w = images.shape
    device = images.device
    # Draw order is fixed (flip, dy, dx) so a seeded generator always gives the same batch.
    flip = rng.bernoulli(flip_prob, n, device, generator, share)
    dy = rng.randint(2 * pad + 1, n, device, generator, share)
    dx = rng.randint(2 * pad + 1, n, device, generator, share)
    if padding_mode == "reflect" and pad > 0 and pad >= min(h, w):
        raise ValueError(f"reflect padding of {pad} px needs images larger than {h}x{w}")

    # Where each output pixel sits in the padded image: rows [N, H], columns [N, W].
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    rows = dy[:, None] + ar_h
    # A flipped image reads its window's columns right to left.
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)
    if padding_mode in ("reflect", "replicate"):
        # A reflected or replicated border pixel is a copy of an image pixel: reading that pixel
        # straight from the image gives the same value without building the padded batch.
        return _gather_pixels(
            images, _unpad(rows, pad, h, padding_mode), _unpad(cols, pad, w, padding_mode)
        )
    # A constant (gray) border pixel has no image pixel to point at, so that border is padded on.
    # F.pad also checks the mode and gives any other of its modes the meaning it has there.
    if pad > 0:
        value = 0.5 if padding_mode == "constant" else None
        images = F.pad(images, (pad, pad, pad, pad), mode=padding_mode, value=value)
    return _gather_pixels(images, rows, cols)


def _unpad(index: Tensor, pad: int, size: int, padding_mode: str) -> Tensor:
    """The image coordinate that F.pad copies to coordinate ``index`` of the padded image (one
    axis of length ``size``), for reflect or replicate padding. Reflect padding mirrors about the
    edge pixel without repeating it (pad < size, checked by the caller, so one mirror suffices);
    replicate padding repeats the edge pixel."""
    index = index - pad
    if padding_mode == "replicate":
        return index.clamp(0, size - 1)
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def _gather_pixels(source: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``out[i, ch, y, x] = source[i, ch, rows[i, y], cols[i, x]]``, as a contiguous batch.

    One gather along the flattened pixels, with one index per output pixel shared by the channels
    (an expanded view, so not materialized per channel). Indexing with four broadcast index tensors
    did the same copy but about three times slower on CPU: it recomputes a four-term offset for
    every value, where the gather reads one precomputed flat offset.
    """
    n, c, h_in, w_in = source.shape
    h, w = rows.shape[1], cols.shape[1]
    flat = (rows[:, :, None] * w_in + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return source.reshape(n, c, h_in * w_in).gather(2, flat).view(n, c, h, w)


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
    def __call__(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        share: rng.Share | None = None,
    ) -> Tensor:
        return flip_and_crop(images, self.pad, self.flip_prob, self.padding_mode, generator, share)

    def __repr__(self) -> str:
        return (
            f"WeakAugment(pad={self.pad}, flip_prob={self.flip_prob}, "
            f"padding_mode={self.padding_mode!r})"
        )
