"""metapl.mpl.replay.clones: the exact step's copies of buffers and of theta_t, one foreach clone
per device and dtype (a host-bound GPU step paid a kernel launch per tensor)."""

from __future__ import annotations

import torch

from metapl.models import create_model
from metapl.mpl.replay import buffer_copies, clones


def _mixed() -> list[torch.Tensor]:
    return [
        torch.randn(3),
        torch.tensor(5),
        torch.randn(4, 3).t(),
        torch.zeros(2, dtype=torch.bool),
        torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        torch.randn(2, dtype=torch.float64),
        torch.randn(6),
    ]


def test_the_copies_are_clones_in_order_strides_and_dtypes_kept():
    tensors = _mixed()
    copies = clones(tensors)
    assert len(copies) == len(tensors)
    for t, c in zip(tensors, copies):
        assert torch.equal(t, c) and c.dtype == t.dtype and c.stride() == t.stride()
        assert c.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    assert clones([]) == []


def test_one_foreach_clone_per_dtype(monkeypatch):
    """torch's foreach clone takes its one-launch path only for tensors of one device and dtype: a
    WRN's float32 statistics and int64 counters in one call fell back to a clone per tensor."""
    calls: list[set] = []
    real = torch._foreach_clone

    def recording(tensors):
        calls.append({(t.device, t.dtype) for t in tensors})
        return real(tensors)

    monkeypatch.setattr(torch, "_foreach_clone", recording)
    copies = buffer_copies(create_model("wrn28_2", 10))
    assert len(copies) == 75
    assert sorted(str(next(iter(c))[1]) for c in calls) == ["torch.float32", "torch.int64"]
    assert all(len(c) == 1 for c in calls)


def _dispatched(fn) -> int:
    """How many aten operations ``fn`` dispatches (each a kernel launch or more on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            count[0] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return count[0]


def test_w_is_the_factors_times_v_in_two_foreach_multiplications():
    """w = (dU/dg)^T v with diagonal factors: numbers (SGD's) and tensors (Adam's, RMSprop's), 0 and
    None skipped; equal to each f * v, in a fixed number of operations (one multiplication per
    parameter was a kernel launch each on a host-bound GPU step)."""
    from metapl.mpl.update_rules import times_factors

    g = torch.Generator().manual_seed(0)
    v = [torch.randn(3, 4, generator=g) for _ in range(40)] + [None, torch.randn(2, generator=g)]
    factors: list = [-0.1 * (i + 1) for i in range(20)]
    factors += [torch.rand(3, 4, generator=g) for _ in range(20)]
    factors += [0.5, 0.0]
    w = times_factors(factors, v)
    for f, vi, wi in zip(factors, v, w):
        if vi is None or (not isinstance(f, torch.Tensor) and f == 0.0):
            assert wi is None
        else:
            assert torch.equal(wi, f * vi)
    assert _dispatched(lambda: times_factors(factors, v)) <= 4


def test_buffer_and_theta_copies_detach_nothing():
    """Copies under no_grad: a detach of each of a WRN's 75 buffers was 75 more dispatches, three
    times a step; the copies carry no graph either way."""
    model = create_model("wrn28_2", 10)
    assert _dispatched(lambda: buffer_copies(model)) <= 4
    with torch.no_grad():
        copies = clones(list(model.parameters()))
    assert not any(c.requires_grad for c in copies)
