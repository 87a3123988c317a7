"""Augmentation, second mutation audit: what test_augment.py left open. The op table maps each
name to the op it names, magnitude-only ops ignore the level's sign, edge cases of the ops (tiny
images, off-grid values, levels beyond 10), RandAugment against a per-image reference loop with the
documented draw order, StrongAugment = RandAugment then cutout on one generator, the documented
defaults, the weak crop offsets, and the option checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_augment import gen, images

from metapl.augment import (
    OPS,
    RANDAUGMENT_OPS,
    StrongAugment,
    WeakAugment,
    cutout,
    flip_and_crop,
    rand_augment,
)
from metapl.augment import ops as O
from metapl.errors import ConfigError

# --- the op table -------------------------------------------------------------------------------


def test_randaugment_ops_are_the_fourteen_of_the_paper():
    """Cubuk et al. (2019): 14 ops; Invert is available but not part of the default list."""
    assert sorted(RANDAUGMENT_OPS) == sorted(
        ["Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize",
         "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY"]
    )  # fmt: skip
    assert len(set(RANDAUGMENT_OPS)) == 14 and "Invert" in OPS


def test_geometric_op_names_do_what_they_name():
    """Through the table, as rand_augment calls them: Rotate (level 30 = 90 degrees) is rot90,
    TranslateX/Y shift along the width/height, ShearX keeps every pixel in its row, ShearY in its
    column."""
    x = images((2, 1, 32, 32))
    ten = torch.full((2,), 10.0)
    assert torch.equal(OPS["Rotate"](x, torch.full((2,), 30.0)), torch.rot90(x, 1, dims=(2, 3)))
    assert torch.equal(OPS["TranslateX"](x, ten)[..., :22], x[..., 10:])
    assert torch.equal(OPS["TranslateY"](x, ten)[..., :22, :], x[..., 10:, :])
    idx = torch.arange(32.0) / 64  # values 0 .. 0.48, never the 0.5 fill
    rows = idx[:, None].expand(1, 1, 32, 32).contiguous()
    cols = idx[None, :].expand(1, 1, 32, 32).contiguous()
    for name, same_row_or_col, across in (("ShearX", rows, cols), ("ShearY", cols, rows)):
        y = OPS[name](same_row_or_col, torch.tensor([10.0]))
        assert ((y == same_row_or_col) | (y == 0.5)).all(), name  # nothing leaves its row/col
        assert not torch.equal(OPS[name](across, torch.tensor([10.0])), across), name


@pytest.mark.parametrize(
    "name", ["Identity", "AutoContrast", "Equalize", "Invert", "Solarize", "Posterize"]
)
def test_ops_without_a_direction_ignore_the_sign_of_the_level(name):
    """rand_augment draws signed levels; ops without a direction use |level|, so a negative level
    is as strong as the positive one (not a no-op)."""
    x = images((4, 3, 16, 16))
    level = torch.tensor([3.0, 5.0, 7.5, 10.0])
    torch.testing.assert_close(OPS[name](x, -level), OPS[name](x, level), rtol=0, atol=0)
    if name in ("Solarize", "Posterize"):
        assert not torch.equal(OPS[name](x, -level), x)


# --- op edge cases ------------------------------------------------------------------------------


def test_posterize_bits_round_to_nearest_and_stay_at_least_one():
    """bits = round(8 - 4 * |level| / 10): level 3 -> 6.8 -> 7 bits, level 1 -> 7.6 -> 8 bits (the
    identity); beyond level 10 the bits stop at 1 (level 30: 8 - 12 -> 1 bit)."""
    x = images((2, 3, 16, 16))
    q = (x * 255).round()
    torch.testing.assert_close(
        O.posterize(x, torch.full((2,), 3.0)), torch.floor(q / 2) * 2 / 255, rtol=0, atol=1e-6
    )
    assert torch.equal(O.posterize(x, torch.full((2,), 1.0)), x)
    one_bit = O.posterize(x, torch.full((2,), 30.0))
    torch.testing.assert_close(one_bit, (q >= 128).float() * 128 / 255, rtol=0, atol=1e-6)


def test_level_zero_is_the_identity_also_off_the_uint8_grid():
    x = images((3, 3, 16, 16), uint8_grid=False)
    for name in ("Posterize", "Solarize", "Brightness", "Contrast", "Color", "Sharpness"):
        torch.testing.assert_close(OPS[name](x, torch.zeros(3)), x, rtol=0, atol=1e-6)


def test_histogram_ops_quantize_to_the_nearest_uint8_level():
    """Off-grid values are read as the nearest uint8 level (as PIL would store them), so moving
    every pixel by less than half a level does not change Equalize or Posterize."""
    x = images((2, 3, 64, 64)).clamp(min=1 / 255)  # 4096 px: Equalize's step is >= 16
    nudged = x - 0.4 / 255
    for name, level in (("Equalize", 0.0), ("Posterize", 10.0)):
        lv = torch.full((2,), level)
        torch.testing.assert_close(OPS[name](nudged, lv), OPS[name](x, lv), rtol=0, atol=1e-6)


def test_enhancement_factor_never_goes_below_zero():
    """Beyond level -11.1 the factor 1 + 0.9 * level / 10 would turn negative; it stops at 0, the
    fully degenerate image: Contrast gives the flat mean luma, Color the grayscale image."""
    x = images((2, 3, 8, 8))
    far = torch.full((2,), -20.0)
    mean = O._grayscale(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    torch.testing.assert_close(O.contrast(x, far), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(O.color(x, far), O._grayscale(x).expand_as(x), rtol=0, atol=1e-6)


def test_contrast_of_other_channel_counts_uses_the_mean_of_all_channels():
    """Luma weights are for RGB; any other channel count (here 2) takes the plain channel mean."""
    x = images((2, 2, 8, 8))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    want = mean + 0.1 * (x - mean)  # level -10: factor 0.1
    torch.testing.assert_close(O.contrast(x, torch.full((2,), -10.0)), want, rtol=0, atol=1e-6)


def test_sharpness_leaves_images_smaller_than_its_kernel_alone():
    x = images((3, 3, 2, 5))
    assert torch.equal(O.sharpness(x, torch.full((3,), 10.0)), x)


@pytest.mark.parametrize("channels", [1, 3])
def test_sharpness_of_an_image_is_the_same_to_the_bit_in_any_batch(channels):
    """Under torchrun each rank sharpens its share of the global batch's images, which must come
    out as in one process (a 1-channel convolution rounded by batch size); and the smoothing is
    PIL's SMOOTH kernel (8 neighbors 1, center 5, / 13) inside the border, none on it."""
    x = (images((20, channels, 9, 7)) * 255).round() / 255
    level = torch.linspace(-10, 10, 20)
    whole = O.sharpness(x, level)
    for rows in (slice(0, 1), slice(3, 13), slice(19, 20)):
        assert torch.equal(O.sharpness(x[rows], level[rows]), whole[rows])
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=torch.float64) / 13
    smooth = x.double().clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(
        x.double(), kernel.expand(channels, 1, 3, 3), groups=channels
    )
    factor = (1 + 0.9 * level / 10).view(-1, 1, 1, 1).double()
    want = (smooth + factor * (x.double() - smooth)).clamp(0, 1)
    torch.testing.assert_close(whole.double(), want, rtol=0, atol=1e-6)


