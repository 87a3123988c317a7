"""flip_and_crop against a plain reference: pad with F.pad, slice each image's window in a Python
loop, flip it if drawn. The batched version (indices folded for reflect/replicate, one gather) must
give the same bits, draw the same random numbers and leave the generator in the same state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metapl.augment import flip_and_crop, rng


def reference(images, pad, flip_prob, padding_mode, generator):
    """The crop as one would write it image by image; the draws as flip_and_crop makes them."""
    n, c, h, w = images.shape
    flip = rng.bernoulli(flip_prob, n, images.device, generator)
    dy = rng.randint(2 * pad + 1, n, images.device, generator)
    dx = rng.randint(2 * pad + 1, n, images.device, generator)
    padded = images
    if pad > 0:
        value = 0.5 if padding_mode == "constant" else None
        padded = F.pad(images, (pad,) * 4, mode=padding_mode, value=value)
    out = []
    for i in range(n):
        window = padded[i, :, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
        out.append(window.flip(-1) if flip[i] else window)
    return torch.stack(out)


def batch(shape, dtype, seed, layout):
    """Random values plus the ones whose bits a careless copy could change (-0, inf, NaN)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 4 - 2
    flat = x.view(-1)
    specials = torch.tensor([-0.0, float("inf"), -float("inf"), float("nan"), 1e-300])
    flat[: len(specials)] = specials[: len(flat)].to(torch.float64)
    x = x.to(dtype)
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "strided":  # a view every other column of a wider batch
        wide = torch.zeros(*shape[:3], 2 * shape[3], dtype=dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def assert_same_bits(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.is_contiguous()  # as the indexing version returned, whatever the input's layout
    assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))


SHAPES = [(450, 1, 8, 8), (64, 3, 32, 32), (5, 3, 20, 28), (7, 2, 9, 5), (3, 1, 1, 1)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided"]


@pytest.mark.parametrize("mode", ["reflect", "replicate", "constant", "circular"])
@pytest.mark.parametrize("shape", SHAPES)
def test_flip_and_crop_matches_the_per_image_loop_bit_for_bit(mode, shape):
    h, w = shape[2:]
    pads = {0, 1, 4, min(h, w) - 1}  # the last: the widest reflect padding allowed
    if mode in ("reflect", "circular"):  # F.pad's limits: pad < size, pad <= size
        pads = {p for p in pads if p < min(h, w) or (mode == "circular" and p == min(h, w))}
    for pad in sorted(pads):
        for seed, (dtype, layout, flip_prob) in enumerate(
            (d, lay, p) for d in DTYPES for lay in LAYOUTS for p in (0.0, 0.5, 1.0)
        ):
            x = batch(shape, dtype, seed, layout)
            g_new, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            got = flip_and_crop(x, pad, flip_prob, mode, g_new)
            assert_same_bits(got, reference(x, pad, flip_prob, mode, g_ref))
            assert torch.equal(g_new.get_state(), g_ref.get_state())  # same draws, no extra


def test_replicate_padding_wider_than_the_image():
    """Replicate padding, unlike reflect, allows pad >= size: every border pixel is an edge copy."""
    x = batch((6, 3, 3, 2), torch.float32, 0, "contiguous")
    got = flip_and_crop(x, 5, 0.5, "replicate", torch.Generator().manual_seed(1))
    assert_same_bits(got, reference(x, 5, 0.5, "replicate", torch.Generator().manual_seed(1)))


def test_unknown_padding_mode_is_still_refused_by_f_pad():
    with pytest.raises((NotImplementedError, ValueError, RuntimeError)):
        flip_and_crop(torch.rand(2, 3, 8, 8), 2, 0.5, "wrap")
