"""MetaPseudoLabels used in odd but plausible ways: each either gives the exact teacher gradient or
raises a MetaplError before anything moves.

The oracle here is the *real* ``optimizer.step()`` of a copy of the student and optimizer (central
finite differences of R(theta_{t+1}(Psi)) along random directions, in float64), so that it sees
whatever the user's modules, hooks and optimizer really do.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpl_helpers import (
    central_differences,
    cloned_buffers,
    flat,
    make_problem,
    rel_err,
    token_batches,
)
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import metapl.mpl.step
from metapl import MetaPseudoLabels
from metapl.errors import ConfigError
from metapl.mpl import double_backward_teacher_gradient

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64


def _mpl(teacher, student, student_optimizer=None, **kwargs) -> MetaPseudoLabels:
    if student_optimizer is None:
        student_optimizer = torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9)
    return MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        student_optimizer,
        supervised_weight=0.0,
        **kwargs,
    )


def _real_step_derivatives(mpl: MetaPseudoLabels, x_l, y_l, x_u, seed: int, n: int = 3):
    """(directions, d R(theta_{t+1}) / d Psi along each) with a real step of copies of the student
    and its optimizer; the step's random numbers in MetaPseudoLabels.step's order."""
    teacher, pair = mpl.teacher, (mpl.student, mpl.student_optimizer)
    g = torch.Generator().manual_seed(123)
    directions = [
        {
            name: torch.randn(p.shape, generator=g, dtype=p.dtype)
            for name, p in teacher.named_parameters()
        }
        for _ in range(n)
    ]
    base = {name: p.detach() for name, p in teacher.named_parameters()}

    def objective(shift: dict[str, Tensor]) -> float:
        student, optimizer = copy.deepcopy(pair)
        torch.manual_seed(seed)
        with torch.no_grad():
            params = {name: base[name] + shift[name] for name in base}
            logits = functional_call(
                teacher, {**cloned_buffers(teacher), **params}, (torch.cat([x_l, x_u]),)
            )
            q = F.softmax(logits[len(x_l) :] / mpl.temperature, dim=-1)
        optimizer.zero_grad(set_to_none=True)
        (-(q * F.log_softmax(student(x_u), dim=-1)).sum(-1).mean()).backward()
        optimizer.step()
        with torch.no_grad():
            out = functional_call(student, cloned_buffers(student), (x_l,))
            return float(F.cross_entropy(out, y_l.long()))

    return directions, central_differences(objective, directions, 1e-6)


def _check_step_against_the_real_step(mpl: MetaPseudoLabels, x_l, y_l, x_u, seed: int) -> float:
    """One step; the relative error of the teacher's gradient along the directions."""
    directions, expected = _real_step_derivatives(mpl, x_l, y_l, x_u, seed)
    torch.manual_seed(seed)
    mpl.step(x_l, y_l, x_u)
    grads = dict(mpl.teacher.named_parameters())
    got = torch.tensor(
        [sum(float((grads[n].grad * d[n]).sum()) for n in d) for d in directions], dtype=DT
    )
    return rel_err(got, expected)


# ----------------------------------------------------------------------------- frozen parameters


