"""The tangent pass normalizes with the batch statistics the update pass saved.

BatchNorm's tangent needs the batch's mean and 1/std. The record pass is BatchNorm's own forward,
whose autograd node keeps both for its backward; the tape keeps a reference to them, and the
tangent pass makes no second pass over x to compute them (on an H200 the statistics kernels were
the largest share of the exact step's device time).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from metapl.models import create_model
from metapl.mpl import tangent_ops as ops
from metapl.mpl.tangent import TangentTape

aten = torch.ops.aten


def _case(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 4, 5, generator=g, dtype=dtype) * 2 + 0.5
    c = 3
    vec = [torch.randn(c, generator=g, dtype=dtype) for _ in range(3)]
    dx = torch.randn(x.shape, generator=g, dtype=dtype)
    return x, dx, *vec


@pytest.mark.parametrize("parts", ["all", "no_dx", "no_dgamma", "dbeta_only", "no_gamma"])
def test_the_tangent_with_saved_statistics_is_the_tangent_that_computes_them(parts):
    x, dx, gamma, dgamma, dbeta = _case(0)
    if parts == "no_dx":
        dx = None
    elif parts == "no_dgamma":
        dgamma = None
    elif parts == "dbeta_only":
        dx = dgamma = None
    elif parts == "no_gamma":
        gamma = None
    eps = 1e-3
    mean = x.mean(dim=(0, 2, 3))
    rstd = (x.var(dim=(0, 2, 3), unbiased=False) + eps).rsqrt()
    args = (x, dx, gamma, dgamma, dbeta, True, None, None, eps)
    computed = ops.bn_tangent(*args)
    with_saved = ops.bn_tangent(*args, saved=(mean, rstd))
    torch.testing.assert_close(with_saved, computed, rtol=1e-12, atol=1e-12)
    # the saved statistics are the ones used: others give another tangent
    if dx is not None or dgamma is not None:
        shifted = ops.bn_tangent(*args, saved=(mean + 0.1, rstd))
        assert not torch.allclose(shifted, computed)


def test_running_statistics_ignore_saved_batch_statistics():
    x, dx, gamma, dgamma, dbeta = _case(1)
    rm, rv = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype) * 2
    args = (x, dx, gamma, dgamma, dbeta, False, rm, rv, 1e-5)
    bogus = (torch.full((3,), 9.0, dtype=x.dtype), torch.full((3,), 9.0, dtype=x.dtype))
    torch.testing.assert_close(ops.bn_tangent(*args, saved=bogus), ops.bn_tangent(*args))


def test_bf16_activations_with_saved_statistics_are_as_close_to_float64_as_the_computed():
    """In bf16 the two paths round differently (eval mode's kernel against train mode's): each
    is held to the float64 tangent of the same bf16 values, the saved one no farther than the
    computed one's own rounding error allows."""
    x, dx, gamma, dgamma, dbeta = _case(2, torch.float32)
    xb, dxb = x.bfloat16(), dx.bfloat16()
    eps = 1e-5
    _, mean, rstd = aten.native_batch_norm(xb, gamma, dbeta, None, None, True, 0.0, eps)
    args = (xb, dxb, gamma, dgamma, dbeta, True, None, None, eps)
    computed = ops.bn_tangent(*args)
    with_saved = ops.bn_tangent(*args, saved=(mean, rstd))
    assert with_saved.dtype == computed.dtype == torch.bfloat16
    wide = [t.double() for t in (xb, dxb, gamma, dgamma, dbeta)]
    reference = ops.bn_tangent(*wide, True, None, None, eps)
    err_computed = (computed.double() - reference).abs().max()
    err_saved = (with_saved.double() - reference).abs().max()
    scale = reference.abs().max()
    assert err_computed <= 2**-7 * scale  # bf16's own rounding: 8 bits of mantissa
    assert err_saved <= 1.5 * err_computed


class _BatchNormCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.training: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten.native_batch_norm.default:
            self.training.append(bool(args[5]))
        return func(*args, **(kwargs or {}))


def test_the_record_keeps_each_batchnorms_statistics_and_the_tangent_pass_computes_none():
    torch.manual_seed(0)
    model = create_model("wrn28_2", 10).train()
    params = dict(model.named_parameters())
    tape = TangentTape(model, params.values())
    x = torch.randn(4, 3, 32, 32)
    record = tape.record(x)
    kept = [
        v
        for k, v in zip(tape._saved_keys, record.saved)
        if isinstance(k, tuple) and k[0] == "bn_stats"
    ]
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 25 and len(kept) == n_bn and all(v is not None for v in kept)
    # the kept statistics are the ones the forward normalized with (the first BatchNorm's input
    # is the stem convolution's output)
    with torch.no_grad():
        first = model.stem(x)
    torch.testing.assert_close(kept[0][0], first.mean(dim=(0, 2, 3)))
    theta = {id(p): p.detach().clone() for p in params.values()}
    w = {id(p): torch.randn_like(p) for p in params.values()}
    with torch.no_grad(), _BatchNormCalls() as calls:
        j = tape.tangent(record, theta, w)
    assert j is not None and torch.isfinite(j).all()
    assert calls.training and not any(calls.training)  # eval-mode transforms only: no statistics
