"""Input checks shared by the augmentations."""

from __future__ import annotations

from torch import Tensor


def check_images(images: Tensor) -> None:
    """Augmentations take a float batch ``[N, C, H, W]`` with values in [0, 1]."""
    if images.dim() != 4:
        raise ValueError(f"expected images of shape [N, C, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [0, 1], got dtype {images.dtype}")
