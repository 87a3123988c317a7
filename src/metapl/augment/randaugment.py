"""RandAugment with a policy drawn *per image*, as UDA and MPL use it, on whole batches.

For every image and each of ``num_ops`` layers: pick an op uniformly from the op list, apply it with
probability ``op_prob`` (UDA's policies apply each op with probability 0.5), at a magnitude drawn
uniformly from [0, max_magnitude] with a random sign; then cut out one gray square. Batched
libraries (kornia's RandAugment) pick one policy per batch, so all images of a batch get the same
ops; per-image policies are what makes the augmented views of an unlabeled batch diverse.

Cost: per layer the batch is sorted into one group per op (one argsort plus one bincount, on the
generator's device: with the CPU generator of training runs the group sizes are known without a
host sync, for images on a GPU too), and each op runs once, on its own group only. Every image
thus goes through at most ``num_ops`` ops (each applied with probability ``op_prob``): the work is
O(N * num_ops) with at most ``num_ops * len(ops)`` kernel groups, instead of O(N * len(ops)) for
computing every op on every image and selecting.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metapl.augment import rng
from metapl.augment.checks import check_images
from metapl.augment.cutout import _cutout
from metapl.augment.ops import OPS, RANDAUGMENT_OPS, identity
from metapl.errors import ConfigError
from metapl.transfer import to_device


def rand_augment(
    images: Tensor,
    ops: tuple[str, ...] = RANDAUGMENT_OPS,
    num_ops: int = 2,
    max_magnitude: float = 10.0,
    op_prob: float = 0.5,
    generator: torch.Generator | None = None,
    share: rng.Share | None = None,
) -> Tensor:
    """Apply ``num_ops`` randomly chosen ops to each image independently (no cutout).

    Draw order (fixed, for reproducibility): per layer, op index, apply flag, magnitude, sign.
    ``share``: ``images`` are these rows of a larger batch (a rank's share under torchrun); the
    policies are drawn for the whole batch and these rows' applied, so each image gets the view
    it gets in the whole batch (:class:`metapl.augment.rng.Share`).
    """
    check_images(images)
    n = images.shape[0]
    device = images.device
    # The policy is drawn, and the batch sorted into its groups, where the generator lives (the
    # CPU in training runs): the group sizes are then read on the host without waiting for the
    # GPU, and only the order and levels travel to the images (as rng's draws do, non_blocking).
    draw_device = rng.draw_device(generator, device)
    fns = [OPS[name] for name in ops]
    skip = len(fns)  # group index of images that skip this layer
    out = images
    for _ in range(num_ops):
        choice = rng.randint(len(fns), n, draw_device, generator, share)
        applied = rng.bernoulli(op_prob, n, draw_device, generator, share)
        magnitude = rng.uniform(n, draw_device, generator, share) * max_magnitude
        sign = torch.where(rng.bernoulli(0.5, n, draw_device, generator, share), -1.0, 1.0)
        level = to_device(magnitude * sign, device)
        choice = torch.where(applied, choice, torch.full_like(choice, skip))

        order = to_device(torch.argsort(choice, stable=True), device)
        counts = torch.bincount(choice, minlength=skip + 1).tolist()
        # One copy of the batch for all layers: the groups of a layer are disjoint and each op
        # reads its group (``out[idx]`` is a gathered copy) before its result is written back, so
        # writing into ``out`` in place gives what a fresh copy per layer gave. Only the caller's
        # ``images`` must not be written to.
        if out is images:
            out = images.clone()
        _apply_groups(out, fns, order, counts, level)
    return out


def _apply_groups(out: Tensor, fns: list, order: Tensor, counts: list[int], level: Tensor) -> None:
    """Run each op on its group of ``out`` (``order`` split by ``counts``, the skip group last)
    and write its results back into ``out``.

    ``index_copy_`` does what ``out[idx] = ...`` did (a copy along the batch dimension; the
    indices of a group are distinct) and ``index_select`` what ``out[idx]`` did, without Python's
    indexing machinery, whose overhead per call is much of the cost on small images. But
    ``index_select`` returns a contiguous group where ``out[idx]`` keeps a channels_last batch's
    layout, and the ops' reductions (Contrast's mean, Sharpness's convolution) round differently
    in another layout: so a batch not in the contiguous layout is still gathered by indexing."""
    contiguous = out.stride() == _contiguous_strides(out.shape)
    for fn, idx in zip(fns, order.split(counts)):
        if idx.numel() == 0 or fn is identity:
            continue
        group = out.index_select(0, idx) if contiguous else out[idx]
        result = fn(group, level.index_select(0, idx))
        out.index_copy_(0, idx, result.to(out.dtype))


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``, as cutout's output has them (also in
    dimensions of size 1, where ``is_contiguous`` accepts other strides)."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return tuple(strides)


class StrongAugment:
    """``StrongAugment(num_ops=2, max_magnitude=10, cutout=16)(images, generator) -> images``.

    RandAugment with per-image policies followed by cutout. ``cutout`` is a side in pixels (int) or
    a fraction of the shorter image side (float); 0 disables it. 16 px is UDA's value for 32x32.
    """

    def __init__(
        self,
        num_ops: int = 2,
        max_magnitude: float = 10.0,
        cutout: int | float = 16,
        op_prob: float = 0.5,
        ops: tuple[str, ...] | list[str] = RANDAUGMENT_OPS,
    ):
        unknown = [name for name in ops if name not in OPS]
        if unknown:
            raise ConfigError(f"unknown augmentation ops {unknown}; known: {sorted(OPS)}")
        if not ops:
            raise ConfigError("StrongAugment needs at least one op")
        if num_ops < 0:
            raise ConfigError(f"num_ops must be >= 0, got {num_ops}")
        if max_magnitude < 0:
            raise ConfigError(f"max_magnitude must be >= 0, got {max_magnitude}")
        if not 0.0 <= op_prob <= 1.0:
            raise ConfigError(f"op_prob must be in [0, 1], got {op_prob}")
        if cutout < 0:
            raise ConfigError(f"cutout must be >= 0, got {cutout}")
        self.num_ops = num_ops
        self.max_magnitude = float(max_magnitude)
        self.cutout = cutout
        self.op_prob = op_prob
        self.ops = tuple(ops)

    @torch.no_grad()
    def __call__(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        share: rng.Share | None = None,
    ) -> Tensor:
        out = rand_augment(
            images, self.ops, self.num_ops, self.max_magnitude, self.op_prob, generator, share
        )
        if self.cutout:
            # RandAugment's output is a copy of its own (when it made any layer): cutout may write
            # into it, saving a copy of the batch, where it has cutout's contiguous layout.
            in_place = out is not images and out.stride() == _contiguous_strides(out.shape)
            out = _cutout(out, self.cutout, generator, in_place=in_place, share=share)
        return out

    def __repr__(self) -> str:
        return (
            f"StrongAugment(num_ops={self.num_ops}, max_magnitude={self.max_magnitude}, "
            f"cutout={self.cutout}, op_prob={self.op_prob}, ops={self.ops})"
        )
