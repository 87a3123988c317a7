"""Gradient clipping (``student_max_grad_norm``, ``teacher_max_grad_norm``): each model's gradient
clipped as ``torch.nn.utils.clip_grad_norm_`` does before its optimizer's step, and the teacher's
gradient still exact through the student's clipped step.

The exact step's w gains clip's Jacobian a I - b g g^T (metapl.mpl.clipping); the double-backward
step clips inside its second-order graph; the finite differences run the REAL step with torch's
clip_grad_norm_ (mpl_helpers.student_after_real_step). All three must agree, with clipping active
(max norm at least 10x below the gradient's norm) and inactive, over two steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from mpl_helpers import (
    MLP,
    N_CLASSES,
    STUDENT_OPTIMIZERS,
    FiniteDifferenceProbe,
    flat,
    make_problem,
    rel_err,
    student_after_real_step,
)
from torch import Tensor, nn

from metapl import MetaPseudoLabels
from metapl.errors import ConfigError
from metapl.mpl.clipping import NormClip

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# The student's gradient norm in these problems is 0.3 to 1.1 (checked in each test).
ACTIVE, INACTIVE = 0.02, 100.0
# SGD with momentum, Nesterov and weight decay; Adam; RMSprop with all its options
OPTIMIZERS = ["sgd_nesterov_foreach", "adam", "adamw_amsgrad_maximize", "rmsprop_all_maximize"]


def _mpl(teacher, student, opt_name: str, estimator: str = "exact", **options) -> MetaPseudoLabels:
    """An MPL step over copies of the models (supervised_weight 0: the teacher's gradient is the
    MPL term's)."""
    t, s = copy.deepcopy(teacher), copy.deepcopy(student)
    return MetaPseudoLabels(
        t,
        s,
        torch.optim.SGD(t.parameters(), lr=0.1, momentum=0.9),
        STUDENT_OPTIMIZERS[opt_name](s.parameters()),
        supervised_weight=0.0,
        estimator=estimator,
        **options,
    )


def _grad(model: nn.Module) -> Tensor:
    return flat(p.grad for p in model.parameters() if p.grad is not None).detach()


def _params(model: nn.Module) -> Tensor:
    return flat(model.parameters()).detach()


def _checked_steps(teacher, student, x_l, y_l, x_u, opt_name: str, max_norm: float) -> None:
    """Two steps of the exact and the double-backward estimators side by side; at each, the
    teacher's gradients agree (1e-10), match central differences of R through the real clipped
    step (1e-6), and the student moved as clip_grad_norm_ + its optimizer's step move a copy."""
    exact, oracle = (
        _mpl(teacher, student, opt_name, est, student_max_grad_norm=max_norm)
        for est in ("exact", "double_backward")
    )
    factory = STUDENT_OPTIMIZERS[opt_name]
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        x = x_u + 0.1 * step
        args = (exact.student, exact.student_optimizer, factory, x_l, y_l, x)
        t_params = {n: p.detach().clone() for n, p in exact.teacher.named_parameters()}
        real = {"seed": step, "student_max_grad_norm": max_norm}
        expected = student_after_real_step(exact.teacher, t_params, *args, **real)
        unclipped = student_after_real_step(exact.teacher, t_params, *args, seed=step)
        norm = float(_grad(unclipped).norm())
        assert norm > 10 * ACTIVE and norm < INACTIVE / 10, norm  # active and inactive as named
        probe = FiniteDifferenceProbe(exact.teacher, *args, gen=gen, **real)

        for mpl in (exact, oracle):
            torch.manual_seed(step)
            mpl.step(x_l, y_l, x)
        assert _grad(exact.teacher).norm() > 1e-6
        assert rel_err(_grad(exact.teacher), _grad(oracle.teacher)) <= 1e-10
        probe.check(step)
        assert rel_err(_params(exact.student), _params(expected)) <= 1e-12
        assert rel_err(_params(oracle.student), _params(expected)) <= 1e-12


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("max_norm", [ACTIVE, INACTIVE], ids=["active", "inactive"])
def test_clipped_exact_gradient_equals_double_backward_and_finite_differences(opt_name, max_norm):
    _checked_steps(*make_problem("mlp", seed=3), opt_name, max_norm)


@pytest.mark.parametrize("jvp", ["forward_ad", "auto"])  # auto: the tangent tape's J
def test_clipped_exact_gradient_of_a_conv_student_with_its_own_labeled_loss(jvp):
    teacher, student, x_l, y_l, x_u = make_problem("conv", seed=2)
    for max_norm in (ACTIVE, INACTIVE):
        options = {"student_max_grad_norm": max_norm, "student_labeled_weight": 0.5}
        exact = _mpl(teacher, student, "sgd_nesterov_foreach", jvp=jvp, **options)
        oracle = _mpl(teacher, student, "sgd_nesterov_foreach", "double_backward", **options)
        for step in range(2):
            for mpl in (exact, oracle):
                torch.manual_seed(step)
                mpl.step(x_l, y_l, x_u + 0.1 * step)
            assert rel_err(_grad(exact.teacher), _grad(oracle.teacher)) <= 1e-10
            assert rel_err(_params(exact.student), _params(oracle.student)) <= 1e-10
            assert exact.last_jvp_path == ("tape" if jvp == "auto" else "forward_ad")


class _UnlabeledOnly(nn.Module):
    """An MLP, then ``extra`` on a batch of ``rows`` examples only (x_u's): its parameters get a
    gradient g from the student's update but none from R (v is None), and clip's rank-one term
    still gives them a tangent, since the clip couples every parameter."""

    def __init__(self, rows: int):
        super().__init__()
        self.body, self.extra, self.rows = MLP(), nn.Linear(N_CLASSES, N_CLASSES), rows

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return self.extra(h) if x.shape[0] == self.rows else h


def test_parameters_without_a_labeled_gradient_are_coupled_by_the_clip():
    teacher, _, x_l, y_l, x_u = make_problem("mlp", seed=3)
    torch.manual_seed(1)
    student = _UnlabeledOnly(len(x_u)).to(torch.float64)
    _checked_steps(teacher, student, x_l, y_l, x_u, "adam", ACTIVE)


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_without_the_rank_one_term_the_gradient_is_measurably_wrong(opt_name, monkeypatch):
    """The mutant the tests above must catch: clip's Jacobian as coef * I alone."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=3)
    grads = []
    for mutant in (False, True):
        if mutant:
            monkeypatch.setattr(
                NormClip,
                "jacobian_times",
                lambda self, clipped, u: [None if w is None else w * self.coef for w in u],
            )
        mpl = _mpl(teacher, student, opt_name, student_max_grad_norm=ACTIVE)
        torch.manual_seed(0)
        mpl.step(x_l, y_l, x_u)
        grads.append(_grad(mpl.teacher))
    assert rel_err(grads[1], grads[0]) > 1e-3  # a thousand times the finite differences' bound


@pytest.mark.parametrize("estimator", ["exact", "double_backward", "first_order"])
def test_inactive_clipping_is_no_clipping(estimator):
    """A max norm above the gradient's norm changes nothing, to the bit (coef is exactly 1)."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=3)
    after = []
    for max_norm in (None, INACTIVE):
        mpl = _mpl(
            teacher, student, "adam", estimator,
            student_max_grad_norm=max_norm, teacher_max_grad_norm=max_norm,
        )  # fmt: skip
        torch.manual_seed(0)
        mpl.step(x_l, y_l, x_u)
        after.append(torch.cat([_params(mpl.teacher), _params(mpl.student)]))
    assert torch.equal(after[0], after[1])


def _recording_grads(model: nn.Module) -> dict[str, Tensor]:
    """The gradients of ``model``'s parameters by name, as its backward leaves them (before any
    clipping)."""
    recorded: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: recorded.__setitem__(name, p.grad.detach().clone())
        )
    return recorded


