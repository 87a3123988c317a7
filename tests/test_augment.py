"""Augmentation: shapes and ranges, per-op semantics (identity at magnitude 0, the expected effect at
high magnitude, agreement with PIL on uint8 images), per-image policies and reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metapl.augment import OPS, RANDAUGMENT_OPS, StrongAugment, WeakAugment, cutout, rand_augment
from metapl.augment import ops as O
from metapl.errors import ConfigError

SHAPES = [(4, 3, 32, 32), (1, 3, 32, 32), (5, 1, 8, 8), (3, 3, 20, 28)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(shape=(4, 3, 32, 32), seed=0, uint8_grid=True) -> torch.Tensor:
    x = torch.rand(shape, generator=gen(seed))
    return (x * 255).round() / 255 if uint8_grid else x


def distinct(batch: torch.Tensor) -> int:
    return len({tuple(img.flatten().tolist()) for img in batch})


# --- both policies ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("policy", [WeakAugment(pad=2), StrongAugment(cutout=0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_device_and_range(policy, shape, dtype):
    x = images(shape).to(dtype)
    y = policy(x, gen())
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("policy", [WeakAugment(), StrongAugment()])
def test_reproducible_from_generator(policy):
    x = images((16, 3, 32, 32))
    assert torch.equal(policy(x, gen(7)), policy(x, gen(7)))
    assert not torch.equal(policy(x, gen(7)), policy(x, gen(8)))


@pytest.mark.parametrize("name", sorted(OPS))
def test_ops_accept_channels_last(name):
    x = images((4, 3, 16, 16))
    level = torch.tensor([-7.0, -2.0, 3.0, 9.0])
    y = OPS[name](x.to(memory_format=torch.channels_last), level)
    torch.testing.assert_close(y, OPS[name](x, level))


def test_policies_accept_channels_last():
    x = images((8, 3, 32, 32))
    for policy in (WeakAugment(), StrongAugment()):
        y = policy(x.to(memory_format=torch.channels_last), gen())
        torch.testing.assert_close(y, policy(x, gen()))


def test_rejects_non_float_and_bad_options():
    with pytest.raises(TypeError):
        WeakAugment()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="Rotate"):
        StrongAugment(ops=("Rotate", "Warp"))
    with pytest.raises(ConfigError, match="^pad must be >= 0, got -1"):
        WeakAugment(pad=-1)


# --- weak ---------------------------------------------------------------------------------------


def test_weak_without_pad_or_flip_is_identity():
    x = images()
    assert torch.equal(WeakAugment(pad=0, flip_prob=0.0)(x, gen()), x)


def test_weak_flip_only_mirrors():
    x = images()
    assert torch.equal(WeakAugment(pad=0, flip_prob=1.0)(x, gen()), x.flip(3))


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_weak_crop_is_a_window_of_the_padded_image(mode):
    pad, x = 3, images((12, 1, 8, 8))
    y = WeakAugment(pad=pad, flip_prob=0.0, padding_mode=mode)(x, gen())
    padded = torch.nn.functional.pad(
        x, (pad,) * 4, mode=mode, value=0.5 if mode == "constant" else None
    )
    windows = padded.unfold(2, 8, 1).unfold(3, 8, 1)  # [N, C, 2p+1, 2p+1, 8, 8]
    for i in range(len(x)):
        match = (windows[i] == y[i][:, None, None]).flatten(3).all(-1).all(0)
        assert match.any(), f"image {i} is not a crop of its padded version"
    assert distinct(WeakAugment(pad=pad)(x[:1].expand(64, -1, -1, -1), gen())) > 20


# --- ops at magnitude 0 -------------------------------------------------------------------------

IDENTITY_AT_ZERO = [
    "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY",
    "Brightness", "Color", "Contrast", "Sharpness", "Solarize", "Posterize", "Identity",
]  # fmt: skip


@pytest.mark.parametrize("name", IDENTITY_AT_ZERO)
@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 1, 8, 8), (2, 3, 20, 28)])
def test_op_at_magnitude_zero_is_identity(name, shape):
    x = images(shape)
    torch.testing.assert_close(OPS[name](x, torch.zeros(len(x))), x, rtol=0, atol=1e-6)


# --- ops at high magnitude ----------------------------------------------------------------------


def test_rotate_by_90_degrees_is_rot90_counter_clockwise():
    x = images((3, 3, 16, 16))
    ccw = O.rotate(x, torch.full((3,), 30.0))  # level 30 = 3 x 30 degrees
    assert torch.equal(ccw, torch.rot90(x, 1, dims=(2, 3)))
    assert torch.equal(O.rotate(x, torch.full((3,), -30.0)), torch.rot90(x, -1, dims=(2, 3)))
    pattern = torch.zeros(1, 1, 8, 8)
    pattern[..., 0, 7] = 1.0  # top-right pixel goes to the top-left
    assert O.rotate(pattern, torch.tensor([30.0]))[0, 0, 0, 0] == 1.0


def test_rotate_fills_corners_with_gray():
    y = O.rotate(torch.zeros(1, 3, 32, 32), torch.tensor([10.0]))
    assert (y[..., 0, 0] == 0.5).all() and (y[..., 16, 16] == 0.0).all()


def test_translate_moves_content_and_fills_gray():
    x = images((2, 1, 32, 32))
    y = O.translate_x(x, torch.tensor([10.0, 10.0]))  # 10 px
    assert torch.equal(y[..., :, :22], x[..., :, 10:]) and (y[..., :, 22:] == 0.5).all()
    y = O.translate_y(x, torch.tensor([-10.0, -10.0]))
    assert torch.equal(y[..., 10:, :], x[..., :22, :]) and (y[..., :10, :] == 0.5).all()


def test_shear_keeps_center_row_and_moves_the_others():
    x = images((1, 1, 32, 32))
    y = O.shear_x(x, torch.tensor([10.0]))
    assert not torch.equal(y, x)
    torch.testing.assert_close(y[..., 16, 8:24], x[..., 16, 8:24])


def test_solarize_inverts_pixels_above_threshold():
    x = images()
    y = O.solarize(x, torch.full((4,), 5.0))  # threshold 128 of 256
    high = x * 255 >= 128
    assert torch.equal(y[high], 1 - x[high]) and torch.equal(y[~high], x[~high])
    torch.testing.assert_close(O.solarize(x, torch.full((4,), 10.0)), 1 - x)


def test_posterize_reduces_levels():
    x = images()
    y = O.posterize(x, torch.full((4,), 10.0))  # 4 bits
    assert len(torch.unique(y)) <= 16 < len(torch.unique(x))
    assert torch.equal((y * 255).round() % 16, torch.zeros_like(y))


def test_equalize_flattens_a_low_contrast_histogram():
    x = 0.4 + 0.2 * images((2, 3, 32, 32))  # values in [0.4, 0.6]
    x = (x * 255).round() / 255
    y = O.equalize(x, torch.zeros(2))
    assert y.amin() <= 0.05 and y.amax() >= 0.95
    assert y.std() > 3 * x.std()
    # Roughly uniform, except that PIL's integer step (here floor(1004 / 255) = 3 pixels per level)
    # saturates the top of the lookup table at 255, which piles pixels into the last bin.
    hist = torch.histc(y[0, 0], bins=8, min=0, max=1)[:-1]
    assert hist.max() / hist.min() < 1.6


def test_auto_contrast_stretches_each_channel_to_unit_range():
    x = 0.3 + 0.3 * images()
    y = O.auto_contrast(x, torch.zeros(4))
    assert torch.allclose(y.amin(dim=(2, 3)), torch.zeros(4, 3), atol=1e-6)
    assert torch.allclose(y.amax(dim=(2, 3)), torch.ones(4, 3), atol=1e-6)
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.equal(O.auto_contrast(flat, torch.zeros(1)), flat)


def test_enhancements_at_high_magnitude():
    x = images()
    lo = torch.full((4,), -10.0)  # factor 0.1
    torch.testing.assert_close(O.brightness(x, lo), 0.1 * x)
    gray = O._grayscale(x)
    assert (O.color(x, lo) - gray).abs().max() < (x - gray).abs().max() * 0.11
    assert O.contrast(x, lo).std() < 0.11 * x.std() + 1e-6
    assert (O.sharpness(x, torch.full((4,), 10.0)) - x).abs().max() > 0.05


def test_color_is_identity_for_one_channel():
    x = images((3, 1, 8, 8))
    assert torch.equal(O.color(x, torch.full((3,), 10.0)), x)


def test_cutout_fills_one_square_with_gray():
    x = torch.zeros(64, 3, 32, 32)
    y = cutout(x, 16, gen())
    gray = (y == 0.5).all(dim=1)  # [N, H, W]
    sizes = gray.sum(dim=(1, 2))
    assert (sizes >= 1).all() and (sizes <= 256).all() and (sizes == 256).any()
    rows, cols = gray.any(dim=2), gray.any(dim=1)
    assert (rows.sum(1) * cols.sum(1) == sizes).all()  # a (clipped) rectangle
    assert torch.equal(cutout(x, 0, gen()), x)


PIL_OPS = [
    ("Equalize", lambda im, lv: __import__("PIL.ImageOps").ImageOps.equalize(im), 0.0),
    ("AutoContrast", lambda im, lv: __import__("PIL.ImageOps").ImageOps.autocontrast(im), 0.0),
    ("Solarize", lambda im, lv: __import__("PIL.ImageOps").ImageOps.solarize(im, 77), 7.0),
    ("Posterize", lambda im, lv: __import__("PIL.ImageOps").ImageOps.posterize(im, 5), 7.5),
]


@pytest.mark.parametrize("name, pil_op, level", PIL_OPS, ids=[p[0] for p in PIL_OPS])
def test_histogram_ops_match_pil_on_uint8_images(name, pil_op, level):
    Image = pytest.importorskip("PIL.Image")
    x = 0.2 + 0.5 * images((3, 3, 16, 16), uint8_grid=False)
    x = (x * 255).round() / 255
    expected = []
    for img in x:
        arr = (img.permute(1, 2, 0) * 255).round().byte().numpy()
        out = np.asarray(pil_op(Image.fromarray(arr), level))
        expected.append(torch.from_numpy(out.copy()).permute(2, 0, 1).float() / 255)
    # Solarize level 7: threshold 256 * 0.3 = 76.8, so pixels >= 77 flip, as PIL's threshold 77.
    y = OPS[name](x, torch.full((3,), level))
    torch.testing.assert_close(y, torch.stack(expected), rtol=0, atol=1.5 / 255)


# --- per-image RandAugment ----------------------------------------------------------------------


def test_strong_uses_a_different_policy_per_image():
    """One batch of 64 copies of an image gives many different results, without cutout: the ops
    and magnitudes are drawn per image (a per-batch policy would give one or two results)."""
    x = images((1, 3, 32, 32)).expand(64, -1, -1, -1).contiguous()
    y = StrongAugment(cutout=0, op_prob=1.0)(x, gen())
    assert distinct(y) > 40
    assert distinct(StrongAugment()(x, gen())) > 56


def test_strong_works_on_grayscale_digits():
    x = images((64, 1, 8, 8))
    y = StrongAugment(cutout=4)(x, gen())
    assert y.shape == x.shape and distinct(y) > 32


def test_every_op_runs_through_rand_augment():
    x = images((8, 3, 12, 12))
    for name in (*RANDAUGMENT_OPS, "Invert"):
        y = rand_augment(x, ops=(name,), num_ops=1, op_prob=1.0, generator=gen())
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1, name


def test_no_ops_is_identity():
    x = images()
    assert torch.equal(rand_augment(x, num_ops=0, generator=gen()), x)
    assert torch.equal(rand_augment(x, op_prob=0.0, generator=gen()), x)


# --- ops against their definitions and PIL (mutation audit) -------------------------------------


def _pil_apply(x: torch.Tensor, fn) -> torch.Tensor:
    Image = pytest.importorskip("PIL.Image")
    out = []
    for img in x:
        arr = (img.permute(1, 2, 0) * 255).round().byte().numpy()
        res = np.asarray(fn(Image.fromarray(arr)))
        out.append(torch.from_numpy(res.copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


@pytest.mark.parametrize("name", ["Color", "Contrast", "Brightness", "Sharpness"])
@pytest.mark.parametrize("level", [7.0, -7.0])
def test_enhancements_match_pil_image_enhance(name, level):
    """Color/Contrast/Brightness/Sharpness are PIL's ImageEnhance at factor 1 + 0.9 * level / 10:
    this pins the luma weights (R, G, B = .299, .587, .114), Contrast's single gray mean, and
    PIL's SMOOTH kernel with unsmoothed borders. Channels are given different ranges so an RGB/BGR
    swap or a per-channel mean would show. (PIL rounds its intermediates: ~1.3 levels apart.)"""
    ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
    x = torch.rand(3, 3, 16, 16, generator=gen(0))
    x[:, 0] *= 0.3
    x[:, 2] = 0.6 + 0.4 * x[:, 2]
    x = (x * 255).round() / 255
    factor = 1 + 0.9 * level / 10
    expected = _pil_apply(x, lambda im: getattr(ImageEnhance, name)(im).enhance(factor))
    y = OPS[name](x, torch.full((3,), level))
    torch.testing.assert_close(y, expected, rtol=0, atol=2 / 255)


def test_equalize_matches_pil_exactly():
    """Equalize works on the uint8 grid with PIL's integer lookup table (including its rounding
    offset step // 2), so it agrees with ImageOps.equalize to the last level."""
    ImageOps = pytest.importorskip("PIL.ImageOps")
    x = 0.2 + 0.5 * images((2, 3, 64, 64), uint8_grid=False)  # 4096 px: PIL's step is 16
    x = (x * 255).round() / 255
    y = O.equalize(x, torch.zeros(2))
    torch.testing.assert_close(y, _pil_apply(x, ImageOps.equalize), rtol=0, atol=1e-6)


