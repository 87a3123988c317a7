"""The student's update rule as metapl sees it must be the one its optimizer applies.

(a) ``reference_update`` (differentiable, used by the double-backward oracle) gives the parameters
    the REAL ``optimizer.step()`` gives, step after step (so first-step special cases and
    non-trivial moment state are both covered).
(b) ``update_factors`` (dU/dg, diagonal) equals central finite differences of the REAL
    ``optimizer.step()`` with respect to the gradient.
(c) Optimizers without a known rule are refused for the exact estimator.
"""

from __future__ import annotations

import pytest
import torch
from mpl_helpers import (
    STUDENT_OPTIMIZERS,
    fresh_optimizer_like,
    make_problem,
    rel_err,
)

from metapl import MetaPseudoLabels
from metapl.errors import MetaplError, UnsupportedOptimizerError
from metapl.mpl import reference_update, update_factors

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64
SHAPES = [(4, 3), (3,), (2, 2, 2)]
N_STEPS = 3


def _leaf_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=DT).requires_grad_(True) for s in SHAPES]


def _gradients(step: int) -> list[torch.Tensor]:
    """Gradients bounded away from 0 (|g| in [0.05, 1.05]): RMSprop's and Adam's first step is
    g / (|g| + eps), whose derivative is only smooth away from g = 0."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for s in SHAPES:
        sign = torch.randint(0, 2, s, generator=g).to(DT) * 2 - 1
        out.append(sign * (0.05 + torch.rand(s, generator=g, dtype=DT)))
    return out


def _real_step(optimizer, params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    optimizer.step()


def _edited(cls, edit: dict, **kwargs):
    """``cls(params, **kwargs)`` with ``edit`` written into its groups after construction, past
    the checks of torch's constructor (which refuses Nesterov with dampening, a negative decay)."""

    def factory(params):
        opt = cls(params, **kwargs)
        for group in opt.param_groups:
            group.update(edit)
        return opt

    return factory


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=DT)


# Optimizers the rule handles although nobody constructs them so: hyperparameters edited in the
# groups (what a scheduler or a user's code may do), and given as tensors.
ODD_OPTIMIZERS = {
    "sgd_nesterov_dampening_edited": _edited(
        torch.optim.SGD, {"dampening": 0.3}, lr=0.1, momentum=0.9, nesterov=True
    ),
    "sgd_negative_weight_decay_edited": _edited(
        torch.optim.SGD, {"weight_decay": -0.05}, lr=0.2, momentum=0.5
    ),
    "rmsprop_negative_weight_decay_edited": _edited(
        torch.optim.RMSprop, {"weight_decay": -0.05}, lr=0.01, alpha=0.9, eps=1e-3, centered=True
    ),
    "adam_negative_weight_decay_edited": _edited(
        torch.optim.Adam, {"weight_decay": -0.05}, lr=0.01, betas=(0.8, 0.95), eps=1e-3
    ),
    "sgd_tensor_lr": lambda p: torch.optim.SGD(p, lr=_t(0.2), momentum=0.9, nesterov=True),
    "adam_tensor_lr_betas": lambda p: torch.optim.Adam(
        p, lr=_t(0.01), betas=(_t(0.8), _t(0.95)), eps=1e-3, amsgrad=True
    ),
    "adamw_tensor_lr_fused": lambda p: torch.optim.AdamW(
        p, lr=_t(0.01), betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, fused=True
    ),
}
ALL_OPTIMIZERS = {**STUDENT_OPTIMIZERS, **ODD_OPTIMIZERS}
over_all_optimizers = pytest.mark.parametrize("opt_name", list(ALL_OPTIMIZERS))


