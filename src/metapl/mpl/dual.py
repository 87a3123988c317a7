"""Forward-mode AD's dual level (``torch.autograd.forward_ad.dual_level``), entered without the
TorchScript deprecation warning that torch raises from inside itself.

A process's first dual tensor loads torch's JVP decompositions
(``torch._decomp.decompositions_for_jvp``), which compile a few functions with ``torch.jit.script``.
torch 2.13 warns about it with a DeprecationWarning, which Python hides; torch 2.14 with a
FutureWarning, which Python shows: two lines from torch's own files in the output of every command
and library step that takes an exact MPL step (``metapl twomoons``, ``digits``, ``train``, ``tune``,
``reduced``, ``bench``, torchrun's every process). No user can act on it, so :func:`dual_level`
makes that first dual tensor itself, with the warning filtered by its message only.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from metapl.warning_filters import ignoring

# "`torch.jit.script` is deprecated. Please switch to ..." (any category: 2.13 DeprecationWarning,
# 2.14 FutureWarning)
TORCHSCRIPT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"


@functools.cache
def _load_jvp_decompositions() -> None:
    """Makes one dual tensor, so that torch loads its JVP decompositions here, once per process."""
    # (metapl.warning_filters: image files may be decoding on other threads meanwhile)
    with ignoring(message=TORCHSCRIPT_DEPRECATED), torch.inference_mode(False), torch.no_grad():
        with fwad.dual_level():
            fwad.make_dual(torch.zeros(()), torch.zeros(()))


class _BatchNormTangentsInTheirDtype(TorchFunctionMode):
    """BatchNorm's output tangent in its primal's dtype.

    Why: under autocast in bf16 (or fp16), a BatchNorm whose weight carries no tangent (a frozen
    affine, or ``affine=False``) returns a bf16 output with a float32 tangent (torch 2.13's
    forward-AD formula), and the next convolution refused the pair: "Input type
    (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the same". The exact step's
    first check (:func:`metapl.mpl.student_checks.check_derivatives`) failed on such a student
    in bf16 on the CPU. A tangent is the derivative of its primal, so it takes the primal's dtype,
    as every other layer's does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.batch_norm and isinstance(out, torch.Tensor):
            primal, tangent = fwad.unpack_dual(out)
            if tangent is not None and tangent.dtype != primal.dtype:
                return fwad.make_dual(primal, tangent.to(primal.dtype))
        return out


@contextlib.contextmanager
def dual_level() -> Iterator[None]:
    """``torch.autograd.forward_ad.dual_level()``, after torch's JVP decompositions are loaded
    without their TorchScript warning (see the module's docstring), with BatchNorm's tangents in
    their primals' dtype (:class:`_BatchNormTangentsInTheirDtype`)."""
    _load_jvp_decompositions()
    with fwad.dual_level(), _BatchNormTangentsInTheirDtype():
        yield
