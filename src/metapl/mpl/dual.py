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

import functools

import torch
import torch.autograd.forward_ad as fwad

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


def dual_level() -> fwad.dual_level:
    """``torch.autograd.forward_ad.dual_level()``, after torch's JVP decompositions are loaded
    without their TorchScript warning (see the module's docstring)."""
    _load_jvp_decompositions()
    return fwad.dual_level()
