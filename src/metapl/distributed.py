"""Data parallelism for the MPL step: average every gradient across processes.

One MPL step on N processes, each with its shard of the labeled and unlabeled batches, equals one
step on the concatenated batch when these are averaged: the student's gradient g (before its
optimizer reads it, so the Appendix-B factors see the global g), the labeled-loss gradient v at
theta_{t+1} (the meta-gradient's other half), and the teacher's gradient (which contains
the MPL term). Pass ``GradientAverager()`` as ``MetaPseudoLabels(..., grad_sync=...)``.

BatchNorm: each process normalizes with its own shard's statistics, so with BatchNorm the result
equals single-process training only up to that difference (as with DistributedDataParallel);
convert the models with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (CUDA) for exact
batch statistics. Dropout masks come from each process's own random stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class GradientAverager:
    """All-reduce (mean) of gradient tensors, in place, as one flat buffer per call."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("GradientAverager needs torch.distributed.init_process_group first")
        self.group = group
        self.world_size = dist.get_world_size(group)

    def mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        tensors = [t for t in tensors if t is not None]
        if not tensors or self.world_size == 1:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat.div_(self.world_size)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
