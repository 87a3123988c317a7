"""The next step's batch, made on a background thread while this step trains (on a GPU).

Why: on the H200 a training step is bound by the host, not the GPU. Per-image RandAugment on the
GPU is a few hundred small kernels per view, 18-48 ms of the host's time for Table 3's batch
(128 labeled, 896 unlabeled, two views) against a few ms of GPU work, and the engine's step was
111-131 ms where the MPL step alone took 78-82 ms (benchmarks/profile_step.py, session 35).
PyTorch releases the GIL while it dispatches and launches an operation, and autograd's backward
runs on its own thread, so a second Python thread that builds step s+1's batch overlaps most of
that host time with step s.

What stays as it was: the batch of a step is a function of (seed, step) alone
(:meth:`BatchSource.batch` seeds its own generator and draws nothing from the global ones), so
the batches, and every result, are the same with or without the thread. The worker owns the
source: every call of it goes through the one worker thread, in step order (the source's epoch
cache and its decoding look-ahead are not safe to share between threads).

One process-wide setting the two threads share: the exact step turns TF32 off around its student
passes (``tf32_disabled``) while the worker augments. No augmentation kernel is a cuDNN
convolution, and the one matmul (``affine_grid``'s, in the geometric ops) is float64 on a GPU,
which no TF32 flag touches (:func:`metapl.augment.ops._grid_dtype`), so the batches do not depend
on the threads' timing.

On CUDA the worker issues its kernels on a stream of its own; the step's stream waits on an event
recorded after the batch's last kernel, and each tensor of the batch is marked as used on the
step's stream (``record_stream``) so that the caching allocator does not give its memory to the
worker's next batch while the step still reads it. On the CPU there is nothing to overlap (the
step's own threads use every core), so :func:`batches_for` returns the source itself there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from metapl.train.data import Batch, BatchSource


class BatchesAhead:
    """:meth:`BatchSource.batch` of step s+1 made while step s trains; the same batches, in order.

    A request for another step or other views than the one made ahead (a resume elsewhere, or
    fine-tuning's views without ``views_at``) waits for the batch being made, drops it, and makes
    the one asked for.
    An error of the worker (an unreadable image file, say) is raised by the request for that
    step, as :class:`BatchSource` raises it.
    """

    def __init__(
        self,
        source: BatchSource,
        device: torch.device | str,
        last_step: int,
        views_at: Callable[[int], tuple[str, ...] | None] | None = None,
    ):
        """``last_step``: the run's last step (nothing is made ahead past it). ``views_at(step)``:
        the views the loop will ask for at ``step`` (fine-tuning's from its first step on);
        without it, the views of the step before."""
        self.source = source
        self.device = torch.device(device)
        self.last_step = last_step
        self.views_at = views_at
        self._stream = None
        worker_start: dict = {}
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
            # The worker's own current device: a new thread's is cuda:0, and leaving the stream's
            # context would make it current there, opening a CUDA context on GPU 0 for every
            # torchrun rank (as torch's DataLoader pin-memory thread, set it first).
            worker_start = {
                "initializer": torch.cuda.set_device,
                "initargs": (self._stream.device,),
            }
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="metapl-batches", **worker_start
        )
        self._ahead: tuple[tuple[int, tuple[str, ...] | None], Future] | None = None

    def batch(self, step: int, views: tuple[str, ...] | None = None) -> Batch:
        """The batch of ``step`` with ``views`` (default: the source's views)."""
        key = (step, None if views is None else tuple(views))
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == key:
            batch, ready = ahead[1].result()
        else:
            if ahead is not None:  # made for a step that did not come: let it finish, drop it
                ahead[1].exception()
            batch, ready = self._worker.submit(self._make, *key).result()
        if step + 1 <= self.last_step:
            views_next = key[1] if self.views_at is None else self.views_at(step + 1)
            following = (step + 1, None if views_next is None else tuple(views_next))
            self._ahead = (following, self._worker.submit(self._make, *following))
        return self._handed_over(batch, ready)

    def _make(self, step: int, views: tuple[str, ...] | None) -> tuple[Batch, object]:
        """On the worker thread: the batch, on the worker's stream (CUDA), and an event recorded
        after its last kernel."""
        if self._stream is None:
            return self.source.batch(step, views), None
        with torch.cuda.stream(self._stream):
            batch = self.source.batch(step, views)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return batch, ready

    def _handed_over(self, batch: Batch, ready: object) -> Batch:
        """The batch, usable on the calling thread's current stream (CUDA: after the worker's
        kernels, and kept from the worker's later allocations until this stream is done)."""
        if ready is None:
            return batch
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(ready)  # type: ignore[arg-type]
        for f in dataclasses.fields(batch):
            value = getattr(batch, f.name)
            if isinstance(value, Tensor) and value.is_cuda:
                value.record_stream(stream)
        return batch

    def close(self) -> None:
        """Drop the batch being made (after it is done: the source is not shared) and the
        source's own look-ahead; returns once nothing runs."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].exception()
        self._worker.shutdown(wait=True)
        self.source.close()


def batches_for(
    source: BatchSource,
    device: torch.device | str,
    last_step: int,
    views_at: Callable[[int], tuple[str, ...] | None] | None = None,
):
    """What a training loop should draw its batches from: the source itself on a CPU, batches
    made a step ahead on a background thread (:class:`BatchesAhead`) on a GPU."""
    if torch.device(device).type != "cuda":
        return source
    return BatchesAhead(source, device, last_step, views_at)
