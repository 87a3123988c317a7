"""The RandAugment image operations, each on a batch with one magnitude per image.

Every op has the signature ``op(images [n, C, H, W], level [n]) -> images``. ``level`` is the
RandAugment magnitude on the usual 0..10 scale, *signed*: ops with a direction (rotate, shear,
translate, and the four enhancements) use its sign, the others use ``|level|``. Level 0 is the
identity for every op that has a magnitude (so "magnitude" reads as "strength"; the TF reference maps
some ops the other way round, e.g. Solarize and Posterize at level 0 there are the strongest).

Magnitude ranges at level 10: those of the RandAugment and AutoAugment papers, with translation
scaled from UDA's 10 px on a 32 px image. (UDA's code differs: integer magnitudes 1-9, Posterize
4 -> 1 bits, Invert and Cutout among its ops, translation in absolute pixels.)
  Rotate          +-30 degrees                     ShearX, ShearY   +-0.3
  TranslateX, -Y  +-10/32 of the width / height    Solarize         threshold 256 -> 0 (all inverted)
  Posterize       8 -> 4 bits                      Color, Contrast, Brightness, Sharpness:
  AutoContrast, Equalize, Invert, Identity: no magnitude.     factor 1 +- 0.9 (0.1 .. 1.9)

Geometric ops are one nearest-neighbour ``grid_sample`` each (as PIL's and TF's defaults), about the
image center, in pixel units so non-square images are not distorted; uncovered pixels are 0.5 gray,
and covered pixels keep their exact values.
Pixel values are floats in [0, 1]; the histogram ops (Equalize, Posterize, Solarize's threshold)
work on the uint8 grid like PIL.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Op = Callable[[Tensor, Tensor], Tensor]

MAX_LEVEL = 10.0
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 10.0 / 32.0  # UDA: 10 px on a 32 px CIFAR image
MAX_ENHANCE = 0.9  # factor in [0.1, 1.9]
MIN_POSTERIZE_BITS = 4
FILL = 0.5
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.tensor(values)`` on ``device``, made once per (values, dtype, device): made from
    Python numbers, a tensor on a GPU is a copy from the host that waits for all the work queued
    there (a host sync), which every RandAugment op that needs one did, at every call. The ops
    never write into it. Made outside inference mode: the tensor outlives the call, and a tensor
    made under ``torch.inference_mode()`` cannot be saved for backward by a later call."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device)


def _per_image(v: Tensor, x: Tensor) -> Tensor:
    """A per-image scalar ``[n]`` shaped to broadcast over ``[n, C, H, W]``."""
    return v.to(x.dtype).view(-1, 1, 1, 1)


def _grayscale(x: Tensor) -> Tensor:
    """``[n, 1, H, W]`` luma; the image itself for one channel, the channel mean for others."""
    if x.shape[1] == 3:
        w = _constant(GRAY_WEIGHTS, x.dtype, x.device).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``ImageEnhance``: factor 0 gives ``degenerate``, 1 the image, above 1 extrapolates."""
    return (degenerate + _per_image(factor, x) * (x - degenerate)).clamp(0.0, 1.0)


def _enhance_factor(level: Tensor) -> Tensor:
    return (1.0 + MAX_ENHANCE * level / MAX_LEVEL).clamp(min=0.0)


def _to_uint8_grid(x: Tensor) -> Tensor:
    return (x * 255.0).round().clamp(0, 255).long()


# --- colour ops ---------------------------------------------------------------------------------


def identity(x: Tensor, level: Tensor) -> Tensor:
    return x


def auto_contrast(x: Tensor, level: Tensor) -> Tensor:
    """Stretch each channel linearly so its minimum becomes 0 and its maximum 1."""
    lo, hi = x.flatten(2).aminmax(dim=2)
    lo, hi = lo[..., None, None], hi[..., None, None]
    flat = hi <= lo  # a constant channel is left alone, as PIL does
    scale = torch.where(flat, torch.ones_like(hi), 1.0 / (hi - lo).clamp(min=1e-12))
    return torch.where(flat, x, ((x - lo) * scale).clamp(0.0, 1.0))