@over_all_optimizers
def test_reference_update_matches_optimizer_step(opt_name):
    factory = ALL_OPTIMIZERS[opt_name]
    params = _leaf_params()
    opt = factory(params)
    for step in range(N_STEPS):
        grads = _gradients(step)
        if step == 1:  # a parameter without a gradient is left alone by both
            grads[2] = None
        before = [p.detach().clone() for p in params]
        state_before = _tensor_state(opt)
        expected = reference_update(opt, grads)
        # reference_update is pure: parameters and optimizer state are untouched
        for p, b in zip(params, before):
            assert torch.equal(p.detach(), b)
        state_after = _tensor_state(opt)
        assert state_after.keys() == state_before.keys()
        assert all(torch.equal(state_after[k], v) for k, v in state_before.items())

        _real_step(opt, params, grads)
        for p, e, b, g in zip(params, expected, before, grads):
            assert e.dtype == DT
            torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)
            assert torch.equal(p.detach(), b) == (g is None)  # moved iff it had a gradient


def _tensor_state(opt) -> dict:
    return {
        (i, k): v.clone()
        for i, s in enumerate(opt.state.values())
        for k, v in s.items()
        if torch.is_tensor(v)
    }


@over_all_optimizers
def test_reference_update_is_differentiable_in_the_gradient(opt_name):
    """The double-backward oracle relies on autograd seeing theta_{t+1} as a function of g."""
    params = _leaf_params()
    opt = ALL_OPTIMIZERS[opt_name](params)
    _real_step(opt, params, _gradients(0))  # non-trivial state
    grads = [g.requires_grad_(True) for g in _gradients(1)]
    new = reference_update(opt, grads)
    d = torch.autograd.grad(sum(n.sum() for n in new), grads)
    factors = update_factors(opt, params, [g.detach() for g in grads])
    for di, f in zip(d, factors):
        torch.testing.assert_close(
            di, torch.as_tensor(f, dtype=DT).expand_as(di), rtol=1e-10, atol=0
        )


@over_all_optimizers
def test_update_factors_match_finite_differences_of_optimizer_step(opt_name):
    factory = ALL_OPTIMIZERS[opt_name]
    params = _leaf_params()
    opt = factory(params)
    eps = 1e-6
    gen = torch.Generator().manual_seed(7)
    for step in range(N_STEPS):
        grads = _gradients(step)
        direction = [torch.randn(g.shape, generator=gen, dtype=DT) for g in grads]
        factors = update_factors(opt, params, grads)

        def stepped(sign, grads=grads, direction=direction):
            ps = [p.detach().clone().requires_grad_(True) for p in params]
            o = fresh_optimizer_like(factory, ps, opt)
            _real_step(o, ps, [g + sign * eps * d for g, d in zip(grads, direction)])
            return [p.detach() for p in ps]

        plus, minus = stepped(+1.0), stepped(-1.0)
        fd = torch.cat([((a - b) / (2 * eps)).reshape(-1) for a, b in zip(plus, minus)])
        analytic = torch.cat([(f * d).reshape(-1) for f, d in zip(factors, direction)])
        assert rel_err(analytic, fd) <= 1e-6, (opt_name, step, rel_err(analytic, fd))
        _real_step(opt, params, grads)


def test_factor_sign_follows_maximize():
    params = _leaf_params()
    grads = _gradients(0)
    plain = update_factors(torch.optim.SGD(params, lr=0.1), params, grads)
    flipped = update_factors(torch.optim.SGD(params, lr=0.1, maximize=True), params, grads)
    assert plain[0] == -0.1 and flipped[0] == 0.1


@pytest.mark.parametrize(
    "factory, expected",
    [
        (lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-3), -0.01 / 1e-3),
        (lambda p: torch.optim.RMSprop(p, lr=0.01, eps=1e-3, centered=True), -0.01 / 1e-3),
        (lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-3), -0.01 / 1e-3),
        (lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-3, amsgrad=True), -0.01 / 1e-3),
    ],
    ids=["rmsprop", "rmsprop_centered", "adam", "adam_amsgrad"],
)
def test_factor_at_an_exactly_zero_first_gradient_is_finite_and_correct(factory, expected):
    """At g = 0 with empty state the step is -lr * g / (c|g| + eps): the derivative is -lr / eps,
    not NaN (sqrt'(0)) and not 0. (A bias right before BatchNorm has exactly zero gradient.)"""
    params = _leaf_params()
    grads = _gradients(0)
    grads[1] = torch.zeros_like(grads[1])
    factors = update_factors(factory(params), params, grads)
    assert all(torch.isfinite(f).all() for f in factors)
    torch.testing.assert_close(factors[1], torch.full_like(grads[1], expected), rtol=1e-12, atol=0)
    # and finite differences of the real step agree (one-sided scale far below eps)
    h = 1e-10
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    o = factory(ps)
    _real_step(o, ps, [g + (h if i == 1 else 0.0) for i, g in enumerate(grads)])
    slope = (ps[1].detach() - params[1].detach()) / h
    torch.testing.assert_close(slope, torch.full_like(slope, expected), rtol=1e-5, atol=0)


