"""Copies from the host to the device that do not wait for the device's queued work.

A training step's batch and augmentation draws are made on the CPU (numpy images, the CPU generator
of the run) and copied to the models' device. ``non_blocking=True`` alone is not enough on a GPU:
from pageable memory the driver may first wait for everything queued on the stream (CUDA's "API
synchronization behavior"), and then the CPU cannot prepare the next kernels while the GPU runs
this step's. From pinned (page-locked) memory the copy is asynchronous; PyTorch's caching host
allocator keeps a pinned block alive until the copy that reads it has run.

A copy into host memory stays blocking: from a GPU, ``non_blocking=True`` returns a pinned CPU
tensor before the copy has run, which the host could read before it is written (a generator on the
GPU drawing for images on the CPU, in :mod:`metapl.augment.rng`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` on ``device``, without a host sync when ``t`` is on the CPU and ``device`` a GPU; a
    copy to the CPU is complete when it returns."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=device.type != "cpu")
