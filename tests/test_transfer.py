"""metapl.transfer.to_device: which copies are asynchronous, and from what memory."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from metapl.transfer import to_device


class _Copies(TorchFunctionMode):
    """Records each ``Tensor.to`` call (its tensor and options); ``skip`` stands in for the copy
    itself (a copy out of the meta device has no values to make)."""

    def __init__(self, skip: bool = False):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, dict]] = []
        self.skip = skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            self.calls.append((args[0], kwargs))
            if self.skip:
                return torch.empty(args[0].shape)
        return func(*args, **kwargs)


def test_a_copy_into_host_memory_is_blocking():
    """From a GPU, a non_blocking copy to the CPU returns before the values are there (into pinned
    memory the host may read at once): a generator on the GPU drawing for images on the CPU read
    its draws so. Seen here from another device than the CPU, the meta device."""
    copies = _Copies(skip=True)
    with copies:
        to_device(torch.empty(3, device="meta"), "cpu")
    assert [kwargs.get("non_blocking") for _, kwargs in copies.calls] == [False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a GPU")
def test_on_a_gpu_a_copy_from_the_host_reads_pinned_memory():
    """torch.cuda.set_sync_debug_mode does not see the driver's wait before a copy from pageable
    memory, so test_host_syncs' GPU check would pass without the pinning: it is checked here."""
    t = torch.arange(12.0).view(3, 4).t()  # a dense view with permuted strides
    copies = _Copies()
    with copies:
        out = to_device(t, "cuda")
    assert len(copies.calls) == 1
    source, kwargs = copies.calls[0]
    assert source.is_pinned() and kwargs.get("non_blocking") is True
    assert out.device.type == "cuda" and torch.equal(out.cpu(), t)
    assert not to_device(t, "cpu").is_pinned()  # nothing is pinned for the CPU


class _FakeCopies(TorchFunctionMode):
    """Stands in for a GPU on a machine without one: records each ``pin_memory`` (the source's
    device) and ``Tensor.to`` (the source's device, the target, non_blocking) and makes neither."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.pin_memory:
            self.calls.append(("pin_memory", args[0].device.type))
            return args[0]
        if func is torch.Tensor.to:
            target = torch.device(args[1]).type
            self.calls.append(("to", args[0].device.type, target, kwargs.get("non_blocking")))
            return args[0]
        return func(*args, **kwargs)


@pytest.mark.parametrize(
    "source, target, calls",
    [
        # from the host to a GPU: pinned, then asynchronous
        ("cpu", "cuda", [("pin_memory", "cpu"), ("to", "cpu", "cuda", True)]),
        ("cpu", torch.device("cuda", 0), [("pin_memory", "cpu"), ("to", "cpu", "cuda", True)]),
        # from another device to a GPU: nothing to pin, and no wait either
        ("meta", "cuda", [("to", "meta", "cuda", True)]),
        # pinned memory is a CUDA host allocation: not for other devices
        ("cpu", "meta", [("to", "cpu", "meta", True)]),
        # into host memory: complete when it returns
        ("meta", "cpu", [("to", "meta", "cpu", False)]),
        ("cpu", "cpu", [("to", "cpu", "cpu", False)]),
    ],
)
def test_which_copies_read_pinned_memory_and_which_block(source, target, calls):
    """The GPU test above, on any machine: the copies to_device asks for, made by none."""
    copies = _FakeCopies()
    with copies:
        to_device(torch.zeros(3, device=source), target)
    assert copies.calls == calls