def test_missing_gradient_has_zero_factor():
    params = _leaf_params()
    grads = _gradients(0)
    grads[0] = None
    factors = update_factors(torch.optim.Adam(params), params, grads)
    assert factors[0] == 0.0


def test_parameter_outside_the_optimizer_has_zero_factor():
    """update_factors is public: a parameter the optimizer does not hold is never moved by its
    step, so its factor is 0 (not an error), while the others keep theirs (-lr for plain SGD)."""
    params = _leaf_params()
    grads = _gradients(0)
    factors = update_factors(torch.optim.SGD(params[:2], lr=0.1), params, grads)
    assert factors[0] == -0.1 and factors[1] == -0.1
    assert factors[2] == 0.0


# ----------------------------------------------------------------------------- unsupported


class _MySGD(torch.optim.SGD):
    """A subclass may override step(): its factor is unknown."""


@pytest.mark.parametrize(
    "factory, name",
    [
        (lambda p: torch.optim.Adagrad(p, lr=0.1), "Adagrad"),
        (lambda p: _MySGD(p, lr=0.1), "_MySGD"),
        (lambda p: torch.optim.Adamax(p, lr=0.1), "Adamax"),
    ],
    ids=["adagrad", "sgd_subclass", "adamax"],
)
def test_unsupported_student_optimizer_is_refused_for_exact_but_fine_for_first_order(factory, name):
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
    with pytest.raises(UnsupportedOptimizerError, match=name):  # at construction, not mid-step
        MetaPseudoLabels(
            teacher, student, t_opt, factory(student.parameters()), estimator="double_backward"
        )
    with pytest.raises(UnsupportedOptimizerError) as info:
        MetaPseudoLabels(teacher, student, t_opt, factory(student.parameters()))
    message = str(info.value)
    assert name in message
    assert "first_order" in message
    for supported in ("SGD", "RMSprop", "Adam", "AdamW"):
        assert supported in message
    assert isinstance(info.value, MetaplError)  # the CLI's one-line error family

    with pytest.raises(UnsupportedOptimizerError):
        update_factors(factory([torch.zeros(2, requires_grad=True)]), [], [])
    with pytest.raises(UnsupportedOptimizerError):
        reference_update(factory([torch.zeros(2, requires_grad=True)]), [None])

    s_opt = factory(student.parameters())
    mpl = MetaPseudoLabels(teacher, student, t_opt, s_opt, estimator="first_order")
    before = [p.detach().clone() for p in student.parameters()]
    metrics = mpl.step(x_l, y_l, x_u)
    assert torch.isfinite(metrics["teacher_loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters()))
    assert all(p.grad is not None for p in teacher.parameters())


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_complex_student_parameters_are_refused(opt_cls):
    """Complex parameters have no real diagonal dU/dg; both entry points refuse them."""
    real = torch.zeros(2, requires_grad=True)
    cplx = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    opt = opt_cls([real, cplx], lr=0.1)
    with pytest.raises(UnsupportedOptimizerError, match="complex"):
        update_factors(opt, [real, cplx], [torch.ones(2), torch.ones(2, dtype=torch.complex64)])
    with pytest.raises(UnsupportedOptimizerError, match="complex"):
        reference_update(opt, [None, None])
