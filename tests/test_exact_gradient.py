"""The exact teacher gradient of one MPL step (one forward-mode JVP) is grad_Psi R(theta_{t+1}).

Three independent computations must agree, in float64, for every supported student optimizer, over
two consecutive steps (so the optimizer's state is non-trivial in the second), on an MLP with
BatchNorm1d + Dropout and a conv net with BatchNorm2d + Dropout:

- ``MetaPseudoLabels.step`` with ``supervised_weight=0``: the teacher's ``.grad`` afterwards;
- the double-backward oracle (``create_graph=True`` through a differentiable optimizer step);
- central finite differences of R(theta_{t+1}(Psi)) where theta_{t+1} comes from the REAL
  ``optimizer.step()`` of a copy of the student (``mpl_helpers.mpl_objective``).

Dropout masks line up because all three draw random numbers in the same order after the same seed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from mpl_helpers import (
    STUDENT_OPTIMIZERS,
    FiniteDifferenceProbe,
    cloned_buffers,
    flat,
    make_problem,
    over_student_optimizers,
    rel_err,
)
from torch.func import functional_call

from metapl import MetaPseudoLabels
from metapl.mpl import double_backward_teacher_gradient

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FD_EPS = 1e-6
N_DIRECTIONS = 3


def _fresh_unlabeled(x_u: torch.Tensor, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(x_u.shape, generator=g, dtype=x_u.dtype).to(x_u.device)


@over_student_optimizers()
@pytest.mark.parametrize("kind, temperature", [("mlp", 0.7), ("conv", 1.0)], ids=["mlp", "conv"])
@pytest.mark.parametrize("jvp", ["forward_ad", "tape"])
def test_exact_gradient_equals_double_backward_and_finite_differences(
    opt_name, kind, temperature, jvp
):
    """Both ways of computing J (a forward-AD pass; the tangent tape of the update pass)."""
    factory = STUDENT_OPTIMIZERS[opt_name]
    teacher, student, x_l, y_l, x_u = make_problem(kind, seed=3)
    s_opt = factory(student.parameters())
    assert _check_two_steps(teacher, student, s_opt, factory, x_l, y_l, x_u, temperature, jvp) == 0


@pytest.mark.parametrize(
    "opt_name",
    ["sgd", "sgd_nesterov_foreach", "rmsprop_momentum", "adam", "adamw_amsgrad_maximize"],
)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("jvp", ["forward_ad", "tape"])
def test_exact_gradient_with_the_students_own_labeled_loss(opt_name, kind, jvp):
    """student_labeled_weight > 0: the student also learns the labels (NoisyStudent's student
    does). theta_{t+1} and the Appendix-B factors then come from the sum of both losses' gradients,
    J from the x_u pass alone; all three computations must still agree."""
    factory = STUDENT_OPTIMIZERS[opt_name]
    teacher, student, x_l, y_l, x_u = make_problem(kind, seed=3)
    s_opt = factory(student.parameters())
    args = (teacher, student, s_opt, factory, x_l, y_l, x_u, 0.8, jvp)
    assert _check_two_steps(*args, labeled=0.6) == 0


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "rmsprop_centered", "adam"])
def test_exact_gradient_with_a_frozen_student_layer(opt_name):
    """Parameters outside the student's optimizer stay fixed and are not differentiated."""
    factory = STUDENT_OPTIMIZERS[opt_name]
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=3)
    student.fc1.weight.requires_grad_(False)
    frozen = student.fc1.weight.detach().clone()
    s_opt = factory([p for p in student.parameters() if p.requires_grad])
    assert _check_two_steps(teacher, student, s_opt, factory, x_l, y_l, x_u, 1.3) == 0
    assert torch.equal(student.fc1.weight, frozen)


@pytest.mark.parametrize("opt_name", ["rmsprop", "adam_amsgrad"])
def test_exact_gradient_with_exactly_zero_student_gradients(opt_name):
    """A hidden unit of the student is dead (ReLU off on the whole batch): its gradients are
    exactly 0, where plain double backward through sqrt(g^2) gives NaN at the first step (the
    oracle's update rules take sqrt's derivative at 0 as 0, as the factors do). The exact step and
    the oracle must stay finite and agree, with finite differences too. (The unit is made dead by
    its BatchNorm shift: seed 12 had one by chance on the CPU, not with a GPU's dropout masks.)"""
    factory = STUDENT_OPTIMIZERS[opt_name]
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=12)
    with torch.no_grad():  # normalized values of a few examples lie within +-3: always below 0
        student.bn.bias[0] = -10.0
    s_opt = factory(student.parameters())
    # the scenario really has exact zeros: the first step's student gradient, on copies
    t2, s2 = copy.deepcopy(teacher), copy.deepcopy(student)
    first = MetaPseudoLabels(
        t2, s2, torch.optim.SGD(t2.parameters(), lr=0.1), factory(s2.parameters())
    )
    torch.manual_seed(1234)
    first.step(x_l, y_l, _fresh_unlabeled(x_u, 0))
    assert any(p.grad.eq(0).any() for p in s2.parameters())
    assert _check_two_steps(teacher, student, s_opt, factory, x_l, y_l, x_u, 1.3) == 0