def equalize(x: Tensor, level: Tensor) -> Tensor:
    """PIL's ``ImageOps.equalize`` per channel: map pixel values through the cumulative histogram.

    All ``n * C`` histograms are built by one ``scatter_add_`` (integer counts, so the result does
    not depend on the order of atomic adds on a GPU); the lookup tables by one cumsum.
    """
    n, c, h, w = x.shape
    q = _to_uint8_grid(x).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, q, torch.ones_like(q))
    # PIL: step = (number of pixels - count of the brightest occurring value) // 255.
    last = hist.gather(1, q.amax(dim=1, keepdim=True))
    step = (h * w - last) // 255  # [n*C, 1]
    cum_before = hist.cumsum(dim=1) - hist  # pixels strictly below each value
    lut = ((cum_before + step // 2) // step.clamp(min=1)).clamp(max=255)
    out = lut.gather(1, q).to(x.dtype) / 255.0
    # step == 0 (a nearly constant channel): PIL leaves it unchanged.
    out = torch.where(step > 0, out, x.reshape(n * c, h * w))
    return out.view(n, c, h, w)


def invert(x: Tensor, level: Tensor) -> Tensor:
    return 1.0 - x


def solarize(x: Tensor, level: Tensor) -> Tensor:
    """Invert pixels at or above a threshold that falls from 256 (none) to 0 (all) as |level|
    goes 0 -> 10 (UDA's mapping, on the uint8 scale as PIL's ``ImageOps.solarize``)."""
    threshold = 256.0 * (1.0 - level.abs() / MAX_LEVEL)
    return torch.where(x * 255.0 >= _per_image(threshold, x), 1.0 - x, x)


def posterize(x: Tensor, level: Tensor) -> Tensor:
    """Keep the top ``bits`` bits of each uint8 value; ``bits`` falls from 8 to 4 as |level|
    goes 0 -> 10 (and stays >= 1 for larger magnitudes)."""
    span = 8 - MIN_POSTERIZE_BITS
    bits = (8.0 - span * level.abs() / MAX_LEVEL).round().clamp(1, 8)
    shift = _per_image(torch.pow(2.0, 8.0 - bits), x)
    out = torch.floor(_to_uint8_grid(x).to(x.dtype) / shift) * shift / 255.0
    return torch.where(_per_image(bits, x) >= 8, x, out)


def color(x: Tensor, level: Tensor) -> Tensor:
    """Saturation: blend with the grayscale image. The identity for one channel."""
    if x.shape[1] == 1:
        return x
    return _blend(_grayscale(x), x, _enhance_factor(level))


def contrast(x: Tensor, level: Tensor) -> Tensor:
    """Blend with a flat image at the mean luma."""
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(mean, x, _enhance_factor(level))


def brightness(x: Tensor, level: Tensor) -> Tensor:
    """Blend with black."""
    return _blend(torch.zeros_like(x), x, _enhance_factor(level))


def sharpness(x: Tensor, level: Tensor) -> Tensor:
    """Blend with PIL's smoothed image (its SMOOTH kernel: the 8 neighbors 1, the center 5, / 13;
    border pixels unsmoothed): factor > 1 sharpens.

    The smoothing is 9 shifted slices summed in a fixed order, not a convolution: a convolution's
    rounding depends on the batch it is given (on CPU, a 1-channel batch of 10 and the same
    images in a batch of 20 differed by 6e-8), and under torchrun each rank augments only its share
    of the global batch, which must come out as in one process. Elementwise sums round the same
    whatever the batch; they were also faster than ``conv2d`` on CPU (0.29 vs 0.53 ms for 60
    images of 32x32x3, a throwaway timing)."""
    h, w = x.shape[-2:]
    if h < 3 or w < 3:
        return x
    interior = x[..., 1:-1, 1:-1]
    total = interior * 5.0
    for dy in range(3):
        for dx in range(3):
            if (dy, dx) != (1, 1):
                total = total + x[..., dy : dy + h - 2, dx : dx + w - 2]
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = total / 13.0
    return _blend(smooth, x, _enhance_factor(level))


# --- geometric ops ------------------------------------------------------------------------------


def _affine(x: Tensor, matrix: Tensor, shift: Tensor) -> Tensor:
    """Resample with ``input = matrix @ output + shift`` in pixel units about the image center.

    ``matrix`` is ``[n, 2, 2]`` and ``shift`` ``[n, 2]``, both in (x, y) order with y pointing down.
    ``affine_grid`` works in coordinates normalized to [-1, 1] per axis (align_corners=False:
    pixel offset from the center = normalized * size / 2), so the matrix is conjugated by
    diag(W/2, H/2); that keeps rotations rigid on non-square images.
    """
    n, c, h, w = x.shape
    half = _constant((w / 2.0, h / 2.0), matrix.dtype, x.device)
    theta_lin = matrix * half[None, None, :] / half[None, :, None]
    theta = torch.cat([theta_lin, (shift / half)[:, :, None]], dim=2)
    grid = F.affine_grid(theta.to(_grid_dtype(x)), [n, c, h, w], align_corners=False).to(x.dtype)
    out = F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)
    # Output pixels whose source lies outside the image become gray. The source pixel index is
    # computed as grid_sample does (unnormalize, round half to even); should a rounding tie ever
    # differ from the kernel's, "border" padding makes that pixel an edge copy, never black.
    size = _constant((float(w), float(h)), grid.dtype, x.device)
    last = _constant((float(w - 1), float(h - 1)), grid.dtype, x.device)  # size - 1, exactly
    src = torch.round(((grid + 1.0) * size - 1.0) / 2.0)
    ok = (src >= 0) & (src <= last)  # [n, H, W, 2]
    # x and y both inside, with one & of the two halves rather than a reduction over the last
    # dimension; the gray is a scalar, so no gray batch is allocated for the select.
    inside = ok[..., 0] & ok[..., 1]  # [n, H, W]
    return torch.where(inside[:, None], out, FILL)


def _grid_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``affine_grid`` computes a geometric op's sampling grid in: float64 on a GPU,
    the images' own dtype elsewhere.

    Why: ``affine_grid`` is a matmul, and on a GPU a float32 matmul runs in TF32 when the
    process-wide ``torch.backends.cuda.matmul.allow_tf32`` is on. The exact MPL step turns it off
    around its student passes while the batch-ahead thread (:mod:`metapl.train.batches_ahead`)
    augments the next batch, so with a user's TF32 on, a grid's rounding, and so which pixel a
    nearest-neighbour sample picks, would depend on the two threads' timing. No flag touches a
    float64 matmul; its grid rounded once to the images' dtype is the same in every run. On the
    CPU nothing toggles a flag mid-run, and the grid stays as it was (the published CPU results
    are reproduced to the bit)."""
    return torch.float64 if x.device.type == "cuda" else x.dtype


def _eye(n: int, x: Tensor) -> Tensor:
    return torch.eye(2, dtype=torch.float64, device=x.device).expand(n, 2, 2).clone()


def _zeros2(n: int, x: Tensor) -> Tensor:
    return torch.zeros(n, 2, dtype=torch.float64, device=x.device)


def rotate(x: Tensor, level: Tensor) -> Tensor:
    """Rotate counter-clockwise (as PIL's ``Image.rotate``) by ``30 * level / 10`` degrees."""
    rad = level.to(torch.float64) * (MAX_ROTATE_DEGREES / MAX_LEVEL) * (math.pi / 180.0)
    cos, sin = rad.cos(), rad.sin()
    # Output pixel (x, y) (y down) reads the input at the clockwise-rotated position.
    matrix = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return _affine(x, matrix, _zeros2(len(level), x))


def shear_x(x: Tensor, level: Tensor) -> Tensor:
    """Output (x, y) reads input (x + s * y, y), s = 0.3 * level / 10 (about the center)."""
    matrix = _eye(len(level), x)
    matrix[:, 0, 1] = level.to(torch.float64) * (MAX_SHEAR / MAX_LEVEL)
    return _affine(x, matrix, _zeros2(len(level), x))


def shear_y(x: Tensor, level: Tensor) -> Tensor:
    """Output (x, y) reads input (x, y + s * x), s = 0.3 * level / 10 (about the center)."""
    matrix = _eye(len(level), x)
    matrix[:, 1, 0] = level.to(torch.float64) * (MAX_SHEAR / MAX_LEVEL)
    return _affine(x, matrix, _zeros2(len(level), x))


def translate_x(x: Tensor, level: Tensor) -> Tensor:
    """Shift by ``(10/32) * level / 10`` of the width (content moves left for level > 0, as PIL)."""
    shift = _zeros2(len(level), x)
    shift[:, 0] = level.to(torch.float64) * (MAX_TRANSLATE / MAX_LEVEL) * x.shape[3]
    return _affine(x, _eye(len(level), x), shift)


def translate_y(x: Tensor, level: Tensor) -> Tensor:
    """Shift by ``(10/32) * level / 10`` of the height (content moves up for level > 0)."""
    shift = _zeros2(len(level), x)
    shift[:, 1] = level.to(torch.float64) * (MAX_TRANSLATE / MAX_LEVEL) * x.shape[2]
    return _affine(x, _eye(len(level), x), shift)


OPS: dict[str, Op] = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Rotate": rotate,
    "Solarize": solarize,
    "Color": color,
    "Posterize": posterize,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Invert": invert,
}

# The 14 ops of the RandAugment paper (Cubuk et al., 2019); Invert is available but not default.
RANDAUGMENT_OPS: tuple[str, ...] = tuple(name for name in OPS if name != "Invert")
