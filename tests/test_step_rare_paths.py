"""Behaviours of the library step that no other test reached (found by a coverage run of tests/):
each test names the code it holds and asserts what it does, against an independent oracle
(double backward, finite differences of the real step) or an exact message.

Code left out on purpose (no test can reach it on a CPU, or at all):

- ``RngState.restore``'s ``torch.cuda.set_rng_state`` (replay.py), ``labeled_graph.capture`` and the
  graph pool of ``LabeledGraph._try_capture`` (CUDA graphs) and, in ``AdamRule._moments``
  (update_rules.py), fused Adam's step count on a CUDA device run on CUDA only.
- ``replay.module_device`` of a module without parameters cannot be reached from the step, whose two
  models always hold a parameter their optimizer trains; the unit test below holds what it does for
  a direct caller of :class:`RestorePoint`.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from exact_checks import checked_exact_step
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
from metapl.errors import ConfigError, MetaplWarning
from metapl.mpl import double_backward_teacher_gradient
from metapl.mpl.replay import RestorePoint, module_device
from metapl.mpl.tangent import TangentTape

pytestmark = pytest.mark.usefixtures("single_torch_thread")

O = torch.optim
DT = torch.float64


def _sgd_mpl(teacher: nn.Module, student: nn.Module, **options) -> MetaPseudoLabels:
    """Teacher SGD (lr 0.1), student SGD with momentum (the ``sgd_momentum`` factory)."""
    return MetaPseudoLabels(
        teacher,
        student,
        O.SGD(teacher.parameters(), lr=0.1),
        STUDENT_OPTIMIZERS["sgd_momentum"](student.parameters()),
        **options,
    )


def _snapshot(mpl: MetaPseudoLabels) -> tuple:
    return copy.deepcopy(
        (
            mpl.teacher.state_dict(),
            mpl.student.state_dict(),
            mpl.teacher_optimizer.state_dict(),
            mpl.student_optimizer.state_dict(),
        )
    )


def _moved(before: dict[str, Tensor], after: dict[str, Tensor]) -> list[str]:
    return [k for k in after if not torch.equal(before[k], after[k])]


def _assert_unmoved(mpl: MetaPseudoLabels, before: tuple, rng: Tensor) -> None:
    """Neither model moved since ``before`` (a :func:`_snapshot`), and torch's CPU random stream
    is ``rng`` again."""
    after = _snapshot(mpl)
    assert all(not _moved(b, a) for b, a in zip(before[:2], after[:2]))
    assert torch.equal(rng, torch.get_rng_state())


def _teacher_grad(mpl: MetaPseudoLabels) -> Tensor:
    return flat(torch.zeros_like(p) if p.grad is None else p.grad for p in mpl.teacher.parameters())


# ----------------------------------------------------------------------------- step.py


def test_jvp_set_on_the_step_object_switches_the_path_and_keeps_the_gradient_exact():
    """The ``jvp`` setter of ``MetaPseudoLabels``: ``mpl.jvp = "auto"`` after construction makes the
    next exact step take J from the tangent tape, ``mpl.jvp = "forward_ad"`` takes it back; at every
    step the teacher's gradient is double backward's (1e-10) and finite differences' of the real
    step (1e-6). A typo is refused and leaves the mode as it was."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=4)
    mpl = _sgd_mpl(teacher, student, supervised_weight=0.0)
    gen = torch.Generator().manual_seed(0)
    factory = STUDENT_OPTIMIZERS["sgd_momentum"]
    for step, mode in enumerate(["forward_ad", "auto", "forward_ad"]):
        mpl.jvp = mode
        assert mpl.jvp == mode
        checked_exact_step(mpl, factory, x_l, y_l, x_u + 0.1 * step, seed=step, gen=gen)
        assert mpl.last_jvp_path == ("tape" if mode == "auto" else "forward_ad")
        assert mpl.jvp_fallback_reason is None
    with pytest.raises(ConfigError, match="jvp"):
        mpl.jvp = "tapee"
    assert mpl.jvp == "forward_ad"


class _FunctionalEmbedding(nn.Module):
    """Token ids -> ``F.embedding`` (sparse gradient when ``sparse`` is set) -> mean -> Linear:
    not an ``nn.Embedding``, so the construction's check of ``sparse=True`` cannot see it."""

    def __init__(self, vocab: int = 20, dim: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, dim, dtype=DT))
        self.fc = nn.Linear(dim, N_CLASSES, dtype=DT)
        self.sparse = False

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.embedding(x, self.weight, sparse=self.sparse).mean(dim=1))