# --- RandAugment and StrongAugment against references -------------------------------------------


def _reference_rand_augment(x, ops, num_ops, max_magnitude, op_prob, g):
    """One image at a time, with the documented draw order: per layer, op index, apply flag,
    magnitude, sign (each a batch-sized draw)."""
    n, out = len(x), x.clone()
    for _ in range(num_ops):
        choice = torch.randint(len(ops), (n,), generator=g)
        applied = torch.rand(n, generator=g) < op_prob
        level = torch.rand(n, generator=g) * max_magnitude
        level = torch.where(torch.rand(n, generator=g) < 0.5, -level, level)
        nxt = out.clone()
        for i in range(n):
            if applied[i]:
                nxt[i] = OPS[ops[choice[i]]](out[i : i + 1], level[i : i + 1])[0]
        out = nxt
    return out


def test_rand_augment_matches_a_per_image_reference():
    """Each image gets its own op *and its own level*, layers compose, and the draws follow the
    documented order (so a seed always gives the same batch)."""
    x = images((40, 3, 12, 12))
    ops = (*RANDAUGMENT_OPS, "Invert")
    got = rand_augment(x, ops, num_ops=2, max_magnitude=9.0, op_prob=0.7, generator=gen(5))
    want = _reference_rand_augment(x, ops, 2, 9.0, 0.7, gen(5))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_strong_augment_is_rand_augment_then_cutout_on_one_generator():
    """Cutout comes last (its square is plain 0.5 gray, not transformed by an op), drawn from the
    same generator after RandAugment's draws."""
    x = images((16, 3, 16, 16))
    got = StrongAugment(num_ops=2, max_magnitude=6.0, cutout=6, op_prob=0.8)(x, gen(2))
    g = gen(2)
    want = cutout(rand_augment(x, RANDAUGMENT_OPS, 2, 6.0, 0.8, g), 6, g)
    assert torch.equal(got, want)
    # Brightness of a 0.5-gray square is never 0.5 again: the square shows only if it is last.
    ones = torch.ones(64, 1, 8, 8)
    y = StrongAugment(num_ops=1, cutout=4, op_prob=1.0, ops=("Brightness",))(ones, gen())
    assert ((y == 0.5).sum(dim=(1, 2, 3)) >= 4).all()


def test_documented_defaults():
    """StrongAugment(): 2 ops, magnitude 10, op probability 0.5 (UDA's policies), 16 px cutout, the
    14 ops; WeakAugment(): 4 px reflect padding, flip with probability 0.5 (the data pipeline
    relies on the defaults it does not pass)."""
    x = images((32, 3, 32, 32))
    g = gen(4)
    want = cutout(rand_augment(x, RANDAUGMENT_OPS, 2, 10.0, 0.5, g), 16, g)
    assert torch.equal(StrongAugment()(x, gen(4)), want)
    assert torch.equal(WeakAugment()(x, gen(4)), flip_and_crop(x, 4, 0.5, "reflect", gen(4)))
    # op_prob 0.5: one Invert layer inverts about half of the images.
    x = images((2000, 1, 2, 2))
    y = StrongAugment(num_ops=1, cutout=0, ops=("Invert",))(x, gen())
    assert 0.45 < (y == 1 - x).flatten(1).all(1).float().mean() < 0.55