@pytest.mark.parametrize("estimator", ["exact", "first_order"])
def test_the_teachers_update_is_clip_grad_norm_then_its_optimizers_step(estimator):
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=4)
    t, s = copy.deepcopy(teacher), copy.deepcopy(student)

    def teacher_optimizer(params):
        return torch.optim.Adam(params, lr=0.01, weight_decay=0.01)

    t_opt = teacher_optimizer(t.parameters())
    mpl = MetaPseudoLabels(
        t,
        s,
        t_opt,
        torch.optim.SGD(s.parameters(), lr=0.1),
        estimator=estimator,
        teacher_max_grad_norm=ACTIVE,
    )
    recorded = _recording_grads(t)
    for step in range(2):
        by_hand = copy.deepcopy(t)
        opt = teacher_optimizer(by_hand.parameters())
        opt.load_state_dict(copy.deepcopy(t_opt.state_dict()))
        recorded.clear()
        torch.manual_seed(step)
        mpl.step(x_l, y_l, x_u + 0.1 * step)
        for name, p in by_hand.named_parameters():
            p.grad = recorded[name]
        assert float(torch.nn.utils.clip_grad_norm_(by_hand.parameters(), ACTIVE)) > 10 * ACTIVE
        opt.step()
        assert rel_err(_params(t), _params(by_hand)) <= 1e-12