def test_shear_displacement_is_point_three_times_the_distance_from_the_center():
    """Level 10: output (x, y) reads input (x + 0.3 * y, y) for ShearX and (x, y + 0.3 * x) for
    ShearY, with x, y measured from the image center (pixel centers at index + 0.5)."""
    h = w = 32
    idx = torch.arange(w, dtype=torch.float32)
    s = 0.3
    cols = (idx / (w - 1)).expand(1, 1, h, w).contiguous()  # pixel value encodes its column
    y = O.shear_x(cols, torch.tensor([10.0]))[0, 0]
    expected = idx[None, :] + s * (idx[:, None] + 0.5 - h / 2)  # [row, col] -> source column
    inside = (expected >= 0) & (expected <= w - 1)
    decoded = (y * (w - 1)).round()
    assert ((decoded - expected).abs()[inside] <= 0.5 + 1e-4).all()

    rows = (idx / (h - 1))[:, None].expand(1, 1, h, w).contiguous()  # value encodes its row
    y = O.shear_y(rows, torch.tensor([-10.0]))[0, 0]
    expected = idx[:, None] - s * (idx[None, :] + 0.5 - w / 2)  # [row, col] -> source row
    inside = (expected >= 0) & (expected <= h - 1)
    decoded = (y * (h - 1)).round()
    assert ((decoded - expected).abs()[inside] <= 0.5 + 1e-4).all()


