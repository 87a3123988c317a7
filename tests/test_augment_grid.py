"""The geometric ops' sampling grid: float64 on a GPU, where a float32 ``affine_grid`` (a matmul)
would round in TF32 whenever the process-wide flag is on, a flag the exact step turns off and on
again while the batch-ahead thread augments (metapl.augment.ops._grid_dtype). On the CPU the grid is
computed as before, in the images' dtype."""

from __future__ import annotations

import types

import pytest
import torch

from metapl.augment import ops as O

GEOMETRIC = ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"]


def _images(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 255).round() / 255


def _levels(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) * 2 - 1) * 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_grid_is_float64_on_a_gpu_and_the_images_dtype_elsewhere(dtype):
    on = types.SimpleNamespace  # the device's type is all the choice reads
    assert O._grid_dtype(on(device=torch.device("cuda", 0), dtype=dtype)) == torch.float64
    assert O._grid_dtype(on(device=torch.device("cpu"), dtype=dtype)) == dtype
    assert O._grid_dtype(torch.zeros(1, dtype=dtype)) == dtype


@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (16, 1, 20, 28)])
@pytest.mark.parametrize("name", GEOMETRIC)
def test_a_float64_grid_samples_the_pixels_a_float32_grid_does(monkeypatch, name, shape):
    """The GPU's grid, run here: rounded once from float64 it picks the same source pixels (and the
    same gray outside) as the float32 grid, on random levels; and the exact cases stay exact."""
    x, level = _images(shape), _levels(shape[0])
    native = O.OPS[name](x, level)
    monkeypatch.setattr(O, "_grid_dtype", lambda images: torch.float64)
    wide = O.OPS[name](x, level)
    assert wide.dtype == x.dtype
    assert torch.equal(wide, native)
    square = _images((3, 3, 16, 16))
    turned = O.rotate(square, torch.full((3,), 30.0))  # 90 degrees
    assert torch.equal(turned, torch.rot90(square, 1, dims=(2, 3)))
    moved = O.translate_x(square, torch.full((3,), 10.0))  # 5 px of 16
    assert torch.equal(moved[..., :, :11], square[..., :, 5:]) and (moved[..., :, 11:] == 0.5).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a GPU's")
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_ops_on_a_gpu_do_not_depend_on_the_tf32_flag(name):
    x, level = _images((256, 3, 32, 32)).cuda(), _levels(256).cuda()
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        outs = []
        for tf32 in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            outs.append(O.OPS[name](x, level))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert torch.equal(outs[0], outs[1])