@pytest.mark.parametrize(
    "estimator, jvp",
    [("exact", "forward_ad"), ("exact", "tape"), ("double_backward", "forward_ad")],
)
@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw"])
def test_a_parameter_frozen_after_construction_is_left_out_exactly(estimator, jvp, optimizer):
    """``requires_grad_(False)`` on a parameter its optimizer still holds (fine-tuning schedules
    do it): the optimizer leaves it alone, and so must the exact step. The exact estimator used to
    fail in autograd after the student had moved; double_backward moved it in its graph and gave
    a teacher gradient 2% off, silently; the oracle function did the same."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=2)
    make = {
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, eps=1e-3, weight_decay=0.1),
    }[optimizer]
    mpl = _mpl(teacher, student, make(student.parameters()), estimator=estimator, jvp=jvp)
    assert _check_step_against_the_real_step(mpl, x_l, y_l, x_u, seed=0) < 1e-6
    student.fc1.weight.requires_grad_(False)
    frozen = student.fc1.weight.detach().clone()
    oracle_models = copy.deepcopy((teacher, student, mpl.student_optimizer))
    assert _check_step_against_the_real_step(mpl, x_l, y_l, x_u, seed=1) < 1e-6
    assert torch.equal(student.fc1.weight, frozen)
    got = flat([p.grad for p in teacher.parameters()])
    torch.manual_seed(1)
    oracle = double_backward_teacher_gradient(*oracle_models, x_l, y_l, x_u)
    assert rel_err(got, flat(oracle)) < 1e-10
    student.fc1.weight.requires_grad_(True)  # and back
    assert _check_step_against_the_real_step(mpl, x_l, y_l, x_u, seed=2) < 1e-6


def test_a_student_with_nothing_trainable_is_a_config_error():
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student)
    for p in student.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="requires grad"):
        mpl.step(x_l, y_l, x_u)
    with pytest.raises(ConfigError, match="requires grad"):
        _mpl(teacher, student)


# ----------------------------------------------------------------------------- hooks


def _param_hook(teacher, student):
    student.fc2.weight.register_hook(lambda g: 0.5 * g)


def _post_accumulate_hook(teacher, student):
    def halve(p):
        p.grad.mul_(0.5)

    student.fc2.weight.register_post_accumulate_grad_hook(halve)


def _module_backward_pre_hook(teacher, student):
    weights = torch.linspace(0.2, 2.0, 3, dtype=DT)
    student.fc2.register_full_backward_pre_hook(lambda m, grad_out: (grad_out[0] * weights,))


def _optimizer_pre_hook(mpl):
    mpl.student_optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: (
            torch.nn.utils.clip_grad_norm_(mpl.student.parameters(), 0.05) and None
        )
    )


def _optimizer_post_hook(mpl):
    def max_norm(opt, args, kwargs):
        with torch.no_grad():
            w = mpl.student.fc2.weight
            w.div_(w.norm(dim=1, keepdim=True).clamp_min(0.3) / 0.3)

    mpl.student_optimizer.register_step_post_hook(max_norm)


@pytest.mark.parametrize(
    "on_models, on_mpl",
    [
        (_param_hook, None),
        (_post_accumulate_hook, None),
        (_module_backward_pre_hook, None),
        (None, _optimizer_pre_hook),
        (None, _optimizer_post_hook),
    ],
    ids=["param_hook", "post_accumulate", "module_backward_pre", "step_pre", "step_post"],
)
def test_hooks_that_change_the_students_update_are_config_errors(on_models, on_mpl):
    """Gradient clipping in a step pre-hook, a max-norm projection in a post-hook, a gradient hook:
    each changes U(g) or g where the exact gradient cannot see it (measured before this check:
    the teacher's gradient 5-46% off the real step's, silently). At construction and when added
    later; the first-order estimator, which needs no update rule, takes them."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=3)
    if on_models is not None:
        on_models(teacher, student)
        with pytest.raises(ConfigError, match="first_order"):
            _mpl(teacher, student)
    else:
        mpl = _mpl(teacher, student)
        mpl.step(x_l, y_l, x_u)
        on_mpl(mpl)
        before = flat(student.parameters()).clone()
        with pytest.raises(ConfigError, match="hook"):
            mpl.step(x_l, y_l, x_u)
        assert torch.equal(flat(student.parameters()), before)
    first_order = _mpl(teacher, student, estimator="first_order")
    if on_mpl is not None:
        on_mpl(first_order)
    first_order.step(x_l, y_l, x_u)


@pytest.mark.parametrize("estimator", ["exact", "double_backward"])
def test_global_pre_and_backward_hooks_are_refused_and_a_global_post_hook_is_not(estimator):
    """docs/library.md: a global step pre-hook runs before every optimizer's step, the student's
    too (gradient clipping there is invisible to the exact gradient), and a global module
    backward hook or pre-hook in every backward: a ConfigError at construction. Global post-hooks are not checked (torch.profiler may install one): the step
    runs, and the hook with it."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=3)
    for register, name in (
        (register_optimizer_step_pre_hook, "global optimizer step pre-hook"),
        (nn.modules.module.register_module_full_backward_hook, "global module backward hook"),
        (nn.modules.module.register_module_full_backward_pre_hook, "global module backward hook"),
    ):
        handle = register(lambda *a: None)
        try:
            with pytest.raises(ConfigError, match=name):
                _mpl(teacher, student, estimator=estimator)
        finally:
            handle.remove()
    calls = []
    handle = register_optimizer_step_post_hook(lambda *a: calls.append(1))
    try:
        _mpl(teacher, student, estimator=estimator).step(x_l, y_l, x_u)
    finally:
        handle.remove()
    assert len(calls) == 2  # the student's step and the teacher's


# ----------------------------------------------------------------------------- buffers


class CountingMLP(nn.Module):
    """A forward that updates a buffer it reads: a step counter scaling a hidden layer (as a
    scheduled noise or drop rate would be)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.calls += 1
        return self.fc2(torch.tanh(self.fc1(x) * (0.5 + 0.5 * self.calls)))


