"""GlobalBatchNorm's forward for the layer shapes and options the two-process test does not reach
(BatchNorm1d/3d, momentum=None, no affine, no running statistics, half precision, one example
per process), in one process: a stand-in for the collective adds what a second process holding
``other`` would contribute, so the result must equal BatchNorm on ``cat([x, other])``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metapl import sync_batchnorm
from metapl.sync_batchnorm import GlobalBatchNorm, convert_global_batchnorm


class OtherRank:
    """``dist.all_reduce`` as seen by this process when a second process holds ``other``: the
    forward pass reduces twice per layer (per-channel sums with the count, then the squared
    deviations from the global mean), and this adds the second process's share of each."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other
        self.calls = 0
        self.mean = None

    def __call__(self, t: torch.Tensor, group=None) -> None:
        x = self.other.to(t.dtype)
        dims = [0, *range(2, x.dim())]
        if self.calls % 2 == 0:
            count = torch.tensor([x.numel() // x.shape[1]], dtype=t.dtype)
            share = torch.cat([x.sum(dims), count])
            self.mean = (t[:-1] + share[:-1]) / (t[-1] + share[-1])
        else:
            centered = x - self.mean.view([1, -1] + [1] * (x.dim() - 2))
            share = (centered * centered).sum(dims)
        self.calls += 1
        t.add_(share)


@pytest.fixture
def two_ranks(monkeypatch):
    """Patch in a world of two; returns a function that installs the other rank's shard."""
    monkeypatch.setattr(sync_batchnorm, "_world_size", lambda group: 2)

    def install(other: torch.Tensor) -> OtherRank:
        fake = OtherRank(other)
        monkeypatch.setattr(sync_batchnorm.dist, "all_reduce", fake)
        return fake

    return install


def pair(cls, **kwargs) -> tuple[nn.Module, GlobalBatchNorm]:
    """A BatchNorm and its global twin holding equal (not shared) parameters and buffers."""
    ref = cls(3, **kwargs).double()
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            ref.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    twin = convert_global_batchnorm(nn.Sequential(cls(3, **kwargs).double()))[0]
    twin.load_state_dict(ref.state_dict())
    return ref, twin


CASES = {
    "1d-flat": (nn.BatchNorm1d, (4, 3), {}),
    "1d-sequence": (nn.BatchNorm1d, (4, 3, 5), {}),
    "3d": (nn.BatchNorm3d, (2, 3, 2, 3, 2), {}),
    "momentum-none": (nn.BatchNorm2d, (2, 3, 2, 2), {"momentum": None}),
    "no-affine": (nn.BatchNorm2d, (2, 3, 2, 2), {"affine": False}),
    "eps": (nn.BatchNorm1d, (4, 3), {"eps": 0.5}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_global_statistics_cover_the_other_process(two_ranks, case):
    """Outputs of this shard and running statistics over three steps equal BatchNorm's on both
    shards together (momentum=None: a cumulative average over the steps)."""
    cls, shape, kwargs = CASES[case]
    ref, twin = pair(cls, **kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            mine = 2.0 + torch.randn(shape, generator=g, dtype=torch.float64)
            other = -1.0 + 3.0 * torch.randn(shape, generator=g, dtype=torch.float64)
            two_ranks(other)
            got = twin(mine)
            want = ref(torch.cat([mine, other]))[: shape[0]]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name, buffer in ref.named_buffers():
        torch.testing.assert_close(twin.get_buffer(name), buffer, rtol=1e-12, atol=1e-14)


def test_without_running_statistics_eval_still_uses_the_global_batch(two_ranks):
    """``track_running_stats=False``: in eval mode too the statistics are the global batch's,
    as BatchNorm's are its whole batch's."""
    ref, twin = pair(nn.BatchNorm1d, track_running_stats=False)
    ref.eval()
    twin.eval()
    g = torch.Generator().manual_seed(1)
    mine = torch.randn(4, 3, generator=g, dtype=torch.float64)
    other = 5.0 + torch.randn(4, 3, generator=g, dtype=torch.float64)
    two_ranks(other)
    with torch.no_grad():
        got = twin(mine)
    torch.testing.assert_close(got, ref(torch.cat([mine, other]))[:4], rtol=1e-10, atol=1e-12)


def test_one_example_per_process_is_enough_when_the_global_batch_has_more(two_ranks):
    """BatchNorm's "more than 1 value per channel" rule is about the global batch: one example
    here plus one on the other process is fine, one example in all is an error."""
    ref, twin = pair(nn.BatchNorm1d)
    mine, other = torch.tensor([[1.0, 2.0, 3.0]]).double(), torch.tensor([[3.0, 2.0, 0.0]]).double()
    two_ranks(other)
    with torch.no_grad():
        got = twin(mine)
    torch.testing.assert_close(got, ref(torch.cat([mine, other]))[:1])
    two_ranks(other[:0])  # the other process's shard is empty
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        twin(mine)


def test_half_precision_inputs_are_normalized_in_float32(two_ranks):
    """float16 activations with a large mean: the statistics are taken in float32 (half sums of
    values near 100 would be off by whole units), and the output comes back as float16."""
    layer = convert_global_batchnorm(nn.Sequential(nn.BatchNorm1d(3)))[0]
    g = torch.Generator().manual_seed(2)
    mine = (100.0 + torch.randn(64, 3, generator=g)).half()
    other = (100.0 + torch.randn(64, 3, generator=g)).half()
    two_ranks(other)
    with torch.no_grad():
        got = layer(mine)
    assert got.dtype == torch.float16
    want = nn.BatchNorm1d(3)(torch.cat([mine, other]).float())[:64]
    torch.testing.assert_close(got.float(), want, rtol=0, atol=4e-3)


def test_conversion_reaches_nested_layers_and_keeps_their_options():
    """BatchNorms inside submodules are swapped too, with their eps, momentum and train/eval
    mode (an eval-mode layer turned to train mode would change its running statistics)."""
    inner = nn.BatchNorm2d(4, eps=1e-3, momentum=0.01).eval()
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 1), inner), nn.BatchNorm1d(2))
    convert_global_batchnorm(model)
    swapped = model[0][1]
    assert isinstance(swapped, GlobalBatchNorm) and isinstance(model[1], GlobalBatchNorm)
    assert swapped.eps == 1e-3 and swapped.momentum == 0.01
    assert not swapped.training and model[1].training
    assert swapped.weight is inner.weight and swapped.running_var is inner.running_var
