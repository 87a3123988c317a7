"""StrongAugment, rand_augment, cutout and the geometric ops against the implementations they
replaced (kept below as the reference): a fresh copy of the batch per RandAugment layer, cutout as
a masked fill of the whole batch through a broadcast mask, and the geometric ops' out-of-image test
as a reduction and a select against a gray batch. The faster versions must give the same bits, in the same
layout, draw the same random numbers and leave the generator in the same state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metapl.augment import OPS, RANDAUGMENT_OPS, StrongAugment, cutout, ops, rand_augment, rng
from metapl.augment.cutout import cutout_size
from metapl.augment.ops import identity


def reference_rand_augment(images, ops, num_ops, max_magnitude, op_prob, generator):
    n = images.shape[0]
    device = images.device
    draw_device = rng.draw_device(generator, device)
    fns = [OPS[name] for name in ops]
    skip = len(fns)
    out = images
    for _ in range(num_ops):
        choice = rng.randint(len(fns), n, draw_device, generator)
        applied = rng.bernoulli(op_prob, n, draw_device, generator)
        magnitude = rng.uniform(n, draw_device, generator) * max_magnitude
        sign = torch.where(rng.bernoulli(0.5, n, draw_device, generator), -1.0, 1.0)
        level = (magnitude * sign).to(device)
        choice = torch.where(applied, choice, torch.full_like(choice, skip))
        order = torch.argsort(choice, stable=True).to(device)
        counts = torch.bincount(choice, minlength=skip + 1).tolist()
        result = out.clone()
        for fn, idx in zip(fns, order.split(counts)):
            if idx.numel() == 0 or fn is identity:
                continue
            result[idx] = fn(out[idx], level[idx]).to(out.dtype)
        out = result
    return out


def reference_cutout(images, size, generator):
    n, _, h, w = images.shape
    side = cutout_size(size, h, w)
    device = images.device
    cy = rng.randint(h, n, device, generator)
    cx = rng.randint(w, n, device, generator)
    if side <= 0:
        return images
    top = (cy - side // 2)[:, None]
    left = (cx - side // 2)[:, None]
    ys = torch.arange(h, device=device)[None, :]
    xs = torch.arange(w, device=device)[None, :]
    in_rows = (ys >= top) & (ys < top + side)
    in_cols = (xs >= left) & (xs < left + side)
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    return images.masked_fill(mask, 0.5)


def reference_affine(x, matrix, shift):
    n, c, h, w = x.shape
    half = torch.tensor((w / 2.0, h / 2.0), dtype=matrix.dtype)
    theta_lin = matrix * half[None, None, :] / half[None, :, None]
    theta = torch.cat([theta_lin, (shift / half)[:, :, None]], dim=2).to(x.dtype)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)
    size = torch.tensor((float(w), float(h)), dtype=grid.dtype)
    src = torch.round(((grid + 1.0) * size - 1.0) / 2.0)
    inside = ((src >= 0) & (src <= size - 1)).all(dim=-1)
    return torch.where(inside[:, None], out, torch.full_like(out, 0.5))


def reference_strong(images, aug, generator):
    out = reference_rand_augment(
        images, aug.ops, aug.num_ops, aug.max_magnitude, aug.op_prob, generator
    )
    if aug.cutout:
        out = reference_cutout(out, aug.cutout, generator)
    return out


def batch(shape, dtype, seed, layout):
    """Values in [0, 1] plus -0 (a copy must keep its sign bit)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    if x.numel():
        x.view(-1)[0] = -0.0
    x = x.to(dtype)
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider batch
        wide = torch.zeros(*shape[:3], 2 * shape[3], dtype=dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def assert_same(new, old, gen_new, gen_old):
    assert new.shape == old.shape and new.dtype == old.dtype
    assert new.stride() == old.stride()

    def raw(t):
        return t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)

    assert torch.equal(raw(new), raw(old))
    assert torch.equal(gen_new.get_state(), gen_old.get_state())


SHAPES = [(450, 1, 8, 8), (64, 3, 32, 32), (9, 3, 20, 28), (7, 1, 9, 5), (3, 3, 1, 1), (0, 3, 4, 4)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strong_augment_same_bits(shape, dtype, layout):
    x = batch(shape, dtype, 1, layout)
    settings = [
        dict(cutout=16),
        dict(cutout=3),
        dict(cutout=0.5, num_ops=3, op_prob=1.0),
        dict(cutout=0, num_ops=2),
        dict(cutout=100, num_ops=0),
        dict(cutout=1, num_ops=1, ops=("Invert", "Identity", "Rotate")),
    ]
    for seed, kwargs in enumerate(settings):
        aug = StrongAugment(**kwargs)
        g_new, g_old = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        try:
            old = reference_strong(x, aug, g_old)
        except NotImplementedError as error:  # an op without a kernel for this dtype: same error
            with pytest.raises(NotImplementedError, match=str(error)):
                aug(x, g_new)
            continue
        assert_same(aug(x, g_new), old, g_new, g_old)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_ops", [0, 1, 2, 4])
def test_rand_augment_same_bits_and_leaves_input_alone(shape, layout, num_ops):
    x = batch(shape, torch.float32, 2, layout)
    before = x.clone()
    g_new, g_old = torch.Generator().manual_seed(num_ops), torch.Generator().manual_seed(num_ops)
    new = rand_augment(x, RANDAUGMENT_OPS, num_ops, 10.0, 0.7, g_new)
    old = reference_rand_augment(x, RANDAUGMENT_OPS, num_ops, 10.0, 0.7, g_old)
    assert_same(new, old, g_new, g_old)
    assert torch.equal(x, before)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [0, 1, 2, 3, 16, 0.5, 100])
def test_cutout_same_bits_and_leaves_input_alone(shape, dtype, layout, size):
    x = batch(shape, dtype, 3, layout)
    before = x.clone()
    for seed in range(3):
        g_new, g_old = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert_same(cutout(x, size, g_new), reference_cutout(x, size, g_old), g_new, g_old)
    assert torch.equal(x, before)


GEOMETRIC = ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"]


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] > 0 and s[2] > 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_geometric_ops_same_bits(shape, dtype, layout, monkeypatch):
    """Levels up to +-40 (beyond the 0..10 scale), so that much of each image is uncovered."""
    x = batch(shape, dtype, 4, layout)
    level = torch.linspace(-40.0, 40.0, shape[0])
    for name in GEOMETRIC:
        new = OPS[name](x, level)
        with monkeypatch.context() as patch:
            patch.setattr(ops, "_affine", reference_affine)
            old = OPS[name](x, level)
        gen = torch.Generator()
        assert_same(new, old, gen, gen)