@pytest.mark.parametrize(
    "estimator, jvp",
    [("exact", "forward_ad"), ("exact", "auto"), ("double_backward", "forward_ad")],
)
def test_a_buffer_the_forward_updates_and_reads_keeps_the_gradient_exact(estimator, jvp):
    """J differentiates the update pass, so it starts from the buffers that pass started from (it
    used to start one update later: 8-20% off). fx tracing (jvp='auto') must not bump the buffer,
    nor bake its value into a graph that the student then trains with (15% off)."""
    _, _, x_l, y_l, x_u = make_problem("mlp", seed=4)
    torch.manual_seed(0)
    teacher, student = CountingMLP().to(DT), CountingMLP().to(DT)
    mpl = _mpl(teacher, student, estimator=estimator, jvp=jvp)
    for seed in range(3):
        oracle_models = copy.deepcopy((teacher, student, mpl.student_optimizer))
        assert _check_step_against_the_real_step(mpl, x_l, y_l, x_u, seed) < 1e-6
        torch.manual_seed(seed)
        oracle = double_backward_teacher_gradient(*oracle_models, x_l, y_l, x_u)
        got = flat([p.grad for p in teacher.parameters()])
        assert rel_err(got, flat(oracle)) < 1e-10
    assert float(student.calls) == 3  # one update pass per step, nothing else
    with pytest.raises(ConfigError, match="buffer 'calls'"):
        _mpl(CountingMLP().to(DT), CountingMLP().to(DT), jvp="tape")


# ----------------------------------------------------------------------------- step() inputs