def test_geometric_ops_on_non_square_images():
    """Translate uses the image's own height/width, and rotation is rigid in pixel units on a
    non-square image: the central square of a 90-degree rotation is rot90 of the input's."""
    x = images((2, 1, 16, 32))
    y = O.translate_y(x, torch.tensor([10.0, 10.0]))  # 10/32 of the height 16 = 5 px
    assert torch.equal(y[..., :11, :], x[..., 5:, :]) and (y[..., 11:, :] == 0.5).all()
    y = O.translate_x(x, torch.tensor([-10.0, -10.0]))  # 10/32 of the width 32 = 10 px
    assert torch.equal(y[..., :, 10:], x[..., :, :22]) and (y[..., :, :10] == 0.5).all()

    x = images((2, 3, 16, 24))
    r = O.rotate(x, torch.full((2,), 30.0))  # 90 degrees counter-clockwise
    assert torch.equal(r[..., :, 4:20], torch.rot90(x[..., :, 4:20], 1, dims=(2, 3)))
    assert (r[..., :, :4] == 0.5).all() and (r[..., :, 20:] == 0.5).all()


# --- per-image RandAugment draws (mutation audit) -----------------------------------------------


def test_rand_augment_levels_are_uniform_signed_up_to_max_magnitude():
    """Each applied op gets a level uniform in [-max, max] (magnitude U[0, max], random sign).
    Brightness on a 0.5-gray image reveals it: out = 0.5 * (1 + 0.9 * level / 10)."""
    x = torch.full((4000, 1, 2, 2), 0.5)
    y = rand_augment(x, ops=("Brightness",), num_ops=1, op_prob=1.0, generator=gen())
    level = (y[:, 0, 0, 0] / 0.5 - 1) * 10 / 0.9
    assert level.abs().max() <= 10 + 1e-4 and level.abs().max() > 9.5
    assert 0.45 < (level < 0).float().mean() < 0.55  # both signs
    assert abs(level.abs().mean().item() - 5.0) < 0.3  # |level| ~ U[0, 10]
    y = StrongAugment(num_ops=1, max_magnitude=4, cutout=0, op_prob=1.0, ops=("Brightness",))(
        x, gen()
    )
    level = (y[:, 0, 0, 0] / 0.5 - 1) * 10 / 0.9
    assert level.abs().max() <= 4 + 1e-4 and level.abs().max() > 3.8


