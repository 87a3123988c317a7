"""metapl.losses on their own, against PyTorch's cross-entropy and hand values (the MPL and UDA
tests check them only inside whole training steps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metapl.losses import batch_mean, hard_cross_entropy, member_mean, soft_cross_entropy, upcast


def test_soft_cross_entropy_is_finite_for_extreme_logits():
    """CE(q, p) = -sum q log p with log p from log_softmax: a class whose probability underflows
    to 0 in float32 still has log p = -200, not -inf."""
    logits = torch.tensor([[0.0, 200.0], [1.0, 2.0]])
    q = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    ce = soft_cross_entropy(logits, q)
    lse = torch.log1p(torch.exp(torch.tensor(-1.0))) + 2.0  # logsumexp([1, 2])
    expected = torch.tensor([0.5 * 200.0, -(0.25 * (1.0 - lse) + 0.75 * (2.0 - lse))])
    torch.testing.assert_close(ce, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.6])
def test_hard_cross_entropy_matches_pytorch_per_example(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)  # [members, batch, C]
    labels = torch.randint(0, 4, (3, 5), generator=g)
    got = hard_cross_entropy(logits, labels, smoothing)
    want = F.cross_entropy(
        logits.reshape(-1, 4), labels.reshape(-1), label_smoothing=smoothing, reduction="none"
    ).reshape(3, 5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_batch_and_member_means_along_batch_dim():
    """Mean over examples (batch_dim), summed over the members before it."""
    x = torch.arange(6.0).reshape(2, 3)  # 2 members x 3 examples
    torch.testing.assert_close(member_mean(x, batch_dim=1), torch.tensor([1.0, 4.0]))
    assert batch_mean(x, batch_dim=1).item() == 5.0
    assert batch_mean(torch.tensor([1.0, 2.0, 6.0])).item() == 3.0


def test_upcast_half_precision_only():
    for dtype in (torch.float16, torch.bfloat16):
        assert upcast(torch.zeros(2, dtype=dtype)).dtype == torch.float32
    for dtype in (torch.float32, torch.float64):
        assert upcast(torch.zeros(2, dtype=dtype)).dtype == dtype