def test_first_order_steps_the_student_on_its_clipped_gradient():
    """Plain SGD: theta_{t+1} = theta_t - lr * g with g the clipped gradient (left in .grad), of
    norm max_norm * n / (n + 1e-6), and n (the unclipped norm) above max_norm."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=4)
    t, s = copy.deepcopy(teacher), copy.deepcopy(student)
    mpl = MetaPseudoLabels(
        t,
        s,
        torch.optim.SGD(t.parameters(), lr=0.1),
        torch.optim.SGD(s.parameters(), lr=0.1),
        estimator="first_order",
        student_max_grad_norm=ACTIVE,
    )
    recorded = _recording_grads(s)
    before = _params(s).clone()
    torch.manual_seed(0)
    mpl.step(x_l, y_l, x_u)
    n = float(flat(recorded.values()).norm())
    assert n > 10 * ACTIVE
    assert math.isclose(float(_grad(s).norm()), ACTIVE * n / (n + 1e-6), rel_tol=1e-12)
    assert rel_err(_params(s), before - 0.1 * _grad(s)) <= 1e-14


@pytest.mark.parametrize("name", ["student_max_grad_norm", "teacher_max_grad_norm"])
@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.nan, math.inf, True, "1"])
def test_a_max_norm_that_is_not_a_finite_positive_number_is_refused(name, value):
    teacher, student, *_ = make_problem("mlp")
    with pytest.raises(ConfigError, match=f"{name} must be None .no clipping. or a finite"):
        _mpl(teacher, student, "sgd", **{name: value})


@pytest.mark.parametrize("name", ["student_max_grad_norm", "teacher_max_grad_norm"])
def test_clipping_stacked_ensemble_members_is_refused(name):
    """One norm over all members would clip each by the others' gradients."""
    teacher, student, *_ = make_problem("mlp")
    with pytest.raises(ConfigError, match=f"{name} clips by one norm.*batch_dim=1"):
        _mpl(teacher, student, "sgd", batch_dim=1, **{name: 1.0})


def test_clipping_a_sparse_gradient_is_refused():
    """torch has no norm of a sparse gradient (clip_grad_norm_ fails on one)."""
    teacher = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 3))
    student = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="teacher_max_grad_norm: the module '0' has sparse=True"):
        MetaPseudoLabels(
            teacher,
            student,
            torch.optim.SGD(teacher.parameters(), lr=0.1),
            torch.optim.SGD(student.parameters(), lr=0.1),
            teacher_max_grad_norm=1.0,
        )


# --- the training engine ------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["digits-uda-mpl", "digits-uda", "digits-supervised"])
def test_the_engine_hands_its_clipping_keys_to_each_methods_steps(preset):
    from metapl.methods.build import build_method
    from metapl.train.config import apply_overrides
    from metapl.train.presets import load_preset

    cfg = load_preset(preset)
    off = build_method(cfg, 10, torch.device("cpu"))
    keys = {"student_grad_clip": 0.5} | ({"teacher_grad_clip": 2.0} if cfg.uses_mpl else {})
    on = build_method(apply_overrides(cfg, keys).validate(), 10, torch.device("cpu"))
    if cfg.uses_mpl:
        assert (off.mpl.student_max_grad_norm, off.mpl.teacher_max_grad_norm) == (None, None)
        assert (on.mpl.student_max_grad_norm, on.mpl.teacher_max_grad_norm) == (0.5, 2.0)
    else:
        assert (off.max_grad_norm, on.max_grad_norm) == (None, 0.5)


def test_a_baselines_step_is_clip_grad_norm_then_its_optimizers_step():
    from metapl.methods.base import Batch
    from metapl.methods.supervised import SupervisedMethod

    _, model, x, y, _ = make_problem("mlp", seed=1)
    by_hand = copy.deepcopy(model)
    method = SupervisedMethod(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), max_grad_norm=ACTIVE
    )
    torch.manual_seed(0)
    method.step(Batch(x, y))
    torch.manual_seed(0)
    nn.functional.cross_entropy(by_hand(x), y).backward()
    assert float(torch.nn.utils.clip_grad_norm_(by_hand.parameters(), ACTIVE)) > 10 * ACTIVE
    torch.optim.SGD(by_hand.parameters(), lr=0.1, momentum=0.9).step()
    assert rel_err(_params(model), _params(by_hand)) <= 1e-14