def test_rand_augment_draws_every_op_of_the_list():
    """The op is uniform over the whole list: with (Identity, Invert) about half of the images
    are inverted (not none: the last op of the list must be reachable)."""
    x = images((2000, 1, 2, 2))
    y = rand_augment(x, ops=("Identity", "Invert"), num_ops=1, op_prob=1.0, generator=gen())
    inverted = (y == 1 - x).flatten(1).all(1).float().mean()
    kept = (y == x).flatten(1).all(1).float().mean()
    assert 0.45 < inverted < 0.55 and 0.45 < kept < 0.55


@pytest.mark.parametrize("num_ops, inverted", [(1, True), (2, False), (3, True)])
def test_rand_augment_layers_compose(num_ops, inverted):
    """Each layer acts on the previous layer's output, ``num_ops`` times: Invert twice is the
    identity, three times is Invert."""
    x = images((8, 3, 4, 4))
    y = rand_augment(x, ops=("Invert",), num_ops=num_ops, op_prob=1.0, generator=gen())
    torch.testing.assert_close(y, 1 - x if inverted else x, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{"op_prob": 1.5}, {"op_prob": -0.1}, {"cutout": -1}, {"max_magnitude": -1.0},
     {"num_ops": -1}, {"ops": ()}],
    ids=["op_prob_high", "op_prob_low", "cutout", "max_magnitude", "num_ops", "no_ops"],
)  # fmt: skip
def test_strong_rejects_bad_options(kwargs):
    (name,) = kwargs
    with pytest.raises(ConfigError, match="needs at least one op" if name == "ops" else f"^{name}"):
        StrongAugment(**kwargs)