def _check_two_steps(
    teacher, student, s_opt, factory, x_l, y_l, x_u, temperature, jvp="forward_ad", labeled=0.0
) -> int:
    """Two MPL steps; before each, the oracle and finite differences at the same point.
    ``labeled``: the student's own labeled-CE weight (``student_labeled_weight``).
    Returns how many times the oracle was not finite (then only finite differences judge)."""
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.5)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        t_opt,
        s_opt,
        temperature=temperature,
        supervised_weight=0.0,
        jvp=jvp,
        student_labeled_weight=labeled,
    )
    gen = torch.Generator().manual_seed(11)
    oracle_nans = 0
    for step in range(2):
        seed = 1234 + step
        x_u = _fresh_unlabeled(x_u, step)

        torch.manual_seed(seed)
        oracle = flat(
            double_backward_teacher_gradient(
                teacher,
                student,
                s_opt,
                x_l,
                y_l,
                x_u,
                temperature=temperature,
                student_labeled_weight=labeled,
            )
        )

        probe = FiniteDifferenceProbe(
            teacher, student, s_opt, factory, x_l, y_l, x_u,
            gen=gen, n=N_DIRECTIONS, eps=FD_EPS,
            seed=seed, temperature=temperature, student_labeled_weight=labeled,
        )  # fmt: skip

        torch.manual_seed(seed)
        metrics = mpl.step(x_l, y_l, x_u)
        exact = flat(p.grad for p in teacher.parameters())

        assert exact.norm() > 1e-6, "the MPL gradient must not be trivially zero here"
        assert torch.isfinite(exact).all()
        if torch.isfinite(oracle).all():
            assert rel_err(exact, oracle) <= 1e-9, (step, rel_err(exact, oracle))
        else:  # sqrt'(0) in the oracle: only legitimate where a student gradient is exactly 0
            oracle_nans += 1
        probe.check(step)
        # supervised_weight = 0: the teacher's loss is the MPL term alone
        assert torch.equal(metrics["teacher_loss"], metrics["teacher_mpl"])
        assert ("student_labeled" in metrics) == (labeled > 0)
    assert mpl.step_count == 2
    assert mpl.last_jvp_path == jvp
    return oracle_nans


@pytest.mark.parametrize("estimator", ["exact", "double_backward", "first_order"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_batchnorm_running_statistics_are_updated_exactly_once(kind, estimator):
    """By the student's update pass on x_u alone, whatever the estimator: its labeled passes
    (first_order's R before and after the update, the exact estimators' R(theta_{t+1})) run on
    copies of the buffers. (A first_order R-before pass on the module's own buffers, under
    no_grad, went unseen: only the exact estimator was checked.)"""
    teacher, student, x_l, y_l, x_u = make_problem(kind, seed=5)
    # put non-default running statistics in, so that "updated once" differs from "reset"
    with torch.no_grad():
        student(torch.randn(x_u.shape, dtype=x_u.dtype, device=x_u.device))
        teacher(torch.randn(x_u.shape, dtype=x_u.dtype, device=x_u.device))
    s_opt = torch.optim.Adam(student.parameters(), lr=0.01)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.05)
    mpl = MetaPseudoLabels(teacher, student, t_opt, s_opt, temperature=1.5, estimator=estimator)
    for step in range(2):
        ref_s, ref_t = copy.deepcopy(student), copy.deepcopy(teacher)
        torch.manual_seed(step)
        with torch.no_grad():
            ref_t(torch.cat([x_l, x_u]))  # the one teacher forward, labeled then unlabeled
            ref_s(x_u)  # the one student forward that may touch the running statistics
        torch.manual_seed(step)
        mpl.step(x_l, y_l, x_u)
        for ref, model in ((ref_s, student), (ref_t, teacher)):
            bufs, ref_bufs = dict(model.named_buffers()), dict(ref.named_buffers())
            assert bufs.keys() == ref_bufs.keys() and bufs
            for name, b in bufs.items():
                torch.testing.assert_close(b, ref_bufs[name], rtol=1e-13, atol=1e-15)
        assert int(student.bn.num_batches_tracked) == 2 + step


@pytest.mark.parametrize(
    "mpl_weight, label_smoothing", [(1.0, 0.0), (0.5, 0.1)], ids=["plain", "weighted_smoothed"]
)
def test_teacher_takes_one_sgd_step_on_supervised_plus_mpl_gradient(mpl_weight, label_smoothing):
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=8)
    lr = 0.1
    s_opt = torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=lr)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        t_opt,
        s_opt,
        supervised_weight=1.0,
        mpl_weight=mpl_weight,
        label_smoothing=label_smoothing,
        temperature=0.8,
    )
    for step in range(2):
        seed = 77 + step
        names = [n for n, _ in teacher.named_parameters()]
        params = [p for _, p in teacher.named_parameters()]
        before = [p.detach().clone() for p in params]

        torch.manual_seed(seed)
        g_mpl = double_backward_teacher_gradient(
            teacher, student, s_opt, x_l, y_l, x_u, temperature=0.8
        )
        torch.manual_seed(seed)  # same dropout mask as the teacher forward in the step
        logits = functional_call(
            teacher,
            {**cloned_buffers(teacher), **dict(zip(names, params))},
            (torch.cat([x_l, x_u]),),
        )
        sup = F.cross_entropy(logits[: len(y_l)], y_l, label_smoothing=label_smoothing)
        g_sup = torch.autograd.grad(sup, params)

        torch.manual_seed(seed)
        metrics = mpl.step(x_l, y_l, x_u)
        torch.testing.assert_close(metrics["teacher_supervised"], sup.detach(), rtol=1e-12, atol=0)
        for p, b, gs, gm in zip(params, before, g_sup, g_mpl):
            total = gs + mpl_weight * gm
            torch.testing.assert_close(p.grad, total, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(p.detach(), b - lr * total, rtol=1e-12, atol=1e-13)