def test_a_sparse_gradient_met_after_the_first_step_is_refused_before_the_student_steps():
    """The first exact step's checks refuse a sparse gradient (check_derivatives); one that appears
    only at a later step (the forward switched to ``sparse=True``) is met in the update pass
    (``MetaPseudoLabels._exact_student_step``). It is a ConfigError naming double backward as the
    way out, raised before the student's optimizer steps: both models' parameters and both
    optimizers' states are as they were (forward AD takes no sparse tangent, so the step could not
    have gone on)."""
    torch.manual_seed(0)
    teacher, student = _FunctionalEmbedding(), _FunctionalEmbedding()
    g = torch.Generator().manual_seed(1)
    x_l, x_u = torch.randint(0, 20, (6, 7), generator=g), torch.randint(0, 20, (8, 7), generator=g)
    y_l = torch.randint(0, N_CLASSES, (6,), generator=g)
    mpl = _sgd_mpl(teacher, student)
    mpl.step(x_l, y_l, x_u)
    student.sparse = True
    before = _snapshot(mpl)
    with pytest.raises(ConfigError, match=r"sparse gradient from the update pass.*double_backward"):
        mpl.step(x_l, y_l, x_u)
    after = _snapshot(mpl)
    assert all(not _moved(b, a) for b, a in zip(before[:2], after[:2]))
    assert str(before[2:]) == str(after[2:])  # the optimizers' states (momentum buffers)
    assert mpl.step_count == 1


# ----------------------------------------------------------------------------- clipping.py


class _LabeledOnly(nn.Module):
    """An MLP, then ``extra`` on a batch of ``rows`` examples only (x_l's): its parameters get no
    gradient from the student's update on x_u (g is None, its optimizer leaves them alone) but
    one from R (v is not None)."""

    def __init__(self, rows: int):
        super().__init__()
        self.body, self.extra, self.rows = MLP(), nn.Linear(N_CLASSES, N_CLASSES), rows

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return self.extra(h) if x.shape[0] == self.rows else h


def test_clipping_with_parameters_the_update_does_not_reach_gives_the_exact_gradient():
    """``NormClip.jacobian_times`` where a gradient is None: with clipping active, parameters that
    the update on x_u does not reach take no part in the norm and get no tangent (their factor is
    0), while R still depends on them. The exact step's teacher gradient equals double backward's
    (1e-10) and central differences of R through the real clipped step (1e-6), and the student moves
    as torch's clip_grad_norm_ + SGD move a copy of it."""
    teacher, _, x_l, y_l, x_u = make_problem("mlp", seed=3)
    torch.manual_seed(1)
    student = _LabeledOnly(len(x_l)).to(DT)
    factory, max_norm = STUDENT_OPTIMIZERS["sgd_nesterov_foreach"], 0.02
    pair = []
    for estimator in ("exact", "double_backward"):
        t, s = copy.deepcopy(teacher), copy.deepcopy(student)
        pair.append(
            MetaPseudoLabels(
                t,
                s,
                O.SGD(t.parameters(), lr=0.1),
                factory(s.parameters()),
                supervised_weight=0.0,
                estimator=estimator,
                student_max_grad_norm=max_norm,
            )
        )
    exact, oracle = pair
    args = (exact.student, exact.student_optimizer, factory, x_l, y_l, x_u)
    real = {"seed": 0, "student_max_grad_norm": max_norm}
    t_params = {n: p.detach().clone() for n, p in exact.teacher.named_parameters()}
    expected = student_after_real_step(exact.teacher, t_params, *args, **real)
    gen = torch.Generator().manual_seed(0)
    probe = FiniteDifferenceProbe(exact.teacher, *args, gen=gen, **real)
    for mpl in pair:
        torch.manual_seed(0)
        mpl.step(x_l, y_l, x_u)
    assert exact.student.extra.weight.grad is None  # the case under test: g is None there
    assert _teacher_grad(exact).norm() > 1e-6
    assert rel_err(_teacher_grad(exact), _teacher_grad(oracle)) <= 1e-10
    probe.check()
    moved = flat(exact.student.parameters()).detach()
    assert rel_err(moved, flat(expected.parameters()).detach()) <= 1e-12


