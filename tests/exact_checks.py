"""One exact MPL step checked three ways at the same point: the teacher's gradient against the
double-backward oracle (metapl.mpl.double_backward_teacher_gradient) and against central finite
differences of R through the REAL optimizer step (mpl_helpers), and the student's update
against its own optimizer's step on a copy (mpl_helpers)."""

from __future__ import annotations

import torch
from mpl_helpers import (
    FiniteDifferenceProbe,
    OptimizerFactory,
    flat,
    rel_err,
    student_after_real_step,
)

from metapl import MetaPseudoLabels
from metapl.mpl import double_backward_teacher_gradient


def checked_exact_step(
    mpl: MetaPseudoLabels,
    factory: OptimizerFactory,
    x_l,
    y_l: torch.Tensor,
    x_u,
    *,
    seed: int,
    gen: torch.Generator,
    temperature: float = 1.0,
) -> None:
    """``mpl.step`` (``supervised_weight=0``: the teacher's gradient is the MPL term's), with
    torch's global generator seeded with ``seed`` for it and for each oracle; ``factory`` built
    ``mpl.student_optimizer``. Asserts the gradient is not trivially zero, matches the oracle to
    a relative 1e-10 and finite differences to 1e-6, and that the student's parameters and
    buffers (running statistics updated once) are its real step's to 1e-12."""
    teacher, student, s_opt = mpl.teacher, mpl.student, mpl.student_optimizer
    torch.manual_seed(seed)
    oracle = flat(
        double_backward_teacher_gradient(
            teacher, student, s_opt, x_l, y_l, x_u, temperature=temperature
        )
    )
    t_params = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    real = dict(seed=seed, temperature=temperature)
    expected = student_after_real_step(
        teacher, t_params, student, s_opt, factory, x_l, y_l, x_u, **real
    )
    probe = FiniteDifferenceProbe(teacher, student, s_opt, factory, x_l, y_l, x_u, gen=gen, **real)

    torch.manual_seed(seed)
    mpl.step(x_l, y_l, x_u)
    exact = flat(p.grad for p in teacher.parameters())
    assert exact.norm() > 1e-6, "the MPL gradient must not be trivially zero here"
    assert rel_err(exact, oracle) <= 1e-10, rel_err(exact, oracle)
    probe.check(seed)
    for mine, real_one in (
        (list(student.parameters()), list(expected.parameters())),
        (list(student.buffers()), list(expected.buffers())),
    ):
        if mine:
            assert rel_err(flat(mine).detach(), flat(real_one).detach()) <= 1e-12
