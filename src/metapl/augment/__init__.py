"""Batched, per-image data augmentation on the device where the images live.

``WeakAugment`` (flip + pad-and-crop) and ``StrongAugment`` (per-image RandAugment + cutout) take a
float batch ``[N, C, H, W]`` in [0, 1] and an optional ``torch.Generator`` for reproducible runs.
"""

from metapl.augment.cutout import cutout
from metapl.augment.ops import OPS, RANDAUGMENT_OPS
from metapl.augment.randaugment import StrongAugment, rand_augment
from metapl.augment.weak import WeakAugment, flip_and_crop

__all__ = [
    "OPS",
    "RANDAUGMENT_OPS",
    "StrongAugment",
    "WeakAugment",
    "cutout",
    "flip_and_crop",
    "rand_augment",
]
