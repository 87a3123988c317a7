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