# --- cutout placement (mutation audit) ----------------------------------------------------------


def test_cutout_size_in_pixels_or_fraction_of_the_shorter_side():
    from metapl.augment.cutout import cutout_size

    assert cutout_size(16, 32, 32) == 16
    assert cutout_size(0.5, 20, 28) == 10  # the shorter side
    assert cutout_size(0.3, 32, 32) == 10  # 9.6 rounds to 10
    y = cutout(torch.zeros(200, 1, 20, 28), 0.5, gen())
    assert (y == 0.5).sum(dim=(1, 2, 3)).max() == 100


def test_cutout_center_is_uniform_over_the_whole_image():
    """The square's center is uniform over all pixels, so squares are clipped at all four
    borders alike: on a 32 x 40 image with side 16, the square reaches the top row iff
    cy <= 8 (9/32), the bottom row iff cy >= 24 (8/32), the left column iff cx <= 8 (9/40), the
    right one iff cx >= 32 (8/40)."""
    n = 4000
    gray = cutout(torch.zeros(n, 1, 32, 40), 16, gen())[:, 0] == 0.5
    top, bottom = gray[:, 0, :].any(1).float().mean(), gray[:, -1, :].any(1).float().mean()
    left, right = gray[:, :, 0].any(1).float().mean(), gray[:, :, -1].any(1).float().mean()
    assert abs(top - 9 / 32) < 0.04 and abs(bottom - 8 / 32) < 0.04
    assert abs(left - 9 / 40) < 0.04 and abs(right - 8 / 40) < 0.04


