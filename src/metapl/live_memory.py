"""Peak memory of the tensors a block of code makes, on a device whose allocator keeps no
statistics (the CPU).

Why: `metapl bench` reports each kind of step's peak memory. On CUDA that is the caching
allocator's ``max_memory_allocated``; PyTorch's CPU allocator counts nothing, so a CPU bench had
no peak memory at all, and the exact step's memory against the first-order step's (one of issue
5's goals) could be looked into only on a GPU.

:class:`LiveTensorMemory` sees every operator's outputs under a ``TorchDispatchMode`` (forwards,
autograd's backward, forward-mode AD, optimizer steps alike), counts each new storage's bytes once
(a view shares its base's storage) and takes them off when the storage is freed (a finalizer on
the storage's Python object, which PyTorch keeps alive as long as the storage itself).

What it does not see, so that its peak is a lower bound of the process's:
- memory an operator allocates and frees inside itself (a convolution's scratch space);
- storages made outside the dispatcher (``torch.from_numpy`` wraps numpy's memory);
- anything made before it started: build the models and the data inside it, as the bench does.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorMemory(TorchDispatchMode):
    """``with LiveTensorMemory("cpu") as live: ...``: ``live.bytes`` now, ``live.peak_bytes``
    since the start or the last :meth:`reset_peak`, of the storages made on ``device_type``."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self.bytes = 0
        self.peak_bytes = 0
        # id of a live storage's Python object -> its bytes; the id is free again only after the
        # finalizer below has removed it
        self._live: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak_bytes = self.bytes

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    def _freed(self, key: int) -> None:
        self.bytes -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                continue
            storage = t.untyped_storage()
            key, size = id(storage), storage.nbytes()
            if key in self._live or size == 0:  # a view, an in-place op's own output
                continue
            self._live[key] = size
            self.bytes += size
            weakref.finalize(storage, self._freed, key)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return out
