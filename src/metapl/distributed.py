"""Data parallelism for the MPL step: average every gradient across processes.

One MPL step on N processes, each with its shard of the labeled and unlabeled batches, equals one
step on the concatenated batch when these are averaged: the student's gradient g (before its
optimizer reads it, so the Appendix-B factors see the global g), the labeled-loss gradient v at
theta_{t+1} (the meta-gradient's other half), and the teacher's gradient (which contains
the MPL term). Pass ``GradientAverager()`` as ``MetaPseudoLabels(..., grad_sync=...)``.

BatchNorm: each process normalizes with its own shard's statistics, so with BatchNorm the result
equals single-process training only up to that difference (as with DistributedDataParallel);
convert the models with :func:`metapl.sync_batchnorm.convert_global_batchnorm` (any backend,
exact MPL included) for the global batch's statistics. Dropout masks come from each process's own
random stream.

The second half serves ``torchrun ... -m metapl train`` (:mod:`metapl.train.engine`): reading
torchrun's environment, the process group's lifetime, and :class:`DataParallel`, what the ranks of a
training run share besides gradients.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from metapl.errors import ConfigError


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


# ----------------------------------------------------------------------------- training runs
# `torchrun --nproc_per_node N -m metapl train ...` (metapl.train.engine): one process per device,
# each training on its contiguous slice of every step's batch.


def torchrun_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    try:
        rank, world_size, local_rank = (int(os.environ.get(k, d)) for k, d in zip(names, "010"))
    except ValueError:
        found = ", ".join(f"{k}={os.environ.get(k)!r}" for k in names)
        raise ConfigError(f"torchrun's environment holds a non-integer: {found}") from None
    return rank, world_size, local_rank


@contextlib.contextmanager
def torchrun_process_group(device: torch.device):
    """Join torchrun's process group for the duration of the block (nccl on CUDA, gloo on CPU) and
    destroy it on the way out, errors included. Nothing to do in a single process, or when the
    caller has already set up a group (it is theirs to destroy)."""
    if torchrun_world()[1] == 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL picks a device for its communicators
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # env:// from torchrun
    try:
        yield
        # Leave together: a rank tearing down its connections while a peer still talks to it can
        # abort the process at exit (seen with gloo). Not on errors: the peers may never get here.
        dist.barrier()
    finally:
        dist.destroy_process_group()


class DataParallel:
    """This process's place in data-parallel training; rank 0 of 1 when no process group is up, so
    that single-process runs go through the same calls and they do nothing.

    What is shared between ranks (see the README's "Multi-GPU with torchrun"):

    * gradients: every optimizer step reads the mean over ranks (``grad_sync``);
    * logged metrics: the mean over ranks (:meth:`mean_metrics`), so each batch-mean loss is the
      loss of the whole global batch and every rank takes the same NaN/Inf decision;
    * parameters and buffers: broadcast from rank 0 at the start (:meth:`broadcast_`); BatchNorm
      running statistics stay rank-local between checkpoints and evaluations and are broadcast
      from rank 0 at each (:meth:`broadcast_buffers_`), so every rank then holds the state rank 0
      saved, and evaluates the models rank 0 has;
    * evaluations: each rank classifies its share of the held-out images and the counts of
      correct predictions are summed (:meth:`sum_`).
    """

    def __init__(self) -> None:
        up = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if up else 0
        self.world_size = dist.get_world_size() if up else 1
        self.enabled = self.world_size > 1
        self.grad_sync = GradientAverager() if self.enabled else None
        self._wait_group = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes files and shows progress."""
        return self.rank == 0

    def mean_metrics(self, metrics: dict) -> dict:
        """Scalar metrics (tensors or numbers) averaged over ranks, as float64 tensors."""
        if not self.enabled or not metrics:
            return metrics
        names = sorted(metrics)  # the same order on every rank
        device = next(
            (v.device for v in metrics.values() if isinstance(v, torch.Tensor)), self._device()
        )
        flat = torch.stack(
            [
                torch.as_tensor(metrics[n], dtype=torch.float64, device=device).reshape(())
                for n in names
            ]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world_size)
        return dict(zip(names, flat.unbind()))

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, summed over ranks in place (every rank calling this at the same point)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def earliest(self, values: list[int]) -> list[int]:
        """The element-wise minimum of ``values`` over ranks (each rank passing as many)."""
        if not self.enabled or not values:
            return values
        flat = torch.tensor(values, dtype=torch.int64, device=self._device())
        dist.all_reduce(flat, op=dist.ReduceOp.MIN)
        return flat.tolist()

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank calling this at the same step)."""
        if not self.enabled:
            return flag
        flat = torch.tensor([int(flag)], dtype=torch.int64, device=self._device())
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        return bool(flat.item())

    def all_ranks(self, flag: bool) -> bool:
        """Whether ``flag`` is true on every rank (every rank calling this at the same point)."""
        return not self.any_rank(not flag)

    @torch.no_grad()
    def broadcast_(self, modules: Iterable[nn.Module]) -> None:
        """Copy rank 0's parameters and buffers into every rank's modules."""
        for module in modules:
            for t in (*module.parameters(), *module.buffers()):
                self._broadcast(t)

    @torch.no_grad()
    def broadcast_buffers_(self, modules: Iterable[nn.Module]) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) into every rank's modules."""
        for module in modules:
            for t in module.buffers():
                self._broadcast(t)

    def wait_for_main(self) -> None:
        """A barrier without the default group's timeout (10-30 min), for rank 0's long one-off
        work such as saving the checkpoint a stopped run resumes from."""
        if self.enabled:
            dist.barrier(group=self._patient_group())

    def gather_to_main(self, obj: Any) -> list | None:
        """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks.
        Over gloo on the host, without the default group's timeout: rank 0 may be writing the
        previous round of a precompute while the others classify theirs."""
        if not self.enabled:
            return [obj]
        gathered: list | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0, group=self._patient_group())
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._patient_group())
        return box[0]

    def _patient_group(self) -> dist.ProcessGroup:
        """A gloo group with a week's timeout; made at its first use, which every rank reaches at
        the same point (each calls the same collectives in the same order)."""
        if self._wait_group is None:
            self._wait_group = dist.new_group(backend="gloo", timeout=timedelta(days=7))
        assert self._wait_group is not None  # new_group returns None only outside the group
        return self._wait_group

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self.enabled:
            dist.broadcast(tensor.detach(), src=0)

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
