"""What the tangent tape (:mod:`metapl.mpl.tangent`) knows about operations: which ones it records
and how (op tables), their arguments by name (signature stubs), and the tangent rules that need more
than one line (conv and linear, BatchNorm, activations, dropout masks).

A rule reads the primals the record pass saved and the tangents of its inputs and returns the tangent
of its output; forward-mode AD (``torch.autograd.forward_ad``) is the reference every rule is tested
against (tests/test_tangent_replay.py).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwad
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

aten = torch.ops.aten
LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- op tables

# In-place operators that fx may record as functions (item assignment, augmented operators on
# values fx could not rewrite).
INPLACE_FUNCTIONS = {
    operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
    operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
}  # fmt: skip

# Random operations whose output has no tangent: their values are recorded like any primal.
RANDOM_SOURCES = {
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.randperm, torch.bernoulli, torch.multinomial,
}  # fmt: skip
RANDOM_SOURCE_METHODS = {"bernoulli", "multinomial"}
# Random operations with a tangent other than dropout: no rule records them.
RANDOM_OTHER = {
    torch.normal, torch.poisson, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu,
    torch.rrelu, torch.alpha_dropout, torch.feature_alpha_dropout, torch.feature_dropout,
}  # fmt: skip
RANDOM_MODULES = (nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU)

# Dropout: the record pass keeps the mask (see dropout_pair).
DROPOUT_FUNCTIONS = {
    F.dropout: "dropout",
    F.dropout1d: "dropout1d",
    F.dropout2d: "dropout2d",
    F.dropout3d: "dropout3d",
    torch.dropout: "dropout",
}
DROPOUT_BY_KIND = {
    "dropout": F.dropout,
    "dropout1d": F.dropout1d,
    "dropout2d": F.dropout2d,
    "dropout3d": F.dropout3d,
}
DROPOUT_MODULES = {
    nn.Dropout: "dropout",
    nn.Dropout1d: "dropout1d",
    nn.Dropout2d: "dropout2d",
    nn.Dropout3d: "dropout3d",
}

# Outputs without a tangent: tensor metadata, comparisons, detached values, constants shaped like x.
NO_TANGENT_FUNCTIONS = {
    operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne,
    torch.lt, torch.le, torch.gt, torch.ge, torch.eq, torch.ne, torch.argmax, torch.argmin,
    torch.argsort, torch.detach, torch.zeros_like, torch.ones_like, torch.empty_like,
    torch.full_like, torch.numel, torch.is_floating_point,
}  # fmt: skip
NO_TANGENT_METHODS = {
    "size", "dim", "numel", "nelement", "stride", "element_size", "get_device",
    "is_floating_point", "is_contiguous", "detach", "lt", "le", "gt", "ge", "eq", "ne",
    "argmax", "argmin", "argsort", "new_zeros", "new_ones", "new_empty", "new_full", "tolist",
    "item",
}  # fmt: skip
NO_TANGENT_ATTRS = {
    "shape",
    "dtype",
    "device",
    "ndim",
    "is_cuda",
    "layout",
    "requires_grad",
    "data",
    "grad",
}

# Operations linear in their first argument alone: tangent = the same call with dx in its place.
LINEAR_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.t, torch.squeeze,
    torch.unsqueeze, torch.mean, torch.sum, torch.chunk, torch.split, torch.unbind,
    torch.narrow, torch.select, torch.roll, torch.flip, torch.movedim, torch.clone, torch.tile,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle,
    operator.getitem,
}  # fmt: skip
LINEAR_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze",
    "unsqueeze", "contiguous", "expand", "expand_as", "view_as", "reshape_as", "mean", "sum",
    "clone", "to", "type", "float", "double", "half", "bfloat16", "chunk", "split", "unbind",
    "narrow", "select", "repeat", "roll", "flip", "movedim", "moveaxis", "swapaxes", "tile",
}  # fmt: skip
LINEAR_MODULES = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.Upsample,
    nn.PixelShuffle, nn.PixelUnshuffle,
)  # fmt: skip

CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
CONV_BY_DIM = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

ADD_FUNCTIONS = {operator.add: 1, torch.add: 1, operator.sub: -1, torch.sub: -1}
ADD_METHODS = {"add": 1, "sub": -1}
MUL_FUNCTIONS = {operator.mul, torch.mul, torch.multiply}
DIV_FUNCTIONS = {operator.truediv, torch.div, torch.true_divide, torch.divide}
DIV_METHODS = {"div", "true_divide", "divide"}
NEG_FUNCTIONS = {operator.neg, torch.neg}
MATMUL_FUNCTIONS: dict[Callable, Callable[..., Tensor]]
MATMUL_FUNCTIONS = {operator.matmul: torch.matmul, torch.matmul: torch.matmul}
MATMUL_FUNCTIONS.update({torch.mm: torch.mm, torch.bmm: torch.bmm})
MATMUL_METHODS = {"matmul": torch.matmul, "mm": torch.mm, "bmm": torch.bmm}
CAT_FUNCTIONS = {torch.cat: torch.cat, torch.concat: torch.cat, torch.stack: torch.stack}


# Argument stubs: fx keeps calls as written (positional or keyword); binding them against these
# stubs gives every rule its arguments by name. Builtins (torch.conv2d, ...) have no signature.
def sig_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def sig_linear(input, weight, bias=None): ...
def sig_bn(input, running_mean, running_var, weight=None, bias=None, training=False,
            momentum=0.1, eps=1e-5): ...  # fmt: skip
def sig_act(input, inplace=False): ...
def sig_leaky(input, negative_slope=0.01, inplace=False): ...
def sig_gelu(input, approximate="none"): ...
def sig_unary(input): ...
def sig_binary(input, other, *, alpha=1): ...
def sig_div(input, other, *, rounding_mode=None): ...
def sig_cat(tensors, dim=0): ...
def sig_dropout(input, p=0.5, training=True, inplace=False): ...
def sig_torch_dropout(input, p, train): ...


def bind(stub: Callable, node: fx.Node) -> dict | None:
    try:
        bound = inspect.signature(stub).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


# ----------------------------------------------------------------------------- record helpers


def dropout_pair(x: Tensor, p: float, training: bool, kind: str) -> tuple[Tensor, Tensor | None]:
    """``(dropout(x), mask)`` with ``dropout(x) == x * mask``, drawing exactly the random numbers
    ``dropout(x)`` draws: the mask is ``dropout(ones_like(x))`` (same shape, dtype, device and
    memory format, hence the same draw), and ``x * mask`` is what the CPU kernel computes. ``mask``
    is None where dropout is the identity and draws nothing (eval mode, p = 0)."""
    if not training or p == 0.0:
        return x, None
    fn = DROPOUT_BY_KIND[kind]
    ones = ones_with_layout(x)
    if kind == "dropout" and x.is_cuda and x.dtype in LOW_PRECISION and 0.0 < p < 1.0:
        # CUDA's fused kernel scales in float32 and rounds once: keep the mask in float32 so
        # that the output is bit-identical to F.dropout(x) (a bf16 mask would round the scale).
        keep = fn(ones, p, True) != 0
        keep_p = float(torch.tensor(1.0 - p, dtype=torch.float32))  # the kernel's float p
        mask = keep.to(torch.float32) * (1.0 / keep_p)
        return (x.float() * mask).to(x.dtype), mask
    mask = fn(ones, p, True)
    return x * mask, mask


def ones_with_layout(x: Tensor) -> Tensor:
    """Ones with ``x``'s shape, strides and alignment. CUDA's dropout kernel chooses its
    vectorization (hence which random number lands on which element) from contiguity and pointer
    alignment; a fresh ``ones_like`` has x's layout only when x is dense and starts its storage
    (the common case: a layer's output). The CPU kernels draw into ``empty_like(x)`` either way."""
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    if not x.is_cuda or (dense and x.storage_offset() == 0):
        return torch.ones_like(x)
    size = x.untyped_storage().nbytes() // x.element_size()
    ones = torch.ones(size, dtype=x.dtype, device=x.device)
    return ones.as_strided(x.shape, x.stride(), x.storage_offset())


def record_dropout_module(
    x: Tensor, module: nn.modules.dropout._DropoutNd
) -> tuple[Tensor, Tensor | None]:
    """:func:`dropout_pair` with the module's own ``p`` and mode, read at run time."""
    return dropout_pair(x, module.p, module.training, DROPOUT_MODULES[type(module)])


def detached(value):
    """A tensor without its autograd history (anything else as it is): what a compiled record
    pass returns of its saved primals (:meth:`metapl.mpl.tangent.TangentTape.compile`)."""
    return value.detach() if isinstance(value, Tensor) else value


def saved_bn_stats(out) -> tuple[Tensor, Tensor] | None:
    """The batch mean and 1/std a BatchNorm's forward in train mode saved for its backward, read
    from ``out``'s autograd node in the record pass (None where that is not torch's own kernel
    with batch statistics, or autograd saved nothing): the tangent pass then normalizes with
    the very statistics of the update pass instead of a pass over x to compute them again (25
    statistics kernels on 896 images in a WRN-28-2's tangent pass)."""
    node = getattr(out, "grad_fn", None)
    if node is None or type(node).__name__ != "NativeBatchNormBackward0":
        return None
    if not node._saved_training:
        return None
    mean, rstd = node._saved_result1, node._saved_result2
    if mean.numel() != out.shape[1] or rstd.numel() != out.shape[1]:
        return None
    return mean, rstd


class PackedSigns:
    """Which elements of a tensor are > 0, 8 to a byte: what the tangent of a ReLU or leaky ReLU
    needs of its input, at 1/16 of a bf16 activation's memory (1/32 of a float32's).

    Why: where no other rule keeps an activation's input or output (WRN's last activation, whose
    output only the pooling reads), the tape kept one of them through the update pass's
    backward, where autograd frees it once the activation's backward has run: 14 MiB more than
    the first-order step at the exact step's peak (Table 3's batch, bf16).

    The bits follow the tensor's memory order (a permutation of its dimensions), so that packing
    a channels_last activation reads it in place."""

    def __init__(self, x: Tensor):
        self.shape = x.shape
        # dimensions from the largest stride to the smallest: x's memory order
        strides = x.stride()
        self.order = sorted(range(x.dim()), key=lambda d: -strides[d])
        positive = (x > 0).permute(self.order)
        flat = positive.reshape(-1)  # a view where x is dense; else one copy
        padding = -flat.numel() % 8
        if padding:
            flat = torch.cat([flat, flat.new_zeros(padding)])
        # (made on the device: a tensor from a list would be a copy from the host)
        shifts = torch.arange(8, dtype=torch.uint8, device=x.device)
        self.bits = (flat.view(-1, 8).view(torch.uint8) << shifts).sum(1, dtype=torch.uint8)

    def unpack(self) -> Tensor:
        """The bool tensor ``x > 0``, in x's shape and memory order."""
        shifts = torch.arange(8, dtype=torch.uint8, device=self.bits.device)
        flat = ((self.bits.unsqueeze(1) >> shifts) & 1).view(torch.bool).reshape(-1)
        permuted = [self.shape[d] for d in self.order]
        inverse = sorted(range(len(self.order)), key=self.order.__getitem__)
        return flat[: self.shape.numel()].reshape(permuted).permute(inverse)


def meta(value) -> tuple[torch.Size, torch.dtype] | None:
    """Shape and dtype of a tensor output: the tangent pass matches each tangent to them
    (broadcasting when only the broadcast operand has a tangent; autocast's dtypes)."""
    return (value.shape, value.dtype) if isinstance(value, Tensor) else None


# ----------------------------------------------------------------------------- tangent helpers


def sign_t(dx: Tensor, slope: float, kept, is_output: bool) -> Tensor:
    """ReLU (``slope`` 0) or leaky ReLU's tangent, dx where the input is > 0 and slope * dx
    elsewhere, by the backward kernels, from what the tape kept: the output (slope >= 0: it has
    the input's sign), the input, or the input's :class:`PackedSigns` as 1 and 0, which pass the
    kernels' test (> 0) where the input did (one fused kernel: a ``torch.where`` on the bools took
    4x as long on a CPU)."""
    if isinstance(kept, PackedSigns):
        kept, is_output = kept.unpack().to(dx.dtype), False
    if slope == 0:
        return aten.threshold_backward(dx, kept, 0)
    return aten.leaky_relu_backward(dx, kept, slope, is_output)


# Elementwise activations (dx, input, output) -> tangent: the backward kernels, applied to dx.
def silu_t(dx, xv, yv):
    return aten.silu_backward(dx, xv)


def sigmoid_t(dx, xv, yv):
    return aten.sigmoid_backward(dx, yv)


def gelu_t(approximate: str):
    def gelu_t(dx, xv, yv):
        return aten.gelu_backward(dx, xv, approximate=approximate)

    return gelu_t


def late(arg) -> Callable[[dict], object]:
    """A getter for an argument's primal value: constants are captured, nodes read from ``val``."""
    nodes = nodes_in(arg)
    if not nodes:
        return lambda val: arg
    if isinstance(arg, fx.Node):
        return lambda val: val[arg]
    return lambda val: fx.node.map_arg(arg, val.__getitem__)


def nodes_in(arg) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, found.append)
    return found


