"""How close the exact teacher gradient under a precision policy is to a float64 CPU reference.

The precision policy of the exact step (docs/library.md, "Precision"): forward
passes may run under bf16 autocast; losses, targets, the Appendix-B factors and the tangent w stay
float32; on CUDA the student's exact passes run with TF32 off
(:func:`metapl.mpl.replay.tf32_disabled`). This module
measures what that policy costs: the same weights and batch go through one MPL step twice, once
under the policy on ``device`` and once in float64 on the CPU, and the teacher's MPL gradients are
compared. `metapl bench` records it on whatever device it runs on; a test asserts it on the CPU.

Dropout is switched off in both copies (every ``nn.Dropout*`` module, and the stochastic depth of
EfficientNet's blocks), because the CPU and CUDA generators (and different dtypes) draw different
masks; BatchNorm stays in train mode with batch statistics, as in training.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from metapl.models.efficientnet import MBConv
from metapl.mpl.step import MetaPseudoLabels

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _copy_without_dropout(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    clone = copy.deepcopy(model).to(device=device, dtype=dtype)
    for module in clone.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        if isinstance(module, MBConv):
            module.drop_path_rate = 0.0  # stochastic depth
    return clone.train()


def mpl_teacher_gradient(
    teacher: nn.Module,
    student: nn.Module,
    make_student_optimizer: OptimizerFactory,
    batch: tuple[Tensor, Tensor, Tensor],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """The teacher's exact MPL gradient (supervised term off), flattened, as float64 on the CPU.

    The models are copied (dropout off); the originals and their optimizers are not touched.
    """
    t = _copy_without_dropout(teacher, device, dtype)
    s = _copy_without_dropout(student, device, dtype)
    mpl = MetaPseudoLabels(
        t,
        s,
        torch.optim.SGD(t.parameters(), lr=0.0),
        make_student_optimizer(list(s.parameters())),
        supervised_weight=0.0,
        temperature=temperature,
        autocast_dtype=autocast_dtype,
    )
    x_l, y_l, x_u = batch
    mpl.step(x_l.to(device, dtype), y_l.to(device), x_u.to(device, dtype))
    grads = [p.grad for p in t.parameters() if p.grad is not None]
    return torch.cat([g.detach().double().cpu().reshape(-1) for g in grads])


def agreement_with_float64(
    teacher: nn.Module,
    student: nn.Module,
    make_student_optimizer: OptimizerFactory,
    batch: tuple[Tensor, Tensor, Tensor],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Cosine, norm ratio and relative error of the policy's gradient against float64 on the CPU."""
    policy = mpl_teacher_gradient(
        teacher,
        student,
        make_student_optimizer,
        batch,
        device,
        torch.float32,
        autocast_dtype,
        temperature,
    )
    reference = mpl_teacher_gradient(
        teacher,
        student,
        make_student_optimizer,
        batch,
        torch.device("cpu"),
        torch.float64,
        None,
        temperature,
    )
    return {
        "cosine": float(torch.nn.functional.cosine_similarity(policy, reference, dim=0)),
        "norm_ratio": float(policy.norm() / reference.norm()),
        "relative_error": float((policy - reference).norm() / reference.norm()),
        "reference_norm": float(reference.norm()),
    }