class _UnusedTrained(MLP):
    """An MLP and a layer its forward never uses: the optimizer of the test below trains only
    that layer, the MLP's parameters require grad but no optimizer holds them."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(N_CLASSES, N_CLASSES)


@pytest.mark.parametrize("estimator", ["exact", "double_backward"])
def test_a_student_whose_optimizer_trains_nothing_its_forward_uses(estimator):
    """``NormClip.of`` of no gradient at all, and ``NormClip.jacobian_times`` where a gradient is
    None: a student whose trained parameters get no gradient from its update cannot move, so R does
    not depend on the teacher: the exact gradient of the MPL term is 0, as the double-backward
    oracle (``double_backward_teacher_gradient``) says. With clipping on, both exact estimators give
    that 0 and leave the student as it was.

    Bug found: ``estimator="double_backward"`` failed on its first step with torch's
    "`inputs` argument to `grad()` cannot be empty." (from its check of the gradient's
    derivative, which had no gradient to check); fixed in double_backward_checks.py."""
    teacher, base, x_l, y_l, x_u = make_problem("mlp", seed=5)
    student = _UnusedTrained().to(DT)
    student.load_state_dict(base.state_dict(), strict=False)
    torch.manual_seed(0)
    oracle = flat(
        double_backward_teacher_gradient(
            teacher, student, O.SGD(student.unused.parameters(), lr=0.3), x_l, y_l, x_u
        )
    )
    assert torch.equal(oracle, torch.zeros_like(oracle))
    mpl = MetaPseudoLabels(
        teacher,
        student,
        O.SGD(teacher.parameters(), lr=0.1),
        O.SGD(student.unused.parameters(), lr=0.3),
        supervised_weight=0.0,
        estimator=estimator,
        student_max_grad_norm=0.02,
    )
    params = flat(student.parameters()).detach().clone()
    for step in range(2):
        torch.manual_seed(step)
        mpl.step(x_l, y_l, x_u)
        assert torch.equal(_teacher_grad(mpl), torch.zeros_like(oracle))
    assert torch.equal(flat(student.parameters()), params)


# ----------------------------------------------------------------------------- update_rules.py


def test_capturable_is_refused_on_the_cpu_without_torchs_list_of_capturable_devices(
    monkeypatch,
):
    """``update_rules._capturable_devices``: a torch without ``_get_capturable_supported_devices``
    gets torch 2.13's list (cuda, xpu, hpu), which the refusal of ``capturable=True`` on a CPU
    parameter names; the check still refuses it at construction."""
    import torch.optim.optimizer as optimizer_module

    monkeypatch.delattr(optimizer_module, "_get_capturable_supported_devices")
    teacher, student, *_ = make_problem("mlp")
    s_opt = O.Adam(student.parameters(), lr=0.01, capturable=True)
    with pytest.raises(
        ConfigError,
        match=r"capturable=True, which torch supports for parameters on cuda, xpu, hpu, and "
        r"its parameter 'fc1.weight' is on cpu",
    ):
        MetaPseudoLabels(teacher, student, O.SGD(teacher.parameters(), lr=0.1), s_opt)


# ----------------------------------------------------------------------------- student_checks.py


class _MaskedMLP(MLP):
    """An MLP called as ``model(x)`` or ``model(x, mask)``; with ``pair`` set it returns
    ``(logits, mask)`` when given a mask."""

    def __init__(self, pair: bool = False):
        super().__init__()
        self.pair = pair

    def forward(self, x: Tensor, mask: Tensor | None = None):
        out = super().forward(x if mask is None else x * mask)
        return (out, mask) if mask is not None and self.pair else out


def test_a_student_that_returns_no_tensor_on_the_unlabeled_batch_only_is_told_so():
    """``student_checks.check_replayable`` on a forward that returns no tensor: the exact step tries
    the student on x_labeled first (a tensor of logits there); on x_unlabeled, called another way,
    it returns a tuple. The first replay check leaves that to the step's own check of logits, which
    names it (not an AttributeError from comparing the two forwards), with both models and torch's
    random stream as they were."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=1)
    t, s = _MaskedMLP().to(DT), _MaskedMLP(pair=True).to(DT)
    t.load_state_dict(teacher.state_dict())
    s.load_state_dict(student.state_dict())
    mpl = _sgd_mpl(t, s)
    before, rng = _snapshot(mpl), torch.get_rng_state()
    with pytest.raises(ConfigError, match="the student must return a tensor of logits.*tuple"):
        mpl.step(x_l, y_l, (x_u, torch.ones_like(x_u)))
    _assert_unmoved(mpl, before, rng)