@pytest.mark.parametrize(
    "loss",
    [lambda lg: lg.unlabeled.logsumexp(-1), lambda lg: None, lambda lg: 0.0],
    ids=["per_example", "none", "float"],
)
def test_a_teacher_extra_loss_that_is_not_a_scalar_fails_before_the_student_moves(loss):
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student, teacher_extra_loss=loss)
    before = flat(student.parameters()).clone()
    with pytest.raises(ConfigError, match="scalar"):
        mpl.step(x_l, y_l, x_u)
    assert torch.equal(flat(student.parameters()), before)


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int16, torch.uint8, torch.int8, torch.uint16, torch.uint64]
)
@pytest.mark.parametrize("check_inputs", [True, False])
def test_labels_of_any_integer_dtype_give_the_same_step(dtype, check_inputs):
    """int16 and uint8 labels passed the checks, then failed in the loss's gather after the
    student had moved; int8 (and uint16 to uint64) were refused as "not integer class
    indices"."""
    grads = []
    for labels_dtype in (torch.int64, dtype):
        teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=5)
        mpl = _mpl(teacher, student, check_inputs=check_inputs)
        torch.manual_seed(0)
        mpl.step(x_l, y_l.to(labels_dtype), x_u)
        grads.append(flat([p.grad for p in teacher.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_step_inside_no_grad_is_the_same_step_and_inference_mode_is_an_error():
    grads = []
    for context in (torch.enable_grad, torch.no_grad):
        teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=6)
        mpl = _mpl(teacher, student)
        torch.manual_seed(0)
        with context():
            mpl.step(x_l, y_l, x_u)
        grads.append(flat([p.grad for p in teacher.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    before = flat(student.parameters()).clone()
    with torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
        mpl.step(x_l, y_l, x_u)
    assert torch.equal(flat(student.parameters()), before)


# ----------------------------------------------------------------------------- zero gradients


class DeadUnitMLP(nn.Module):
    """Linear -> ReLU -> Linear with hidden unit 0 dead (never active): its weights' gradients are
    exactly 0, as a dead ReLU unit's are in training."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)
        with torch.no_grad():
            self.fc1.weight[0] = 0.0
            self.fc1.bias[0] = -1.0

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=0.01, eps=1e-3, weight_decay=0.1),
        lambda p: torch.optim.RMSprop(p, lr=0.01, eps=1e-3, centered=True, momentum=0.5),
    ],
    ids=["adamw", "rmsprop_centered"],
)
def test_exactly_zero_gradient_elements_do_not_poison_the_double_backward_step(make):
    """A second moment of exactly 0 (first step, dead unit): the double-backward estimator and the
    oracle used to differentiate sqrt at 0 and give a NaN teacher gradient."""
    _, _, x_l, y_l, x_u = make_problem("mlp", seed=7)
    grads = []
    for estimator in ("exact", "double_backward"):
        torch.manual_seed(0)
        teacher, student = DeadUnitMLP().to(DT), DeadUnitMLP().to(DT)
        mpl = _mpl(teacher, student, make(student.parameters()), estimator=estimator)
        oracle_models = copy.deepcopy((teacher, student, mpl.student_optimizer))
        torch.manual_seed(0)
        mpl.step(x_l, y_l, x_u)
        assert student.fc1.weight.grad is not None and student.fc2.weight.grad[:, 0].eq(0).all()
        grads.append(flat([p.grad for p in teacher.parameters()]))
    torch.manual_seed(0)
    oracle = flat(double_backward_teacher_gradient(*oracle_models, x_l, y_l, x_u))
    assert torch.isfinite(oracle).all() and torch.isfinite(grads[1]).all()
    assert rel_err(grads[1], grads[0]) < 1e-10 and rel_err(oracle, grads[0]) < 1e-10


def test_an_op_without_forward_ad_names_the_estimators_that_work():
    """spectral_norm normalizes with an out= division, which forward AD cannot go through: a
    ConfigError that says what to use, instead of autograd's NotImplementedError."""
    torch.manual_seed(0)

    def student():
        layer = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 8))
        return nn.Sequential(layer, nn.ReLU(), nn.Linear(8, 3))

    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x_l, y_l, x_u = torch.randn(5, 4), torch.randint(0, 3, (5,)), torch.randn(7, 4)
    for jvp in ("forward_ad", "auto"):
        refused = student()
        before = copy.deepcopy(refused.state_dict())
        with pytest.raises(
            ConfigError, match="without forward-mode AD.*estimator='double_backward'"
        ):
            _mpl(teacher, refused, jvp=jvp).step(x_l, y_l, x_u)
        # found before the first step: the student did not move (it did, before)
        assert all(torch.equal(before[k], v) for k, v in refused.state_dict().items())
        assert all(p.grad is None for p in teacher.parameters())
    _mpl(teacher, student(), estimator="double_backward").step(x_l, y_l, x_u)
    assert all(torch.isfinite(p.grad).all() for p in teacher.parameters())


class _OwnGeneratorDropout(nn.Module):
    """Dropout drawing from its own torch.Generator, which the step cannot replay."""

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(5)

    def forward(self, x):
        mask = torch.rand(x.shape, generator=self.generator, dtype=x.dtype) > 0.5
        return x * mask * 2


class _OwnGeneratorSlightNoise(nn.Module):
    """Noise of 2% from its own torch.Generator: the logits of two forwards differ by about 1%,
    far below another dropout mask's O(0.1-1), and J is still another function's."""

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(5)

    def forward(self, x):
        return x + 0.02 * torch.randn(x.shape, generator=self.generator, dtype=x.dtype)


class _NumpyDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.random = np.random.RandomState(5)

    def forward(self, x):
        return x * torch.from_numpy(self.random.rand(*x.shape) > 0.5).to(x.dtype) * 2


class _PythonRandomDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.random = random.Random(5)

    def forward(self, x):
        mask = torch.tensor([self.random.random() > 0.5 for _ in range(x.numel())])
        return x * mask.reshape(x.shape).to(x.dtype) * 2


@pytest.mark.parametrize(
    "dropout",
    [_OwnGeneratorDropout, _OwnGeneratorSlightNoise, _NumpyDropout, _PythonRandomDropout],
)
def test_random_numbers_the_step_cannot_replay_are_a_config_error(dropout):
    """J would come from another dropout mask than the update pass's (the teacher's gradient was
    20-26% off the double-backward oracle, silently); double backward needs no replay."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).to(DT)
    student = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), dropout(), nn.Linear(16, 3)).to(DT)
    x_l, y_l, x_u = (
        torch.randn(6, 4, dtype=DT),
        torch.randint(0, 3, (6,)),
        torch.randn(9, 4, dtype=DT),
    )
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(ConfigError, match="other outputs for the same input.*double_backward"):
        _mpl(teacher, copy.deepcopy(student)).step(x_l, y_l, x_u)
    oracle_student = copy.deepcopy(student)
    optimizer = torch.optim.SGD(oracle_student.parameters(), lr=0.2, momentum=0.9)
    oracle = flat(
        double_backward_teacher_gradient(teacher, oracle_student, optimizer, x_l, y_l, x_u)
    )
    _mpl(teacher, student, estimator="double_backward").step(x_l, y_l, x_u)
    assert rel_err(flat(p.grad for p in teacher.parameters()), oracle) < 1e-12
    assert not all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


@pytest.mark.parametrize("estimator", ["exact", "double_backward", "first_order"])
def test_a_labeled_batch_of_one_the_students_batchnorm_refuses_fails_before_anything_moves(
    estimator,
):
    """BatchNorm1d in training mode cannot take one example. The student met the labeled batch
    only after its step: torch's ValueError came with the student moved and the teacher not."""
    _, student, x_l, y_l, x_u = make_problem("mlp")
    teacher = nn.Sequential(nn.Linear(x_u.shape[1], 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    mpl = _mpl(teacher, student, estimator=estimator)
    state = {n: t.clone() for m in (teacher, student) for n, t in m.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(ConfigError, match="labeled batch of one example"):
        mpl.step(x_l[:1], y_l[:1], x_u)
    now = {n: t for m in (teacher, student) for n, t in m.state_dict().items()}
    assert all(torch.equal(state[n], now[n]) for n in state)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("estimator", ["exact", "first_order"])
def test_a_labeled_batch_of_one_the_student_can_take_gives_the_unchecked_step(
    estimator, monkeypatch
):
    """BatchNorm2d takes one image of several pixels: the check's trial forward (dropout draws
    included) leaves the step's random numbers, gradient and running statistics as they were
    (metapl.mpl.student_checks.check_student_takes)."""
    results = []
    for check in (True, False):
        teacher, student, x_l, y_l, x_u = make_problem("conv", seed=3)
        if not check:
            monkeypatch.setattr(metapl.mpl.step, "check_student_takes", lambda *a: None)
        mpl = _mpl(teacher, student, estimator=estimator)
        torch.manual_seed(7)
        mpl.step(x_l[:1], y_l[:1], x_u)
        results.append(
            (
                flat([p.grad for p in teacher.parameters()]),
                flat(student.state_dict().values()),
                torch.get_rng_state(),
            )
        )
    for checked, unchecked in zip(*results):
        assert torch.equal(checked, unchecked)


@pytest.mark.parametrize("jvp", ["forward_ad", "auto"])
def test_the_first_steps_checks_leave_training_as_it_was(jvp, monkeypatch):
    """The checks before the first exact step (replay, forward AD) draw no random numbers and
    touch no buffer: three steps give the same teacher, student and random stream without them."""
    import metapl.mpl.step as step_module

    results = []
    for check in (True, False):
        if not check:
            monkeypatch.setattr(step_module, "check_derivatives", lambda *a: None)
            monkeypatch.setattr(step_module, "check_replayable", lambda *a: None)
        teacher, student, x_l, y_l, x_u = make_problem("conv", seed=4)
        mpl = _mpl(teacher, student, jvp=jvp)
        torch.manual_seed(9)
        for _ in range(3):
            mpl.step(x_l, y_l, x_u)
        results.append(
            (flat(teacher.state_dict().values()), flat(student.state_dict().values()))
            + (torch.get_rng_state(),)
        )
    for checked, unchecked in zip(*results):
        assert torch.equal(checked, unchecked)


# ----------------------------------------------------------------------------- shapes and sharing


class _Squeezed(nn.Module):
    """A model whose logits are not [batch, C]: ``[batch]`` or ``[batch, C, 1]``."""

    def __init__(self, model: nn.Module, how: str):
        super().__init__()
        self.model, self.how = model, how

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out[:, 0] if self.how == "batch" else out.unsqueeze(-1)


def _student_state(student: nn.Module) -> Tensor:
    return flat([*student.parameters(), *student.buffers()]).clone()


@pytest.mark.parametrize("how", ["batch", "trailing_one"])
@pytest.mark.parametrize("who", ["teacher", "student"])
def test_logits_that_are_not_one_row_per_example_fail_before_the_student_moves(how, who):
    """Logits [batch] (a squeezed binary output) or [batch, C, 1]: the softmax ran over the wrong
    dimension, the student moved on that, then the teacher's supervised loss failed in gather
    (a raw RuntimeError after the student's step)."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=4)
    if who == "teacher":
        teacher = _Squeezed(teacher, how)
    student = _Squeezed(student, how) if who == "student" else student
    mpl = _mpl(teacher, student)
    before = flat(student.parameters()).clone()
    with pytest.raises(ConfigError, match="one row of class logits per example|same classes"):
        mpl.step(x_l, y_l, x_u)
    assert torch.equal(flat(student.parameters()), before)
    assert not mpl.student_optimizer.state


def test_one_logit_per_example_is_refused_also_when_the_batch_has_as_many_examples_as_classes():
    """A student's logits [batch] against the teacher's [batch, C]: with 3 unlabeled examples of 3
    classes the class counts agree, and the soft cross-entropy broadcast [3] against [3, 3] and
    stepped the student on that, silently."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=4)
    mpl = _mpl(teacher, _Squeezed(student, "batch"))
    before = flat(student.parameters()).clone()
    # (the exact step tries the labeled batch first: its logits [6] are refused the same way)
    with pytest.raises(ConfigError, match=r"the student's logits on x_\w+ have shape \((3|6),\)"):
        mpl.step(x_l, y_l, x_u[:3])
    assert torch.equal(flat(student.parameters()), before)
    assert not mpl.student_optimizer.state


class _Pooled(nn.Module):
    """A teacher that averages its logits over the batch: [1, C] whatever the batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).mean(dim=0, keepdim=True)


def test_teacher_logits_for_another_number_of_examples_fail_before_the_student_runs():
    """Images of two sizes: one teacher forward per batch, whose [1, C] logits are not one row per
    example. The student's forward ran on the targets (its running statistics moved) before its
    loss failed; now nothing of the student runs."""
    teacher, student, x_l, y_l, _ = make_problem("conv", seed=5)
    x_u = torch.randn(3, 3, 7, 7, dtype=DT, generator=torch.Generator().manual_seed(1))
    mpl = _mpl(_Pooled(teacher), student)
    before = _student_state(student)
    with pytest.raises(
        ConfigError, match=r"^the teacher's logits on the labeled batch have shape \(1, 3\)"
    ):
        mpl.step(x_l, y_l, x_u.to(x_l.device))
    assert torch.equal(_student_state(student), before)


@pytest.mark.parametrize("which", ["teacher_x_labeled", "teacher_x_unlabeled"])
def test_a_teacher_view_of_another_batch_size_is_a_data_error_before_anything_moves(which):
    """teacher_x_labeled / teacher_x_unlabeled with more or fewer examples than the student's
    batch: the labeled one failed in the teacher's CE after the student had moved, the unlabeled one
    inside the student's loss; both are a DataError before any forward now."""
    from metapl.errors import DataError

    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=5)
    mpl = _mpl(teacher, student)
    before = _student_state(student), flat([*teacher.parameters(), *teacher.buffers()]).clone()
    x = {"teacher_x_labeled": x_l, "teacher_x_unlabeled": x_u}[which]
    with pytest.raises(DataError, match=which):
        mpl.step(x_l, y_l, x_u, **{which: x[:-1]})
    assert torch.equal(_student_state(student), before[0])
    assert torch.equal(flat([*teacher.parameters(), *teacher.buffers()]), before[1])
    mpl.step(x_l, y_l, x_u, **{which: x.clone()})  # the same examples: fine


@pytest.mark.parametrize("trained_by", ["student", "teacher", "both"])
def test_a_parameter_the_teacher_and_student_share_and_train_is_a_config_error(trained_by):
    """A layer shared by both models: the student's optimizer moved the teacher's weight in place
    (its backward then failed), or the teacher's update moved the student's function where no
    estimator sees it (the double-backward step was 20x off the real objective)."""
    teacher, student, *_ = make_problem("mlp", seed=6)
    student.fc2 = teacher.fc2
    shared = {id(p) for p in teacher.fc2.parameters()}
    teacher_own = [p for p in teacher.parameters() if id(p) not in shared]
    student_own = [p for p in student.parameters() if id(p) not in shared]
    t_params = teacher_own if trained_by == "student" else list(teacher.parameters())
    s_params = student_own if trained_by == "teacher" else list(student.parameters())
    with pytest.raises(ConfigError, match="share the parameter 'fc2.weight'"):
        MetaPseudoLabels(
            teacher, student, torch.optim.SGD(t_params, lr=0.1), torch.optim.SGD(s_params, lr=0.1)
        )


def test_a_shared_parameter_added_to_the_students_optimizer_later_is_refused_before_it_moves():
    """add_param_group after construction is followed; a parameter the teacher shares came in
    unchecked that way."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=6)
    student.fc2 = teacher.fc2
    shared = {id(p) for p in teacher.fc2.parameters()}
    student_own = [p for p in student.parameters() if id(p) not in shared]
    teacher_own = [p for p in teacher.parameters() if id(p) not in shared]
    s_opt = torch.optim.SGD(student_own, lr=0.1)
    mpl = MetaPseudoLabels(teacher, student, torch.optim.SGD(teacher_own, lr=0.1), s_opt)
    s_opt.add_param_group({"params": list(teacher.fc2.parameters())})
    before = flat(student.parameters()).clone()
    with pytest.raises(ConfigError, match="share the parameter 'fc2.weight'"):
        mpl.step(x_l, y_l, x_u)
    assert torch.equal(flat(student.parameters()), before)


@pytest.mark.parametrize("held", [False, True], ids=["in_neither_optimizer", "in_both"])
def test_a_frozen_parameter_the_models_share_is_allowed(held):
    """Shared and frozen (requires_grad off): a constant for both models, nothing to refuse, also
    when both optimizers were made from their model's parameters(), as usual. It stays as it was,
    and both models move as the double-backward oracle moves them."""
    problem = make_problem("mlp", seed=6, dtype=torch.float64)
    after = {}
    for estimator in ("exact", "double_backward"):
        teacher, student, x_l, y_l, x_u = copy.deepcopy(problem)
        torch.manual_seed(0)  # the same dropout masks in both runs
        teacher.fc1.weight.requires_grad_(False)
        student.fc1.weight = teacher.fc1.weight
        shared = teacher.fc1.weight.detach().clone()
        trainable = [p for p in student.parameters() if held or p.requires_grad]
        mpl = MetaPseudoLabels(
            teacher,
            student,
            torch.optim.SGD([p for p in teacher.parameters() if held or p.requires_grad], lr=0.1),
            torch.optim.SGD(trainable, lr=0.2, momentum=0.9),
            estimator=estimator,
        )
        for _ in range(2):
            mpl.step(x_l, y_l, x_u)
        assert torch.equal(teacher.fc1.weight, shared)
        after[estimator] = [
            p.detach().clone() for p in (*teacher.parameters(), *student.parameters())
        ]
    moved = [p for p in problem[0].parameters()] + [p for p in problem[1].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after["exact"], moved))
    for a, b in zip(after["exact"], after["double_backward"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_shared_parameter_both_optimizers_hold_unfrozen_later_is_refused_before_it_moves():
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=6)
    teacher.fc1.weight.requires_grad_(False)
    student.fc1.weight = teacher.fc1.weight
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
    mpl = MetaPseudoLabels(teacher, student, t_opt, torch.optim.SGD(student.parameters(), lr=0.1))
    mpl.step(x_l, y_l, x_u)
    teacher.fc1.weight.requires_grad_(True)
    before = flat(student.parameters()).clone()
    with pytest.raises(ConfigError, match="share the parameter 'fc1.weight', which an optimizer"):
        mpl.step(x_l, y_l, x_u)
    assert torch.equal(flat(student.parameters()), before)


class _Tokens(nn.Module):
    def __init__(self, sparse: bool = False):
        super().__init__()
        self.emb = nn.Embedding(20, 6, sparse=sparse)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.emb(ids)).mean(1))


def test_a_student_with_sparse_gradients_fails_before_it_moves():
    """nn.Embedding(sparse=True): forward AD cannot take the sparse w, and the step failed in
    make_dual after the student's optimizer had stepped. Refused at construction, and at the step
    when switched on later (or when a functional F.embedding(sparse=True) makes one)."""
    torch.manual_seed(0)
    teacher, student = _Tokens().to(DT), _Tokens(sparse=True).to(DT)
    # the way out that stays exact is named (it offered only first_order)
    with pytest.raises(ConfigError, match="sparse.*estimator='double_backward'"):
        _mpl(teacher, student, torch.optim.SGD(student.parameters(), lr=0.2))
    student.emb.sparse = False
    mpl = _mpl(teacher, student, torch.optim.SGD(student.parameters(), lr=0.2))
    g = torch.Generator().manual_seed(1)
    x_l, x_u = torch.randint(0, 20, (6, 7), generator=g), torch.randint(0, 20, (8, 7), generator=g)
    y_l = torch.randint(0, 3, (6,), generator=g)
    mpl.step(x_l, y_l, x_u)
    student.emb.sparse = True
    before = flat(student.parameters()).clone()
    with pytest.raises(ConfigError, match="sparse"):
        mpl.step(x_l, y_l, x_u)
    assert torch.equal(flat(student.parameters()), before)
    student.emb.sparse = False
    functional = _mpl(teacher, student, torch.optim.SGD(student.parameters(), lr=0.2))
    student.emb.forward = lambda ids: F.embedding(ids, student.emb.weight, sparse=True)
    with pytest.raises(ConfigError, match="sparse gradient"):
        functional.step(x_l, y_l, x_u)
    assert torch.equal(flat(student.parameters()), before)


class _Bags(nn.Module):
    def __init__(self, sparse: bool = False):
        super().__init__()
        self.emb = nn.EmbeddingBag(20, 6, sparse=sparse)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.emb(ids)))


def _models_and_rng(*models: nn.Module) -> list[Tensor]:
    return [*(t.clone() for m in models for t in m.state_dict().values()), torch.get_rng_state()]


@pytest.mark.parametrize("estimator", ["exact", "double_backward"])
@pytest.mark.parametrize("sparse", [False, True])
def test_a_student_with_an_embedding_bag_is_refused_by_the_exact_estimators(estimator, sparse):
    """torch has neither forward AD for embedding_bag nor its second derivative: double backward
    with a dense nn.EmbeddingBag failed after the student's optimizer had stepped ("the
    derivative for '_embedding_bag_backward' is not implemented"), and the exact step's message
    pointed to double_backward. Refused at construction, and at the step when one comes in
    later; the first-order estimator runs it."""
    torch.manual_seed(0)
    teacher, student = _Bags().to(DT), _Bags(sparse=sparse).to(DT)
    message = (
        r"^the student's module 'emb' is an nn.EmbeddingBag: .* with nn.Embedding .* or use "
        r"estimator='first_order'$"
    )
    with pytest.raises(ConfigError, match=message):
        _mpl(teacher, student, torch.optim.SGD(student.parameters(), lr=0.2), estimator=estimator)
    x_l, y_l, x_u = token_batches()
    tokens = _Tokens().to(DT)
    mpl = _mpl(teacher, tokens, torch.optim.SGD(tokens.parameters(), lr=0.2), estimator=estimator)
    tokens.emb = student.emb  # an EmbeddingBag put in after construction, and trained
    mpl.student_optimizer.param_groups[0]["params"] = list(tokens.parameters())
    before = _models_and_rng(teacher, tokens)
    with pytest.raises(ConfigError, match=message):
        mpl.step(x_l, y_l, x_u)
    assert all(torch.equal(a, b) for a, b in zip(before, _models_and_rng(teacher, tokens)))
    assert all(p.grad is None for p in teacher.parameters())
    if not sparse:
        s_opt = torch.optim.SGD(student.parameters(), lr=0.2)
        _mpl(teacher, student, s_opt, estimator="first_order").step(x_l, y_l, x_u)


class _FunctionalBags(nn.Module):
    """embedding_bag called as a function: no module to refuse at construction."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(20, 6))
        self.fc = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(torch.tanh(F.embedding_bag(ids, self.table, mode="mean")))


@pytest.mark.parametrize("estimator", ["exact", "double_backward"])
def test_a_functional_embedding_bag_is_sent_to_first_order_by_both_exact_estimators(estimator):
    """Found at the first step, before anything moves. Each estimator's message named the other
    (exact: "use double_backward"; double_backward: "use exact"), and neither goes through it."""
    torch.manual_seed(0)
    teacher, student = _Bags().to(DT), _FunctionalBags().to(DT)
    mpl = _mpl(teacher, student, torch.optim.SGD(student.parameters(), lr=0.2), estimator=estimator)
    x_l, y_l, x_u = token_batches()
    before = _models_and_rng(teacher, student)
    with pytest.raises(ConfigError, match=r"embedding_bag.*or use estimator='first_order'$") as e:
        mpl.step(x_l, y_l, x_u)
    assert "double_backward'" not in str(e.value) and "estimator='exact'" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, _models_and_rng(teacher, student)))


@pytest.mark.parametrize("estimator", ["exact", "double_backward"])
@pytest.mark.parametrize("how", ["torch.compile", "module.compile", "submodule"])
def test_a_compiled_student_is_refused_by_the_exact_estimators(estimator, how):
    """A torch.compile'd student failed both with torch's own RuntimeError (donated buffers,
    no double backward through aot_autograd; forward AD through inductor's out= kernels). Refused
    at construction (nothing is compiled by then: torch.compile is lazy); first_order takes it."""
    teacher, student = _Tokens(), _Tokens()
    if how == "torch.compile":
        student, name = torch.compile(student), ""
    elif how == "module.compile":
        student.compile()
        name = ""
    else:
        student.fc, name = torch.compile(student.fc), "fc"
    with pytest.raises(ConfigError, match=rf"^the student's module '{name}' is torch.compile'd: "):
        _mpl(teacher, student, estimator=estimator)
    _mpl(teacher, student, estimator="first_order")


@pytest.mark.parametrize(
    "wrap, what",
    [(nn.DataParallel, "an nn.DataParallel"), (torch.jit.script, "a torch.jit.ScriptModule")],
    ids=["DataParallel", "jit.script"],
)
def test_a_student_functional_call_refuses_is_a_config_error_at_construction(wrap, what):
    """Every estimator runs passes of the student through torch.func.functional_call, which
    refuses an nn.DataParallel or a ScriptModule at the root: the first step failed with torch's
    "The stateless API can't be used with ..." RuntimeError. Inside another module both run."""
    for estimator in ("exact", "double_backward", "first_order"):
        with pytest.raises(ConfigError, match=rf"^the student is {what}, which torch.func"):
            _mpl(_Tokens(), wrap(_Tokens()), estimator=estimator)
    teacher, student = _Tokens(), nn.Sequential(wrap(_Tokens()))
    mpl = _mpl(teacher, student)
    x = torch.randint(0, 20, (4, 7))
    mpl.step(x, torch.tensor([0, 1, 2, 0]), x)
    assert mpl.step_count == 1


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_double_backward_takes_a_sparse_embedding_exactly(momentum, nesterov):
    """nn.Embedding(sparse=True) was refused by both exact estimators. Double backward
    differentiates through its sparse gradient: the teacher's gradient equals the exact (JVP)
    step's with the same embedding dense, and central finite differences of R(theta_{t+1})
    through the real (sparse) SGD step, in float64, step after step. The JVP estimator still
    refuses it (forward AD takes no sparse tangent)."""
    torch.manual_seed(0)
    teacher, student = _Tokens().to(DT), _Tokens(sparse=True).to(DT)
    dense = copy.deepcopy(student)
    dense.emb.sparse = False

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum, nesterov=nesterov)

    with pytest.raises(ConfigError, match="its module 'emb' has sparse=True"):
        _mpl(teacher, student, sgd(student))
    sparse_mpl = _mpl(copy.deepcopy(teacher), student, sgd(student), estimator="double_backward")
    dense_mpl = _mpl(copy.deepcopy(teacher), dense, sgd(dense))
    x_l, y_l, x_u = token_batches()
    for step in range(3):
        assert _check_step_against_the_real_step(sparse_mpl, x_l, y_l, x_u, seed=step) < 1e-7
        dense_mpl.step(x_l, y_l, x_u)
        got, exact = (flat(p.grad for p in m.teacher.parameters()) for m in (sparse_mpl, dense_mpl))
        assert rel_err(got, exact) < 1e-10
    assert student.emb.weight.grad.is_sparse
