"""Making two forward passes see the same function.

The JVP pass of the exact step must differentiate *the very function* the student's update pass used:
the same dropout mask (so the random-number state is replayed) and BatchNorm with batch statistics
(train mode) whose running statistics are updated only once per step (so extra passes work on copies
of the buffers, or restore them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class RngState:
    """A snapshot of the CPU generator and, for a CUDA device, that device's generator."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@contextlib.contextmanager
def replayed_rng(state: RngState) -> Iterator[None]:
    """Run the block with the random numbers of ``state``; afterwards the stream continues from
    where it was before the block, as if the block had drawn nothing."""
    now = RngState(state.device)
    state.restore()
    try:
        yield
    finally:
        now.restore()


def buffer_copies(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the module's buffers for ``functional_call``: a pass that runs on them leaves the
    real running statistics as they were (and never bumps the version of a tensor that an earlier
    pass saved for its backward). By :func:`clones`: the exact step copies a WRN's 75 BatchNorm
    buffers three times a step."""
    named = list(module.named_buffers())
    with torch.no_grad():  # copies without a graph (no detach of each: a dispatch apiece)
        copies = clones([b for _, b in named])
    return dict(zip((name for name, _ in named), copies))


def clones(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[t.clone() for t in tensors]`` (strides and dtypes kept), one foreach clone per device and
    dtype where torch has it (a private op): on a GPU bound by the host's kernel launches, a
    copy of each of a WRN's 50 float32 BatchNorm statistics was a launch of its own, and
    ``_foreach_clone`` takes its one-launch path only for tensors of one device and dtype (its
    25 int64 counters made it fall back to one clone per tensor). Under ``torch.no_grad()`` the
    copies carry no graph; a dual tensor's forward-mode tangent would carry over (detach dropped
    it): the step copies real buffers and parameters only."""
    clone_all = getattr(torch, "_foreach_clone", None)
    if clone_all is None or not tensors:
        return [t.clone() for t in tensors]
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out: list[torch.Tensor] = list(tensors)
    for members in groups.values():
        for i, copy in zip(members, clone_all([tensors[i] for i in members])):
            out[i] = copy
    return out


def restore_buffers(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Write :func:`buffer_copies` back into the module's buffers (in place)."""
    with torch.no_grad():
        for name, b in module.named_buffers():
            if name in saved and b.shape == saved[name].shape:
                b.copy_(saved[name])


class RestorePoint:
    """What a step's forwards move before any parameter does: the modules' buffers (BatchNorm's
    running statistics) and the random stream (dropout masks) of their devices. Saved before a
    forward whose output may turn out wrong, given back with the error (:meth:`restore`), so that
    the refused step leaves the models as they were."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.buffers = [(m, buffer_copies(m)) for m in modules]
        self.rng = [RngState(d) for d in dict.fromkeys(module_device(m) for m in modules)]

    def restore(self) -> None:
        for module, saved in self.buffers:
            restore_buffers(module, saved)
        for state in self.rng:
            state.restore()


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def tf32_disabled(device: torch.device) -> Iterator[None]:
    """On CUDA, run the block with TF32 off for matmuls and cuDNN convolutions (no-op elsewhere).

    Why: the meta-gradient is a small second-order signal. On an H200, TF32 convolutions put it
    14-20% (relative) away from double backward in float32, TF32 off 0.6-0.8% (docs/design.md §1).
    cuDNN allows TF32 by default, so the exact passes switch it off explicitly. bf16 autocast is
    unaffected (its convolutions are bf16, not TF32).
    """
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def differentiable_attention() -> contextlib.AbstractContextManager:
    """Run the block with ``F.scaled_dot_product_attention`` in its math kernel (matmuls and a
    softmax), whatever backend torch would pick.

    Why: the fused kernels (flash attention, on a CPU as on a GPU, and the memory-efficient one)
    have a backward but neither forward-mode AD nor a second derivative, so a transformer student
    (``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention`` without attention weights) failed
    both exact estimators. The math kernel is the same function, up to rounding, and every student
    pass of an exact step runs in it, so that J and the update come from one function (with
    attention dropout, the same kernel draws the same mask). The cost is the math kernel's speed and
    memory for the student's attention in those passes; the teacher's passes keep torch's choice.
    """
    return sdpa_kernel(SDPBackend.MATH)