@pytest.mark.parametrize("name", ["Color", "Contrast", "Sharpness", "Rotate"])
def test_ops_differentiate_after_a_call_under_inference_mode(name):
    """The ops' constant tensors are made once and kept: one first made under
    torch.inference_mode() must not make a later differentiable call fail ("Inference tensors
    cannot be saved for backward")."""
    O._constant.cache_clear()
    x = torch.rand(2, 3, 8, 8)
    level = torch.full((2,), 5.0)
    with torch.inference_mode():
        OPS[name](x, level)
    y = x.clone().requires_grad_()
    OPS[name](y, level).sum().backward()
    assert y.grad is not None and y.grad.shape == y.shape


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_every_op_keeps_the_images_dtype(name, dtype):
    """The ops' cached constants are made per dtype: a smoothing kernel kept in float32 fails
    conv2d on float64 or float16 images."""
    x = images((3, 3, 9, 12)).to(dtype)
    y = OPS[name](x, torch.tensor([-7.0, 4.0, 10.0]))
    assert y.dtype == dtype and y.shape == x.shape


def test_float64_luma_uses_float64_weights():
    x = images((2, 3, 5, 5)).double()
    weights = torch.tensor(O.GRAY_WEIGHTS, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.equal(O._grayscale(x), (x * weights).sum(dim=1, keepdim=True))


@pytest.mark.parametrize("name", list(OPS))
def test_ops_give_the_same_result_when_called_again(name):
    """The ops' constant tensors are cached and shared by every call: none may be changed in
    place (a second call would then see another kernel, weights or image size)."""
    O._constant.cache_clear()
    x = images((2, 3, 9, 12))
    level = torch.tensor([-6.0, 9.0])
    first = OPS[name](x, level)
    assert torch.equal(OPS[name](x, level), first)
    assert torch.equal(OPS[name](x.double(), level), OPS[name](x.double(), level))


def test_constants_are_cached_per_values_dtype_and_device():
    O._constant.cache_clear()
    a = O._constant((1.0, 2.5), torch.float32, torch.device("cpu"))
    assert O._constant((1.0, 2.5), torch.float32, torch.device("cpu")) is a
    b = O._constant((1.0, 2.5), torch.float64, torch.device("cpu"))
    assert b.dtype == torch.float64 and a.dtype == torch.float32
    assert torch.equal(b, torch.tensor([1.0, 2.5], dtype=torch.float64))
    assert torch.equal(O._constant((2.5, 1.0), torch.float32, torch.device("cpu")), a.flip(0))
    assert not a.requires_grad and not a.is_inference()