# --- weak crop offsets and cutout placement -----------------------------------------------------


def test_weak_crop_offsets_cover_all_of_zero_to_two_pad():
    """pad 1 on a 3x3 image: the (dy, dx) offsets are uniform over {0, 1, 2}^2, the corners of the
    padded image included. An image whose value encodes its position reveals the offset."""
    x = (torch.arange(9.0) / 8).view(1, 1, 3, 3).expand(1800, 1, 3, 3).contiguous()
    y = WeakAugment(pad=1, flip_prob=0.0, padding_mode="constant")(x, gen())
    # The crop's center pixel is the padded image's (dy + 1, dx + 1) = image (dy, dx).
    center = (y[:, 0, 1, 1] * 8).round().long()
    counts = torch.bincount(center, minlength=9)
    assert counts.min() > 150 and counts.max() < 250  # 200 expected each


def test_cutout_square_of_one_pixel_lands_anywhere():
    """Side 1: exactly one gray pixel per image, at a center uniform over every pixel."""
    y = cutout(torch.zeros(2000, 1, 4, 5), 1, gen())[:, 0] == 0.5
    assert (y.sum(dim=(1, 2)) == 1).all()
    counts = y.sum(0).flatten()
    assert counts.min() > 60 and counts.max() < 140  # 100 expected at each of the 20 pixels


# --- option checks ------------------------------------------------------------------------------


def test_option_checks_and_their_boundaries():
    with pytest.raises(ConfigError, match="padding_mode"):
        WeakAugment(padding_mode="wrap")
    for p in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="flip_prob"):
            WeakAugment(flip_prob=p)
    with pytest.raises(ValueError, match="N, C, H, W"):
        WeakAugment()(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="N, C, H, W"):
        StrongAugment()(torch.zeros(3, 8, 8))
    # The ends of every range are allowed: a zero magnitude, probability or count is a no-op.
    WeakAugment(pad=0, flip_prob=1.0)
    x = images((4, 3, 8, 8))
    for kw in ({"op_prob": 0.0}, {"num_ops": 0}):
        assert torch.equal(StrongAugment(cutout=0, **kw)(x, gen()), x)
    y = StrongAugment(max_magnitude=0.0, cutout=0, ops=("Rotate", "Brightness"))(x, gen())
    assert torch.equal(y, x)


class _IndexDevices(torch.overrides.TorchFunctionMode):
    """Records (indexed tensor's device, index's device) of every tensor-indexed get and set,
    by indexing or by index_select / index_copy_ along a dimension."""

    def __init__(self):
        super().__init__()
        self.pairs: set[tuple[str, str]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            if isinstance(args[1], torch.Tensor):
                self.pairs.add((args[0].device.type, args[1].device.type))
        if func in (torch.Tensor.index_select, torch.Tensor.index_copy_):
            self.pairs.add((args[0].device.type, args[2].device.type))
        return func(*args, **(kwargs or {}))


def test_rand_augment_indexes_the_images_with_indices_on_their_device():
    """The policy is drawn and sorted where the generator lives (the CPU), and its order and
    levels then copied to the images' device: indexing a GPU batch by CPU indices would copy them
    from pageable memory, with a wait for the GPU, at each op. Seen on the meta device."""
    x = torch.rand(16, 3, 8, 8, device="meta")
    with _IndexDevices() as seen:
        out = rand_augment(x, num_ops=2, op_prob=1.0, generator=gen())
    assert out.device.type == "meta"
    assert seen.pairs == {("meta", "meta")}


def test_images_on_another_device_use_the_generators_draws():
    """A CPU generator draws the policy for images on any device (a run's generator is kept in its
    checkpoint): drawing on the images' device instead would leave it unread, so the next batch
    would repeat this one's policy. Seen on the meta device: the generator moves on as for CPU
    images."""
    on_cpu, elsewhere = gen(4), gen(4)
    StrongAugment(cutout=4)(images((6, 3, 8, 8)), on_cpu)
    StrongAugment(cutout=4)(torch.rand(6, 3, 8, 8, device="meta"), elsewhere)
    assert not torch.equal(on_cpu.get_state(), gen(4).get_state())
    assert torch.equal(elsewhere.get_state(), on_cpu.get_state())


def test_strong_augment_without_ops_leaves_the_callers_batch_alone():
    """num_ops=0: RandAugment returns the caller's batch itself, so cutout must copy it, not write
    its gray square into the caller's images."""
    x = images((4, 3, 16, 16))
    before = x.clone()
    out = StrongAugment(num_ops=0, cutout=8)(x, gen(1))
    assert torch.equal(x, before)
    assert out is not x and (out == 0.5).any()