def tan(tan: dict, arg):
    return tan.get(arg) if isinstance(arg, fx.Node) else None


def plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def make_dual(primal, tangent):
    if tangent is None:
        return primal
    if isinstance(primal, Tensor):
        return fwad.make_dual(primal, tangent)
    if isinstance(primal, (tuple, list)):
        return type(primal)(make_dual(p, t) for p, t in zip(primal, tangent))
    return primal


def unpack_tangent(out):
    if isinstance(out, Tensor):
        return fwad.unpack_dual(out).tangent
    if isinstance(out, (tuple, list)):
        tangents = tuple(unpack_tangent(o) for o in out)
        return None if all(t is None for t in tangents) else tangents
    return None


def affine_tangent(fn, x, dx, w, dw, db, args, bias_shape):
    """Tangent of ``fn(x, W, b, *args)`` (conv, linear): ``fn(dx, W) + fn(x, dW) + db``, with the
    bias tangent folded into the first call. ``x`` and ``w`` are getters (called only if needed)."""
    out = None
    if dx is not None:
        out, db = fn(dx, w(), db, *args), None
    if dw is not None:
        out, db = plus(out, fn(x(), dw, db, *args)), None
    if db is not None:
        out = db.reshape(bias_shape)
    return out


def bn_tangent(
    x, dx, gamma, dgamma, dbeta, batch_stats, running_mean, running_var, eps, saved=None
):
    """Tangent of BatchNorm. With batch statistics, xhat = (x - mu) * rstd over every dimension
    but 1: dy = gamma * rstd * (dx - mean(dx) - xhat * mean(dx * xhat)) + dgamma * xhat + dbeta;
    with running statistics it is the affine map's, dy = gamma * rstd * dx + dgamma * xhat + dbeta.

    Both halves are BatchNorm's own fused kernels: ``native_batch_norm(x, dgamma, dbeta)`` is
    dgamma * xhat + dbeta and returns mu and rstd (one pass over x, where a ``var_mean`` over NCHW
    was 3x slower on CPU), and the dx half is BatchNorm's *backward* applied to dx (the train-mode
    Jacobian in x is symmetric). Low-precision activations (bf16, fp16) stay in their dtype, with
    the parameters and statistics in float32, as autocast's BatchNorm runs them: the kernels
    accumulate in float32 either way, and float32 copies of x and dx cost two passes over each
    (on the H200, WRN-28-2 at 896 images in bf16: the tangent pass took 15.8 ms with the copies,
    12.8 without, and the teacher gradient's cosine with float64 went from 0.9998 to 0.99998).

    ``saved``: the update pass's batch (mean, 1/std) (:func:`saved_bn_stats`), with batch
    statistics: the dgamma half is then BatchNorm's eval-mode kernel with those statistics (one
    pass over x instead of two), and without dgamma no pass over x is needed for them."""
    if dx is None and dgamma is None and dbeta is None:
        return None
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    stat_dtype = torch.float32 if x.dtype in LOW_PRECISION else x.dtype

    def f(t):
        return None if t is None else t.to(stat_dtype)

    rm, rv = (None, None) if batch_stats else (f(running_mean), f(running_var))
    if batch_stats and saved is not None:
        mean, rstd = f(saved[0]), f(saved[1])
        out = None
        if dgamma is not None:
            # dgamma * (x - mean) * rstd + dbeta: eval mode's kernel, given the variance whose
            # 1 / sqrt(var + eps) is rstd
            var = rstd.pow(-2).sub_(eps)
            out = aten.native_batch_norm(x, f(dgamma), f(dbeta), mean, var, False, 0.0, eps)[0]
    elif dgamma is not None or batch_stats:
        weight = f(dgamma)
        if weight is None and stat_dtype != x.dtype:
            # A float32 parameter, or a CPU's kernel computes bf16 statistics (and the backward
            # then refuses a float32 gamma): zeros, whose output is not used.
            weight = x.new_zeros(x.shape[1], dtype=stat_dtype)
        affine, mean, rstd = aten.native_batch_norm(
            x, weight, f(dbeta), rm, rv, batch_stats, 0.0, eps
        )
        out = affine if dgamma is not None else None
    else:  # running statistics, no dgamma: no pass over x is needed
        # Empty (not None) saved statistics, as native_batch_norm returns in eval mode: CUDA's
        # backward asserts they are defined (and reads the running statistics when empty).
        out, mean, rstd = None, x.new_empty(0, dtype=stat_dtype), x.new_empty(0, dtype=stat_dtype)
    if dgamma is None and dbeta is not None:
        out = f(dbeta).reshape(shape)
    if dx is not None:
        mask = [True, False, False]
        d_in = aten.native_batch_norm_backward(
            dx.to(x.dtype), x, f(gamma), rm, rv, mean, rstd, batch_stats, eps, mask
        )[0]
        out = plus(out, d_in)
    return out