def test_a_student_frozen_during_its_first_step_is_refused_with_nothing_moved():
    """``student_checks.check_derivatives`` with no trainable parameter: the student's trainable
    parameters are checked before the teacher's forward; one frozen after that (here by
    ``teacher_extra_loss``, run between the two) leaves the first step's adjoint check nothing to
    check, and the update pass refuses the student that cannot learn: a ConfigError, with both
    models and torch's random stream given back. (The guard is redundant: without it, the check's
    own ``check_learns`` gives the same refusal; this holds the behaviour.)"""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=2)

    def extra(logits) -> Tensor:
        student.requires_grad_(False)
        return logits.unlabeled.sum() * 0.0

    mpl = _sgd_mpl(teacher, student, teacher_extra_loss=extra)
    before, rng = _snapshot(mpl), torch.get_rng_state()
    with pytest.raises(ConfigError, match="the student's logits depend on no parameter"):
        mpl.step(x_l, y_l, x_u)
    _assert_unmoved(mpl, before, rng)


class _NoTangent(torch.autograd.Function):
    """tanh with a backward and no jvp: forward-mode AD cannot run it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _Switched(MLP):
    """An MLP whose hidden layer, from when ``mode`` is set, goes through ``_NoTangent``
    (``"function"``) or raises a NotImplementedError of its own on a dual tensor (``"own"``)."""

    mode: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.mode == "function":
            h = _NoTangent.apply(h)
        if self.mode == "own" and fwad.unpack_dual(h).tangent is not None:
            raise NotImplementedError("my layer takes no dual numbers")
        return self.fc2(self.drop(F.relu(self.bn(h))))


def _switched_problem() -> tuple[MetaPseudoLabels, Tensor, Tensor, Tensor]:
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=6)
    s = _Switched().to(DT)
    s.load_state_dict(student.state_dict())
    return _sgd_mpl(teacher, s), x_l, y_l, x_u


def test_an_error_of_the_students_own_in_the_first_adjoint_check_comes_as_it_is():
    """``student_checks.check_derivatives`` re-raising: a NotImplementedError that is not torch's
    "no forward AD" (the student's own) is not turned into a ConfigError about forward AD: it comes
    as raised, from the first step's checks, with both models and torch's random stream given
    back."""
    mpl, x_l, y_l, x_u = _switched_problem()
    mpl.student.mode = "own"
    before, rng = _snapshot(mpl), torch.get_rng_state()
    with pytest.raises(NotImplementedError, match="^my layer takes no dual numbers$"):
        mpl.step(x_l, y_l, x_u)
    _assert_unmoved(mpl, before, rng)


class _Complex(nn.Module):
    """A complex Linear whose logits are the real part: no floating-point parameter."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, N_CLASSES, dtype=torch.complex128)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.to(torch.complex128)).real


def test_a_student_without_floating_point_parameters_is_not_tried_and_trains_first_order():
    """``student_checks.check_student_takes`` compares each batch's dtype and device with the
    student's first floating-point parameter; a student of complex parameters has none (the exact
    estimators refuse it at construction), so nothing is tried or remembered, and the first-order
    step runs: its R_old and R_new are the student's labeled cross-entropy before and after its
    step, computed here independently."""
    teacher, _, x_l, y_l, x_u = make_problem("mlp", seed=7)
    torch.manual_seed(0)
    student = _Complex()
    mpl = _sgd_mpl(teacher, student, estimator="first_order")
    with torch.no_grad():
        r_old = F.cross_entropy(student(x_l), y_l)
    params = flat(student.parameters()).detach().clone()
    metrics = mpl.step(x_l, y_l, x_u)
    with torch.no_grad():
        r_new = F.cross_entropy(student(x_l), y_l)
    assert mpl._inputs_taken == set()
    assert not torch.equal(flat(student.parameters()), params)
    assert torch.allclose(metrics["student_labeled_before"], r_old, rtol=1e-12, atol=0)
    assert torch.allclose(metrics["student_labeled_after"], r_new, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- jvp.py


def test_an_operation_without_forward_ad_met_at_a_later_step_says_the_student_moved():
    """``JvpPaths.forward_ad``'s ConfigError: an operation without forward-mode AD that the
    student's forward takes only from a later step on (here a custom Function without jvp) escapes
    the first step's checks and fails in J's forward-AD pass, after the student's optimizer stepped.
    It is a ConfigError that names the Function and says so ("This step has moved the student, not
    the teacher's parameters": its BatchNorm statistics may have moved): the teacher's parameters
    and optimizer state are as they were, the student's parameters are not (documented: there is no
    cheap way back)."""
    mpl, x_l, y_l, x_u = _switched_problem()
    mpl.step(x_l, y_l, x_u)
    mpl.student.mode = "function"
    before = _snapshot(mpl)
    with pytest.raises(
        ConfigError,
        match=r"custom autograd\.Function without forward-mode AD.*"
        r"This step has moved the student, not the teacher's parameters$",
    ):
        mpl.step(x_l, y_l, x_u)
    after = _snapshot(mpl)
    teacher_params = [n for n, _ in mpl.teacher.named_parameters()]
    assert not set(_moved(before[0], after[0])) & set(teacher_params)
    assert str(before[2]) == str(after[2])
    assert "fc1.weight" in _moved(before[1], after[1])


def test_an_error_of_the_students_own_in_a_later_forward_ad_pass_comes_as_it_is():
    """``JvpPaths.forward_ad`` re-raising: at a later step, a NotImplementedError of the student's
    own in J's forward-AD pass is not turned into the "no forward AD" ConfigError: it comes as
    raised (after the student's step, like any error of its forward there), and the teacher's
    parameters are untouched."""
    mpl, x_l, y_l, x_u = _switched_problem()
    mpl.step(x_l, y_l, x_u)
    mpl.student.mode = "own"
    before = _snapshot(mpl)
    with pytest.raises(NotImplementedError, match="^my layer takes no dual numbers$"):
        mpl.step(x_l, y_l, x_u)
    after = _snapshot(mpl)
    teacher_params = [n for n, _ in mpl.teacher.named_parameters()]
    assert not set(_moved(before[0], after[0])) & set(teacher_params)


def test_a_tangent_pass_that_fails_at_its_first_use_falls_back_to_forward_ad(monkeypatch):
    """``JvpPaths.from_tape`` on a failed tangent pass: any error of the tangent pass (here
    injected: a RuntimeError from ``TangentTape.tangent``) at the first use of a traced graph for an
    input structure gives that structure up: with ``jvp="auto"`` J comes from forward AD, with a
    MetaplWarning and ``jvp_fallback_reason`` naming the error, and the teacher's gradient is still
    double backward's and finite differences'; the next step does not try the tape again. With
    ``jvp="tape"`` it is a ConfigError that names it."""

    def fails(self, *args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(TangentTape, "tangent", fails)
    reason = "the tangent pass fails (RuntimeError: injected failure)"
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=8)
    mpl = _sgd_mpl(
        copy.deepcopy(teacher), copy.deepcopy(student), jvp="auto", supervised_weight=0.0
    )
    gen = torch.Generator().manual_seed(0)
    factory = STUDENT_OPTIMIZERS["sgd_momentum"]
    with pytest.warns(MetaplWarning, match=r"forward-mode AD: the tangent pass fails"):
        checked_exact_step(mpl, factory, x_l, y_l, x_u, seed=0, gen=gen)
    assert (mpl.last_jvp_path, mpl.jvp_fallback_reason) == ("forward_ad", reason)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetaplWarning)  # said once
        checked_exact_step(mpl, factory, x_l, y_l, x_u + 0.1, seed=1, gen=gen)
    assert (mpl.last_jvp_path, mpl.jvp_fallback_reason) == ("forward_ad", reason)

    strict = _sgd_mpl(teacher, student, jvp="tape")
    with pytest.raises(ConfigError, match=r"jvp='tape'.*tangent pass fails \(RuntimeError"):
        strict.step(x_l, y_l, x_u)


# ----------------------------------------------------------------------------- replay.py


def test_a_restore_point_over_a_module_without_parameters_gives_back_its_buffers_and_the_cpu_stream():
    """``replay.module_device``, by a direct caller (the step's own models always hold a parameter):
    a module without parameters is taken to be on the CPU, so a RestorePoint over a BatchNorm
    without affine parameters gives back its running statistics and the CPU random stream."""
    bn = nn.BatchNorm1d(4, affine=False)
    assert module_device(bn) == torch.device("cpu")
    point = RestorePoint([bn])
    stats, rng = copy.deepcopy(bn.state_dict()), torch.get_rng_state()
    bn(torch.randn(5, 4))
    assert _moved(stats, bn.state_dict()) and not torch.equal(rng, torch.get_rng_state())
    point.restore()
    assert not _moved(stats, bn.state_dict())
    assert torch.equal(rng, torch.get_rng_state())
