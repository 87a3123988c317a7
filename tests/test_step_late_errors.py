"""Mistakes that torch itself reports, but only in the middle of an MPL step: after the teacher's
forward updated its running statistics, after the student's forward and backward, or after the
student's optimizer had initialised its state or moved the student. Each is now a one-line
ConfigError / DataError before anything moves: both models' state_dicts (parameters and buffers),
both optimizers' state_dicts and torch's random stream are as they were.

What each did before is in the test's docstring; a configuration that works (a student that casts
its input itself, bf16 input under autocast, a learning rate given as a tensor) must keep working.
"""

from __future__ import annotations

import copy

import pytest
import torch
from mpl_helpers import MLP, TEST_DEVICE, flat, make_problem, rel_err, token_batches
from torch import Tensor, nn

from metapl import MetaPseudoLabels
from metapl.errors import ConfigError, DataError
from metapl.mpl import double_backward_teacher_gradient

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64
ESTIMATORS = ["exact", "double_backward", "first_order"]
O = torch.optim


def _mpl(teacher, student, s_opt=None, t_opt=None, **kwargs) -> MetaPseudoLabels:
    s_opt = s_opt or (lambda p: O.SGD(p, lr=0.2, momentum=0.9))
    t_opt = t_opt or (lambda p: O.SGD(p, lr=0.1))
    return MetaPseudoLabels(
        teacher, student, t_opt(teacher.parameters()), s_opt(student.parameters()), **kwargs
    )


def _everything(mpl: MetaPseudoLabels):
    return copy.deepcopy(
        (
            mpl.teacher.state_dict(),
            mpl.student.state_dict(),
            mpl.teacher_optimizer.state_dict(),
            mpl.student_optimizer.state_dict(),
            [p.grad for p in mpl.teacher.parameters()],
            mpl.step_count,
            torch.get_rng_state(),
        )
    )


def _same(a, b) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _refused_before_anything_moves(mpl, batch, error, match, **kwargs) -> str:
    before = _everything(mpl)
    with pytest.raises(error, match=match) as info:
        mpl.step(*batch, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert _same(before, _everything(mpl)), "the refused step changed the models or optimizers"
    return message


def _warm(mpl, batch, steps: int = 1) -> None:
    for _ in range(steps):
        mpl.step(*batch)


# ----------------------------------------------------------------------------- input dtypes


def _f32(x: Tensor) -> Tensor:
    return x.float()


# (student's x_l, x_u) dtype changes, with float64 models: each failed inside a student forward
_DTYPE_CASES = {
    # the teacher took cat([x_l, x_u]) in float64; the student took x_u, stepped, then failed on
    # x_l ("expected m1 and m2 to have the same dtype") with its weights and Adam state moved
    "x_labeled float32": ((_f32, None), "x_labeled"),
    # the teacher's forward ran (its running statistics moved), then the student's failed
    "x_unlabeled float32": ((None, _f32), "x_unlabeled"),
    "both float16": ((lambda x: x.half(), lambda x: x.half()), "x_labeled"),
    # uint8 pixels passed as they are: a raw torch error from the teacher's forward ("mat1 and
    # mat2 must have the same dtype"), with no word of which batch or what to do
    "both uint8": ((lambda x: x.to(torch.uint8), lambda x: x.to(torch.uint8)), "x_labeled"),
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", list(_DTYPE_CASES))
def test_an_input_dtype_the_student_cannot_take_is_a_data_error_before_anything_moves(
    case, estimator
):
    (cast_l, cast_u), what = _DTYPE_CASES[case]
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    x_l = cast_l(x_l) if cast_l else x_l
    x_u = cast_u(x_u) if cast_u else x_u
    mpl = _mpl(teacher, student, lambda p: O.Adam(p, lr=0.01), estimator=estimator)
    message = _refused_before_anything_moves(
        mpl, (x_l, y_l, x_u), DataError, f"the student cannot take {what} of dtype"
    )
    assert "torch.float64" in message  # the student's own dtype, to cast the batch to
    # the hint for integer pixels only (a float16 batch told to divide by 255 went unseen)
    hint = "(uint8 images: x.to(torch.float64) / 255)"
    assert (hint in message) == ("uint8" in case), message


def test_the_students_input_dtype_is_checked_when_the_teacher_sees_its_own_view():
    """ReducedMPL's teacher sees teacher_x_labeled / teacher_x_unlabeled, the student x_l and x_u:
    a float32 x_l for a float64 student failed after the student's step."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student)
    _warm(mpl, (x_l, y_l, x_u))
    _refused_before_anything_moves(
        mpl,
        (x_l.float(), y_l, x_u),
        DataError,
        "the student cannot take x_labeled of dtype torch.float32",
        teacher_x_labeled=x_l,
        teacher_x_unlabeled=x_u,
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_teacher_view_of_a_dtype_the_teacher_cannot_take_fails_in_its_forward(estimator):
    """docs/library.md: the teacher's input dtype is not checked (it is the caller's model and
    view); a mismatch is torch's own error from the teacher's forward, before the student moves
    (and on the first step with what that forward moved given back)."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student, estimator=estimator)
    views = {"teacher_x_labeled": x_l.float(), "teacher_x_unlabeled": x_u.float()}
    _refused_before_anything_moves(mpl, (x_l, y_l, x_u), RuntimeError, "dtype", **views)


class _Casting(nn.Module):
    """A student that casts its input to its own dtype: any floating input works."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.to(self.model.fc1.weight.dtype))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_an_input_of_another_dtype_that_the_student_takes_gives_the_same_step(estimator):
    """The trial forward that decides (once per dtype) is invisible: the same teacher and student
    as with the input cast by the caller, bit for bit, step after step."""
    results = []
    for cast_by_caller in (True, False):
        teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=2)
        x_l32, x_u32 = x_l.float(), x_u.float()
        mpl = _mpl(_Casting(teacher), _Casting(student), estimator=estimator)
        torch.manual_seed(5)
        for _ in range(2):
            if cast_by_caller:
                mpl.step(x_l32.double(), y_l, x_u32.double())
            else:
                mpl.step(x_l32, y_l, x_u32)
        results.append(
            (flat(teacher.state_dict().values()), flat(student.state_dict().values()))
            + (torch.get_rng_state(),)
        )
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_an_input_of_another_dtype_is_tried_once():
    """The trial forward runs the first time a dtype comes (for x_labeled and x_unlabeled each;
    with a new number of examples of x_labeled, which the exact step tries anyway, one trial for
    both), then is remembered: later steps run the student as often as with the input cast by
    the caller."""
    forwards = []
    for cast_by_caller in (True, False):
        teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=2)
        calls: list[int] = []
        student.register_forward_pre_hook(lambda m, args, calls=calls: calls.append(1))
        mpl = _mpl(_Casting(teacher), _Casting(student))
        per_step = []
        for _ in range(3):
            if cast_by_caller:
                mpl.step(x_l, y_l, x_u)
            else:
                mpl.step(x_l.float(), y_l, x_u.float())
            per_step.append(len(calls))
            calls.clear()
        forwards.append(per_step)
    cast, uncast = forwards
    # x_unlabeled's trial; the exact step tries x_labeled's first size anyway, and its dtype
    # with it
    assert uncast[0] == cast[0] + 1
    assert uncast[1:] == cast[1:]


def test_bf16_input_under_bf16_autocast_is_not_refused():
    """Autocast runs a float32 student on bf16 input: the dtype differs from the parameters', and
    the step takes it."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", dtype=torch.float32)
    mpl = _mpl(teacher, student, autocast_dtype=torch.bfloat16)
    metrics = mpl.step(x_l.bfloat16(), y_l, x_u.bfloat16())
    assert torch.isfinite(metrics["teacher_loss"])
    plain = _mpl(*make_problem("mlp", dtype=torch.float32)[:2])
    with pytest.raises(DataError, match="x_labeled of dtype torch.bfloat16"):
        plain.step(x_l.bfloat16(), y_l, x_u.bfloat16())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_labeled_batch_of_one_of_another_dtype_is_refused_as_a_batch_of_one(estimator):
    """A student that casts its input, given one float32 labeled example: the dtype's trial
    forward met BatchNorm's "Expected more than 1 value per channel when training" and let its
    raw ValueError out."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, _Casting(student), estimator=estimator)
    _refused_before_anything_moves(
        mpl,
        (x_l[:1].float(), y_l[:1], x_u),
        ConfigError,
        "^the student cannot take a labeled batch of one example in training mode .*use at "
        "least 2 labeled examples",
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_an_unlabeled_batch_of_one_the_students_batchnorm_refuses(estimator):
    """The student met x_u after the teacher's forward: BatchNorm's raw ValueError came with the
    teacher's running statistics moved."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    _refused_before_anything_moves(
        _mpl(teacher, student, estimator=estimator),
        (x_l, y_l, x_u[:1]),
        ConfigError,
        "^the student cannot take an unlabeled batch of one example in training mode",
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_student_that_squeezes_a_labeled_batch_of_one(estimator):
    """Logits [C] for one example (a student that calls ``squeeze()``): the labeled loss took
    them after the student's step."""
    teacher, _, x_l, y_l, x_u = make_problem("mlp")
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(x_l.shape[1], 8), nn.Tanh(), nn.Linear(8, 3))
    student = student.to(x_l.device, DT)
    mpl = _mpl(teacher, _Rows(student, "classes", right=(len(x_u),)), estimator=estimator)
    _refused_before_anything_moves(
        mpl,
        (x_l[:1], y_l[:1], x_u),
        ConfigError,
        r"^the student's logits on x_labeled have shape \(3,\); expected \(1,\)",
    )


def test_a_labeled_batch_of_one_taken_in_eval_mode_is_tried_again_in_training_mode():
    """What the trial forward passed is remembered with the student's mode: a batch of one that
    the student took in eval mode (BatchNorm then uses its running statistics) is tried again in
    training mode, where BatchNorm refuses it (after the exact step's student step)."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student)
    student.eval()
    mpl.step(x_l[:1], y_l[:1], x_u)
    student.train()
    _refused_before_anything_moves(
        mpl, (x_l[:1], y_l[:1], x_u), ConfigError, "labeled batch of one example in training mode"
    )


class _FailsOn(nn.Module):
    """A model that raises ``error`` of its own on batches of sizes other than ``sizes``."""

    def __init__(self, model: nn.Module, error: type[Exception], sizes: tuple[int, ...]):
        super().__init__()
        self.model, self.error, self.sizes = model, error, sizes

    def forward(self, x: Tensor) -> Tensor:
        if len(x) not in self.sizes:
            raise self.error("the student's own error")
        return self.model(x)


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_the_students_own_error_on_a_new_labeled_size_comes_as_it_is(error):
    """The exact step tries each new number of labeled examples first: an error of the student's
    own there (neither a dtype's nor BatchNorm's batch of one) is let out as it is, not named a
    dtype or batch-of-one problem, before anything moves."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, _FailsOn(student, error, (len(x_l), len(x_u))))
    _warm(mpl, (x_l, y_l, x_u))
    _refused_before_anything_moves(mpl, (x_l[:5], y_l[:5], x_u), error, "^the student's own error$")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("steps_before", [0, 1], ids=["first step", "a new size"])
def test_the_students_own_error_on_the_unlabeled_batch_gives_everything_back(
    estimator, steps_before
):
    """docs/library.md: on a step with a restore point (the first, a batch size no step has
    passed with) an error of the caller's own code gives the buffers and the random stream back.
    The student's forward on x_unlabeled ran outside it: its error came with the teacher's
    running statistics and the random stream moved (double_backward and first_order on the
    first step, every estimator on a new size; the exact first step's replay check ran it
    first)."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, _FailsOn(student, RuntimeError, (len(x_l), len(x_u))), estimator=estimator)
    _warm(mpl, (x_l, y_l, x_u), steps=steps_before)
    mpl.student.sizes = (len(x_l),)  # x_unlabeled fails from now on
    _refused_before_anything_moves(
        mpl, (x_l, y_l, x_u[:5] if steps_before else x_u), RuntimeError, "^the student's own"
    )


def test_a_refusal_never_puts_back_an_earlier_steps_state():
    """A step's RestorePoint is its own: a later step whose batches have passed before saves
    none, and its refusal (here the extra loss's, after the teacher's forward) must not put back
    the buffers and random stream saved at an earlier step (undoing steps of running
    statistics, and replaying their dropout masks)."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    losses = [lambda lg: lg.unlabeled.mean()]
    mpl = _mpl(teacher, student, teacher_extra_loss=lambda lg: losses[-1](lg))
    # the dropout masks' stream: the CPU's, or the GPU's (METAPL_TEST_DEVICE=cuda)
    stream = torch.cuda.get_rng_state if x_l.is_cuda else torch.get_rng_state
    first = copy.deepcopy(teacher.bn.running_mean), stream()
    _warm(mpl, (x_l, y_l, x_u), steps=2)
    losses.append(lambda lg: lg.unlabeled.sum(-1))
    with pytest.raises(ConfigError, match="teacher_extra_loss must return a scalar"):
        mpl.step(x_l, y_l, x_u)
    assert not torch.equal(teacher.bn.running_mean, first[0])
    assert not torch.equal(stream(), first[1])


class _Masked(nn.Module):
    """The model's logits with class 0 masked out (-inf): a legitimate teacher."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return torch.cat([torch.full_like(out[:, :1], float("-inf")), out[:, 1:]], dim=1)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("where", ["weight", "extra_loss"])
def test_a_teacher_of_nan_weights_or_extra_loss_is_refused_on_the_first_step(estimator, where):
    """A NaN weight in the teacher (or a NaN extra loss) made every parameter of the student NaN
    at the first step, without a word; the student's own logits were already checked so."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    kwargs = {}
    if where == "weight":
        with torch.no_grad():
            teacher.fc2.weight[0, 0] = float("nan")
        match = "^the teacher's logits hold NaN or Inf, though the inputs are finite"
    else:
        kwargs["teacher_extra_loss"] = lambda lg: lg.unlabeled.sum() * float("nan")
        match = "^teacher_extra_loss is NaN or Inf"
    mpl = _mpl(teacher, student, estimator=estimator, **kwargs)
    if where == "extra_loss":
        _refused_before_anything_moves(mpl, (x_l, y_l, x_u), ConfigError, match)
        return
    before = copy.deepcopy((teacher.state_dict(), student.state_dict()))
    with pytest.raises(ConfigError, match=match):
        mpl.step(x_l, y_l, x_u)
    for was, now in zip(before, (teacher.state_dict(), student.state_dict()), strict=True):
        for name in was:  # (the NaN weight is NaN still: equal_nan)
            assert torch.equal(was[name].isnan(), now[name].isnan()), name
            assert torch.equal(was[name].nan_to_num(), now[name].nan_to_num()), name
    assert not mpl.student_optimizer.state and mpl.step_count == 0


def test_a_teacher_that_masks_a_class_with_minus_inf_trains():
    """-inf logits for a class ruled out are a teacher's own choice: targets give it 0."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(_Masked(teacher), student, supervised_weight=0.0)
    _warm(mpl, (x_l, (y_l % 2) + 1, x_u), steps=2)
    assert torch.isfinite(flat(student.parameters())).all()
    assert torch.isfinite(flat(teacher.parameters())).all()


# ----------------------------------------------------------------------------- optimizer flags


_CAPTURABLE = {
    "Adam": lambda p: O.Adam(p, lr=0.01, capturable=True),
    "AdamW": lambda p: O.AdamW(p, lr=0.01, capturable=True),
    "RMSprop": lambda p: O.RMSprop(p, lr=0.01, capturable=True),
    "Adam foreach": lambda p: O.Adam(p, lr=0.01, capturable=True, foreach=True),
}


@pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="capturable is refused on the CPU")
@pytest.mark.parametrize("who", ["student", "teacher"])
@pytest.mark.parametrize("opt", list(_CAPTURABLE))
def test_capturable_on_cpu_parameters_is_a_config_error(opt, who):
    """torch asserts "If capturable=True, params and state_steps must be on supported devices"
    inside optimizer.step(): for the student after its forward and backward, with its Adam state
    initialised; for the teacher at the very end, with the student moved."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    factory = _CAPTURABLE[opt]
    kwargs = {"s_opt": factory} if who == "student" else {"t_opt": factory}
    with pytest.raises(ConfigError, match=f"{who}_optimizer has capturable=True.*cpu"):
        _mpl(teacher, student, **kwargs)
    # switched on after construction: refused at the step (two steps first: Adam's state has
    # settled, the flag is the only change)
    mpl = _mpl(teacher, student, **{k: lambda p: O.Adam(p, lr=0.01) for k in kwargs})
    _warm(mpl, (x_l, y_l, x_u), steps=2)
    optimizer = mpl.student_optimizer if who == "student" else mpl.teacher_optimizer
    optimizer.param_groups[0]["capturable"] = True
    _refused_before_anything_moves(
        mpl, (x_l, y_l, x_u), ConfigError, f"{who}_optimizer has capturable=True"
    )


@pytest.mark.parametrize("who", ["student", "teacher"])
@pytest.mark.parametrize("cls", [O.SGD, O.RMSprop, O.Adam, O.AdamW, O.Adagrad])
def test_a_differentiable_optimizer_is_a_config_error(cls, who):
    """differentiable=True runs optimizer.step() with autograd on, and its in-place update of a
    module's parameter fails ("a leaf Variable that requires grad is being used in an in-place
    operation"): for the student after its forward and backward, for the teacher after the
    student's step. MPL differentiates the student's update itself."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    factory = lambda p: cls(p, lr=0.01, differentiable=True)  # noqa: E731
    kwargs = {"s_opt": factory} if who == "student" else {"t_opt": factory}
    if who == "student" and cls is O.Adagrad:
        kwargs["estimator"] = "first_order"
    with pytest.raises(ConfigError, match=f"{who}_optimizer has differentiable=True"):
        _mpl(teacher, student, **kwargs)
    mpl = _mpl(teacher, student)
    _warm(mpl, (x_l, y_l, x_u))
    optimizer = mpl.student_optimizer if who == "student" else mpl.teacher_optimizer
    optimizer.defaults["differentiable"] = True
    _refused_before_anything_moves(
        mpl, (x_l, y_l, x_u), ConfigError, f"{who}_optimizer has differentiable=True"
    )


# ----------------------------------------------------------------------------- optimizer state


def _state_dict_of(factory, model: nn.Module) -> dict:
    """The state_dict of ``factory``'s optimizer over a copy of ``model`` after one step."""
    copied = copy.deepcopy(model)
    opt = factory(copied.parameters())
    for p in copied.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return copy.deepcopy(opt.state_dict())


_ADAM = lambda p: O.Adam(p, lr=0.01)  # noqa: E731
_SGD_M = lambda p: O.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
_RMS = lambda p: O.RMSprop(p, lr=0.01)  # noqa: E731
_RMS_M = lambda p: O.RMSprop(p, lr=0.01, momentum=0.9)  # noqa: E731

# (optimizer, state_dict loaded from, what the message names): torch's KeyError came from
# optimizer.step() (the teacher's: after the student's step) or from the Appendix-B factor
_FOREIGN = {
    "RMSprop state into Adam": (_ADAM, _RMS, "'betas'"),
    "Adam state into RMSprop": (_RMS, _ADAM, "'alpha'"),
    "Adam state into SGD": (_SGD_M, _ADAM, "'momentum'"),
    "RMSprop(momentum) state into SGD": (_SGD_M, _RMS_M, "'dampening'"),
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("who", ["student", "teacher"])
@pytest.mark.parametrize("case", list(_FOREIGN))
def test_a_state_dict_of_another_optimizer_class_is_a_config_error(case, who, estimator):
    factory, source, key = _FOREIGN[case]
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    kwargs = {"s_opt": factory} if who == "student" else {"t_opt": factory}
    mpl = _mpl(teacher, student, estimator=estimator, **kwargs)
    optimizer = mpl.student_optimizer if who == "student" else mpl.teacher_optimizer
    model = student if who == "student" else teacher
    optimizer.load_state_dict(_state_dict_of(source, model))
    message = _refused_before_anything_moves(
        mpl, (x_l, y_l, x_u), ConfigError, f"{who}_optimizer's param group 0 has no {key}"
    )
    assert type(optimizer).__name__ in message


def _swap_first_two_states(opt) -> None:
    """An Adam state_dict saved over the parameters in another order: shapes that do not fit."""
    sd = opt.state_dict()
    sd["state"][0], sd["state"][1] = sd["state"][1], sd["state"][0]
    opt.load_state_dict(sd)


def _amsgrad_on(opt) -> None:
    opt.param_groups[0]["amsgrad"] = True


def _momentum_on(opt) -> None:
    opt.param_groups[0]["momentum"] = 0.9


def _centered_on(opt) -> None:
    opt.param_groups[0]["centered"] = True


def _state_to_float32(opt) -> None:
    for state in opt.state.values():
        for k, v in state.items():
            if k != "step":
                state[k] = v.float()


def _first_state(opt) -> dict:
    return opt.state[opt.param_groups[0]["params"][0]]


def _exp_avg_of_one_value(opt) -> None:
    _first_state(opt)["exp_avg"] = torch.zeros(1, dtype=DT)


def _max_exp_avg_sq_deleted(opt) -> None:
    del _first_state(opt)["max_exp_avg_sq"]


def _last_max_exp_avg_sq_deleted(opt) -> None:
    """The last key of the last parameter's state: every state value before it is the same."""
    del opt.state[opt.param_groups[-1]["params"][-1]]["max_exp_avg_sq"]


def _momentum_buffer_of_a_row(opt) -> None:
    state = _first_state(opt)
    state["momentum_buffer"] = state["momentum_buffer"][:1].clone()


def _state_dict_without_square_avg(opt) -> None:
    p = opt.param_groups[0]["params"][0]
    opt.state[p] = {"step": opt.state[p]["step"]}


# (optimizer, how its state stops fitting, what the message names). Before: torch's KeyError or
# shape error in optimizer.step(), after the student's forward and backward.
_MISFIT = {
    "Adam, amsgrad switched on": (_ADAM, _amsgrad_on, "lacks 'max_exp_avg_sq'"),
    "RMSprop, momentum switched on": (_RMS, _momentum_on, "lacks 'momentum_buffer'"),
    "RMSprop, centered switched on": (_RMS, _centered_on, "lacks 'grad_avg'"),
    "Adam, states of other parameters": (_ADAM, _swap_first_two_states, "'exp_avg' of shape"),
    "SGD, states of other parameters": (_SGD_M, _swap_first_two_states, "'momentum_buffer' of"),
    "Adam, float32 state": (_ADAM, _state_to_float32, "torch.float32"),
    # Changed in place: the optimizer's state object, its size and its groups stay the same, so
    # the state was not checked again, and torch's step() failed in the middle of the MPL step (a
    # shape error in Adam's lerp_, a KeyError, a broadcast error in SGD's momentum update).
    "Adam, a state tensor replaced": (_ADAM, _exp_avg_of_one_value, r"'exp_avg' of shape \(1,\)"),
    "Adam amsgrad, a key deleted": (
        lambda p: O.Adam(p, lr=0.01, amsgrad=True),
        _max_exp_avg_sq_deleted,
        "lacks 'max_exp_avg_sq'",
    ),
    "Adam amsgrad, the last key deleted": (
        lambda p: O.Adam(p, lr=0.01, amsgrad=True),
        _last_max_exp_avg_sq_deleted,
        "lacks 'max_exp_avg_sq'",
    ),
    "SGD, a momentum buffer replaced": (_SGD_M, _momentum_buffer_of_a_row, "'momentum_buffer'"),
    "RMSprop, a parameter's state replaced": (
        _RMS,
        _state_dict_without_square_avg,
        "lacks 'square_avg'",
    ),
}


@pytest.mark.parametrize("who", ["student", "teacher"])
@pytest.mark.parametrize("case", list(_MISFIT))
def test_optimizer_state_that_does_not_fit_its_parameters_is_a_config_error(case, who):
    """Two steps first: the state has settled (its size no longer changes), and the change alone
    must bring the check back."""
    factory, spoil, match = _MISFIT[case]
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    kwargs = {"s_opt": factory} if who == "student" else {"t_opt": factory}
    mpl = _mpl(teacher, student, **kwargs)
    _warm(mpl, (x_l, y_l, x_u), steps=2)
    spoil(mpl.student_optimizer if who == "student" else mpl.teacher_optimizer)
    message = _refused_before_anything_moves(mpl, (x_l, y_l, x_u), ConfigError, match)
    assert message.startswith(f"{who}_optimizer's state")


@pytest.mark.parametrize("who", ["student", "teacher"])
@pytest.mark.parametrize("case", [c for c in _MISFIT if "switched on" in c])
def test_a_flag_switched_on_after_the_state_has_settled_is_seen(case, who):
    """The per-parameter check runs again when the state may have changed: after two steps the
    state's size no longer changes, and the flag alone must bring the check back."""
    factory, spoil, match = _MISFIT[case]
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    kwargs = {"s_opt": factory} if who == "student" else {"t_opt": factory}
    mpl = _mpl(teacher, student, **kwargs)
    _warm(mpl, (x_l, y_l, x_u), steps=2)
    spoil(mpl.student_optimizer if who == "student" else mpl.teacher_optimizer)
    _refused_before_anything_moves(mpl, (x_l, y_l, x_u), ConfigError, match)


# (the student's optimizer, whether its step() takes a state of another dtype than the parameter)
_CAST = {
    "SGD": (_SGD_M, True),
    "SGD foreach": (lambda p: O.SGD(p, lr=0.1, momentum=0.9, foreach=True), True),
    "SGD fused": (lambda p: O.SGD(p, lr=0.1, momentum=0.9, fused=True), False),
    "RMSprop": (_RMS, True),
    "RMSprop momentum": (_RMS_M, True),
    "RMSprop centered": (lambda p: O.RMSprop(p, lr=0.01, centered=True), False),
    "Adam": (_ADAM, False),
    "Adam fused": (lambda p: O.Adam(p, lr=0.01, fused=True), False),
}


@pytest.mark.parametrize("case", list(_CAST))
def test_a_student_cast_after_its_optimizers_first_steps(case):
    """``student.float()`` after two steps leaves its optimizer's state in float64, the state
    itself untouched (only the parameters' dtype says it changed). SGD's and plain RMSprop's
    step() take such a state and train on; the fused kernels and lerp_ (Adam, centered RMSprop)
    raised in the middle of the student's step ("expected scalar type Float but found Double",
    "expected dtype double for `end`"): refused before anything moves."""
    factory, takes_it = _CAST[case]
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student, factory)
    _warm(mpl, (x_l, y_l, x_u), steps=2)
    student.float()
    batch = (x_l.float(), y_l, x_u.float())
    views = {"teacher_x_labeled": x_l, "teacher_x_unlabeled": x_u}  # the teacher stays float64
    if takes_it:
        before = flat(student.parameters()).clone()
        for _ in range(2):
            mpl.step(*batch, **views)
        assert not torch.equal(flat(student.parameters()), before)
        assert torch.isfinite(flat(student.parameters())).all()
        return
    message = _refused_before_anything_moves(
        mpl, batch, ConfigError, "student_optimizer's state of 'fc1.weight'", **views
    )
    assert "torch.float64" in message and "torch.float32" in message


def test_the_state_is_checked_again_only_when_it_may_have_changed(monkeypatch):
    """The per-parameter check runs when the state may have changed (its first step fills it, a
    load_state_dict replaces it, a flag is switched), not every step; a good state_dict loaded
    mid-run trains on, a bad one is refused at the next step."""
    import metapl.mpl.update_rules as update_rules

    calls = []
    check = update_rules._check_parameters
    monkeypatch.setattr(
        update_rules, "_check_parameters", lambda who, *a: calls.append(who) or check(who, *a)
    )
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student, _ADAM)
    assert calls == ["student", "teacher"]
    _warm(mpl, (x_l, y_l, x_u), steps=3)  # the first step filled Adam's state (SGD has none)
    assert calls == ["student", "teacher", "student"]
    mpl.student_optimizer.load_state_dict(copy.deepcopy(mpl.student_optimizer.state_dict()))
    _warm(mpl, (x_l, y_l, x_u), steps=2)
    assert calls == ["student", "teacher", "student", "student"]
    mpl.student_optimizer.param_groups[0]["amsgrad"] = True
    with pytest.raises(ConfigError, match="lacks 'max_exp_avg_sq'"):
        mpl.step(x_l, y_l, x_u)
    mpl.student_optimizer.param_groups[0]["amsgrad"] = False
    mpl.student_optimizer.load_state_dict(_state_dict_of(_RMS, student))
    with pytest.raises(ConfigError, match="has no 'betas'"):
        mpl.step(x_l, y_l, x_u)


# ----------------------------------------------------------------------------- the teacher


def test_a_teacher_optimizer_that_needs_a_closure_is_a_config_error():
    """LBFGS.step() needs a closure: "missing 1 required positional argument" came at the
    teacher's step, after the student's."""
    teacher, student, *_ = make_problem("mlp")
    with pytest.raises(ConfigError, match="teacher_optimizer.*needs a closure"):
        _mpl(teacher, student, t_opt=lambda p: O.LBFGS(p))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_teacher_with_nothing_to_learn_is_a_config_error(estimator):
    """Every teacher parameter frozen: the teacher's backward failed ("element 0 of tensors does
    not require grad") after the student's step (double backward stepped nothing, silently)."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    frozen = copy.deepcopy(teacher).requires_grad_(False)
    with pytest.raises(ConfigError, match="teacher_optimizer requires grad"):
        _mpl(frozen, student, estimator=estimator)
    mpl = _mpl(teacher, student, estimator=estimator)
    _warm(mpl, (x_l, y_l, x_u))
    teacher.requires_grad_(False)
    _refused_before_anything_moves(
        mpl, (x_l, y_l, x_u), ConfigError, "none of the parameters in teacher_optimizer"
    )


class _Tokens(nn.Module):
    def __init__(self, sparse: bool = False):
        super().__init__()
        self.emb = nn.Embedding(20, 6, sparse=sparse)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.emb(ids)).mean(1))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("cls", [O.Adam, O.AdamW, O.RMSprop])
def test_a_sparse_teacher_with_an_optimizer_of_dense_gradients_is_a_config_error(cls):
    """ "Adam does not support sparse gradients" came at the teacher's step, after the student's.
    SGD and Adagrad take sparse gradients."""
    torch.manual_seed(0)
    teacher, student = _Tokens(sparse=True).to(DT), _Tokens().to(DT)
    with pytest.raises(ConfigError, match=f"teacher's module 'emb'.*{cls.__name__}"):
        _mpl(teacher, student, t_opt=lambda p: cls(p, lr=0.01))
    g = torch.Generator().manual_seed(1)
    x_l, x_u = torch.randint(0, 20, (6, 7), generator=g), torch.randint(0, 20, (8, 7), generator=g)
    y_l = torch.randint(0, 3, (6,), generator=g)
    for ok in (O.SGD, O.Adagrad):
        _mpl(teacher, student, t_opt=lambda p, ok=ok: ok(p, lr=0.01)).step(x_l, y_l, x_u)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("who", ["student", "teacher"])
@pytest.mark.parametrize("cls", [O.SGD, O.Adagrad])
def test_weight_decay_on_a_sparse_embedding_is_a_config_error(cls, who):
    """SGD's step() raised "add(sparse, dense) is not supported", Adagrad's "weight_decay option
    is not compatible with sparse gradients": the student's after its backward (double backward's
    copy of SGD's step failed the same way), the teacher's after the student's step. A group of
    its own without decay for the embedding trains."""
    torch.manual_seed(0)
    sparse, dense = _Tokens(sparse=True).to(DT), _Tokens().to(DT)
    teacher, student = (dense, sparse) if who == "student" else (sparse, dense)
    estimator = "double_backward" if who == "student" and cls is O.SGD else "first_order"

    def decayed(emb_decay: float):
        """``cls`` over the sparse model (the ``who``): weight decay 0.1, ``emb_decay`` for the
        embedding's weight."""
        emb = sparse.emb.weight
        rest = [p for p in sparse.parameters() if p is not emb]
        return lambda _: cls(
            [{"params": [emb], "weight_decay": emb_decay}, {"params": rest}],
            lr=0.01,
            weight_decay=0.1,
        )

    kwarg = "s_opt" if who == "student" else "t_opt"
    with pytest.raises(
        ConfigError, match=f"^the {who}'s module 'emb' has sparse=True, and {cls.__name__}'s"
    ):
        _mpl(teacher, student, estimator=estimator, **{kwarg: decayed(0.1)})
    _mpl(teacher, student, estimator=estimator, **{kwarg: decayed(0.0)}).step(*token_batches())


def test_a_sparse_adam_over_parameters_of_dense_gradients_is_a_config_error():
    """ "SparseAdam does not support dense gradients" came at the teacher's step, after the
    student's; over the sparse embedding's weight alone it steps."""
    torch.manual_seed(0)
    teacher, student = _Tokens(sparse=True).to(DT), _Tokens().to(DT)
    with pytest.raises(ConfigError, match="SparseAdam.*'fc.weight' gets a dense one"):
        _mpl(teacher, student, t_opt=lambda p: O.SparseAdam(p, lr=0.01))
    teacher.fc.requires_grad_(False)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        O.SparseAdam([teacher.emb.weight], lr=0.01),
        O.SGD(student.parameters(), lr=0.1),
    )
    g = torch.Generator().manual_seed(1)
    x_l, x_u = torch.randint(0, 20, (6, 7), generator=g), torch.randint(0, 20, (8, 7), generator=g)
    before = teacher.emb.weight.detach().clone()
    mpl.step(x_l, torch.randint(0, 3, (6,), generator=g), x_u)
    assert not torch.equal(before, teacher.emb.weight)


# ----------------------------------------------------------------------------- the logits


class _Rows(nn.Module):
    """A model whose logits are one row per example only for batches of ``right`` sizes;
    otherwise ``how``: "twice" ([2 * batch, C]) or "classes" (the first row, [C])."""

    def __init__(self, model: nn.Module, how: str, right: tuple[int, ...] = ()):
        super().__init__()
        self.model, self.how, self.right = model, how, right

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if len(x) in self.right:
            return out
        return torch.cat([out, out]) if self.how == "twice" else out[0]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("how, shape", [("twice", "(28, 3)"), ("classes", "(3,)")])
def test_teacher_logits_not_one_row_per_example_in_the_joint_forward(how, shape, estimator):
    """The labeled and unlabeled batches run through the teacher as one forward, whose output is
    split back: torch's raw "split_with_sizes expects split_sizes to sum exactly to 28" came with
    the teacher's running statistics moved."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(_Rows(teacher, how), student, estimator=estimator)
    message = _refused_before_anything_moves(
        mpl, (x_l, y_l, x_u), ConfigError, "^the teacher's logits on the labeled and unlabeled"
    )
    assert f"have shape {shape}; expected (14,) + (num_classes,)" in message


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_teacher_logits_not_one_row_per_example_in_separate_forwards(estimator):
    """Batches that cannot be concatenated (images of two sizes) get a forward each: each forward's
    logits are checked, and the teacher's running statistics are given back."""
    teacher, student, x_l, y_l, _ = make_problem("conv")
    x_u = torch.randn(3, 3, 7, 7, dtype=DT, generator=torch.Generator().manual_seed(1))
    x_u = x_u.to(x_l.device)
    mpl = _mpl(_Rows(teacher, "twice"), student, estimator=estimator)
    _refused_before_anything_moves(
        mpl,
        (x_l, y_l, x_u),
        ConfigError,
        r"^the teacher's logits on the labeled batch have shape \(4, 3\); expected \(2,\)",
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("who", ["teacher", "student"])
def test_logits_wrong_only_for_a_new_batch_size_are_refused_with_everything_given_back(
    who, estimator
):
    """Steps with batches of 6 + 8 examples go well; a last batch of another size gets logits of
    the wrong shape. What the forwards moved (both models' running statistics, the random
    stream) is saved again for batch sizes no step has passed with, and given back."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    models = {"teacher": teacher, "student": student}
    right = (len(x_l) + len(x_u),) if who == "teacher" else (len(x_l), len(x_u))
    models[who] = _Rows(models[who], "twice", right)
    mpl = _mpl(models["teacher"], models["student"], estimator=estimator)
    _warm(mpl, (x_l, y_l, x_u), steps=2)
    match = "the teacher's logits on the labeled" if who == "teacher" else "the student's logits"
    _refused_before_anything_moves(mpl, (x_l, y_l, x_u[:5]), ConfigError, match)
    _warm(mpl, (x_l, y_l, x_u))  # and the batches it takes still train


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_student_logits_not_one_row_per_example_on_the_labeled_batch(estimator):
    """The exact step meets x_l only after the student's step: its logits [12, C] for 6 examples
    were cut to the labels' 6 rows by gather, silently (in every estimator). The exact step tries
    each new size of x_l first; the others check the labeled pass they run before the step."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, _Rows(student, "twice", right=(len(x_u),)), estimator=estimator)
    _refused_before_anything_moves(
        mpl,
        (x_l, y_l, x_u),
        ConfigError,
        r"^the student's logits on x_labeled have shape \(12, 3\); expected \(6,\)",
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_student_logits_not_one_row_per_example_in_the_labeled_pass_before_its_step(estimator):
    """With student_labeled_weight > 0 the student's update has a labeled pass of its own, after
    its forward on x_u: double backward's refusal there came with both models' running statistics
    and the random stream moved."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    student = _Rows(student, "twice", right=(len(x_u),))
    mpl = _mpl(teacher, student, estimator=estimator, student_labeled_weight=0.5)
    _refused_before_anything_moves(
        mpl, (x_l, y_l, x_u), ConfigError, r"^the student's logits on x_labeled have shape"
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_teacher_extra_loss_that_is_not_a_scalar_is_refused_with_everything_given_back(
    estimator,
):
    """The extra loss is checked before the student moves, but after the teacher's forward: the
    refusal came with the teacher's running statistics and the random stream moved."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(
        teacher, student, estimator=estimator, teacher_extra_loss=lambda lg: lg.unlabeled.sum(-1)
    )
    _refused_before_anything_moves(
        mpl, (x_l, y_l, x_u), ConfigError, "^teacher_extra_loss must return a scalar"
    )


@pytest.mark.parametrize("who", ["student", "teacher"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_submodule_replaced_after_construction_is_checked(estimator, who):
    """``model.fc = nn.Linear(...)`` between steps, the optimizer left as it was: it holds the old
    layer's parameters, which the model no longer uses (both exact estimators' teacher gradient
    1.7-5.3x off, silently). Refused at the next step, as at construction."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student, estimator=estimator)
    _warm(mpl, (x_l, y_l, x_u))
    model = student if who == "student" else teacher
    model.fc2 = nn.Linear(model.fc2.in_features, model.fc2.out_features).to(DT)
    match = f"{who}_optimizer must optimize the {who}'s own parameters"
    _refused_before_anything_moves(mpl, (x_l, y_l, x_u), ConfigError, match)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_an_extra_loss_that_raises_on_the_first_step_gives_everything_back(estimator):
    """Not a refusal of metapl's: the caller's loss fails (an IndexError from an extra input it
    expected and was not given). Only metapl's own errors gave the restore point back, so the
    teacher's running statistics and the random stream stayed moved."""
    teacher, student, x_l, y_l, x_u = make_problem("conv")
    mpl = _mpl(
        teacher, student, estimator=estimator, teacher_extra_loss=lambda lg: lg.extra[1].mean()
    )
    _refused_before_anything_moves(mpl, (x_l, y_l, x_u), IndexError, "out of range")


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "students"])
def test_a_parameter_added_to_the_teachers_optimizer_later_is_checked(shared):
    """add_param_group on the teacher's optimizer after construction: a parameter both models
    share (the teacher's step moved the student's function unseen) or one of the student's alone
    (never moved) is refused at the next step, as at construction."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student)
    student.shared = teacher.shared = nn.Linear(2, 2).to(DT)  # in neither optimizer: fine
    _warm(mpl, (x_l, y_l, x_u))
    extra = student.shared.weight if shared else next(student.parameters())
    mpl.teacher_optimizer.add_param_group({"params": [extra]})
    match = "share the parameter" if shared else "teacher_optimizer must optimize the teacher's own"
    _refused_before_anything_moves(mpl, (x_l, y_l, x_u), ConfigError, match)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_student_is_tried_only_on_batches_it_has_not_taken(estimator):
    """The trial forward of check_student_takes is not a cost of every step: with batches of a
    fixed size and dtype the student runs as often in every step after the first. The exact step
    tries each new number of labeled examples once (then remembers it); a new number of
    unlabeled ones is not tried (its logits are checked right after the student's forward)."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    calls: list[int] = []
    student.register_forward_pre_hook(lambda m, args: calls.append(1))
    mpl = _mpl(teacher, student, estimator=estimator)
    per_step = []
    for n_l, n_u in [(6, 8), (6, 8), (6, 8), (5, 8), (5, 8), (6, 8), (6, 7), (6, 7)]:
        calls.clear()
        mpl.step(x_l[:n_l], y_l[:n_l], x_u[:n_u])
        per_step.append(len(calls))
    steady = per_step[1]
    tried = 1 if estimator == "exact" else 0
    assert per_step[1:] == [steady, steady, steady + tried, steady, steady, steady, steady]
    assert per_step[0] >= steady + tried  # the first step's trial (and first-use checks)


# ----------------------------------------------------------------------------- what works


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_learning_rate_and_betas_given_as_tensors_give_the_exact_gradient(dtype):
    """torch accepts lr (and Adam's betas) as tensors; the factors read them as numbers. torch's
    step does its arithmetic on them (lr / bias correction) in the tensor's dtype: float32
    hyperparameters put the real float64 step 1e-8 (relative) off the float64 rule, so only
    float64 ones are held to the double-backward oracle's 1e-10."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=1)
    for factory in (
        lambda p: O.SGD(p, lr=torch.tensor(0.2, dtype=dtype), momentum=0.9, nesterov=True),
        lambda p: O.Adam(
            p,
            lr=torch.tensor(0.01, dtype=dtype),
            betas=(torch.tensor(0.8, dtype=dtype), torch.tensor(0.95, dtype=dtype)),
            eps=1e-3,
        ),
    ):
        t, s = copy.deepcopy(teacher), copy.deepcopy(student)
        mpl = _mpl(t, s, factory, supervised_weight=0.0)
        _warm(mpl, (x_l, y_l, x_u))  # a state to differentiate through
        t.zero_grad()
        torch.manual_seed(3)
        oracle = flat(double_backward_teacher_gradient(t, s, mpl.student_optimizer, x_l, y_l, x_u))
        torch.manual_seed(3)
        mpl.step(x_l, y_l, x_u)
        error = rel_err(flat(p.grad for p in t.parameters()), oracle)
        assert error < (1e-10 if dtype == torch.float64 else 1e-6)


def test_an_optimizer_whose_state_is_not_shaped_like_its_parameters_trains():
    """The state checks read the optimizers they know (SGD, RMSprop, Adam, AdamW). Another
    class's state need not be shaped like its parameters: Adafactor keeps a row and a column
    factor per matrix; its steps run."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student, t_opt=lambda p: O.Adafactor(p, lr=0.01))
    before = flat(teacher.parameters()).clone()
    _warm(mpl, (x_l, y_l, x_u), steps=3)
    state = mpl.teacher_optimizer.state[teacher.fc1.weight]
    assert any(isinstance(v, Tensor) and v.dim() and v.shape != (8, 5) for v in state.values())
    assert not torch.equal(flat(teacher.parameters()), before)


class _MySGD(O.SGD):
    """A user's subclass: metapl does not know what its step() keeps."""


@pytest.mark.parametrize(
    "factory",
    [lambda p: O.Adagrad(p, lr=0.01), lambda p: _MySGD(p, lr=0.1, momentum=0.9)],
    ids=["Adagrad", "SGD subclass"],
)
def test_a_teacher_optimizer_metapl_does_not_know_trains_and_gets_the_checks_of_every_class(
    factory,
):
    """The teacher's optimizer only consumes the gradient the step leaves, so any class works
    (update_rules._KNOWN_STATE says why its state is not checked). What holds for every class is
    still checked: a state_dict of another class (Adam's into it) is refused before anything
    moves, by the param groups' hyperparameters."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student, t_opt=factory)
    before = flat(teacher.parameters()).clone()
    _warm(mpl, (x_l, y_l, x_u), steps=2)
    assert not torch.equal(flat(teacher.parameters()), before)
    mpl.teacher_optimizer.load_state_dict(_state_dict_of(_ADAM, teacher))
    _refused_before_anything_moves(
        mpl, (x_l, y_l, x_u), ConfigError, "^teacher_optimizer's param group 0 has no"
    )


def test_a_student_of_other_dtype_than_the_teacher_with_each_its_own_inputs():
    """A float32 student of a float64 teacher (its own teacher_x_* views) runs: no refusal."""
    teacher, _, x_l, y_l, x_u = make_problem("mlp")
    student = MLP().to(x_l.device).float().train()
    mpl = _mpl(teacher, student)
    for _ in range(2):
        mpl.step(x_l.float(), y_l, x_u.float(), teacher_x_labeled=x_l, teacher_x_unlabeled=x_u)
    assert torch.isfinite(flat(student.parameters())).all()


# ----------------------------------------------------------------------------- on a GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("factory", [_CAPTURABLE["Adam"], _CAPTURABLE["RMSprop"]])
def test_capturable_on_cuda_gives_the_exact_gradient(factory):
    """Where torch supports capturable=True the rule is the same (the step count lives on the
    GPU; the factor reads it)."""
    teacher, student, x_l, y_l, x_u = (t.cuda() for t in make_problem("mlp", seed=1))
    mpl = _mpl(teacher, student, factory, supervised_weight=0.0)
    _warm(mpl, (x_l, y_l, x_u))
    teacher.zero_grad()
    torch.manual_seed(3)
    oracle = flat(
        double_backward_teacher_gradient(teacher, student, mpl.student_optimizer, x_l, y_l, x_u)
    )
    torch.manual_seed(3)
    mpl.step(x_l, y_l, x_u)
    assert rel_err(flat(p.grad for p in teacher.parameters()), oracle) < 1e-10


@cuda
@pytest.mark.parametrize("which", ["y_labeled", "x_labeled", "x_unlabeled"])
def test_a_batch_on_another_device_than_the_student_is_a_data_error(which):
    """Labels or inputs on the CPU for a student on a GPU: the student's labeled loss (or its
    forward) failed after its step ("Expected all tensors to be on the same device")."""
    teacher, student, x_l, y_l, x_u = (t.cuda() for t in make_problem("mlp"))
    mpl = _mpl(teacher, student)
    _warm(mpl, (x_l, y_l, x_u))
    batch = {"x_labeled": x_l, "y_labeled": y_l, "x_unlabeled": x_u}
    batch[which] = batch[which].cpu()
    match = "y_labeled is on cpu" if which == "y_labeled" else f"cannot take {which} .* on cpu"
    _refused_before_anything_moves(mpl, tuple(batch.values()), DataError, match)


# ----------------------------------------------------------------------------- models that cannot learn


@pytest.mark.parametrize("estimator", ["exact", "first_order", "double_backward"])
@pytest.mark.parametrize("who", ["teacher", "student"])
def test_a_model_whose_logits_no_trained_parameter_reaches_is_refused(who, estimator):
    """Every layer its forward uses frozen, its one trained parameter unused: torch's "element 0
    of tensors does not require grad" from a backward, for a teacher after the student had moved.
    Now a ConfigError naming the model, with BatchNorm statistics and random numbers given back."""
    teacher, student, x_l, y_l, x_u = make_problem("conv")
    model = teacher if who == "teacher" else student
    model.requires_grad_(False)
    model.unused = nn.Parameter(torch.zeros(3, dtype=torch.float64, device=x_l.device))
    mpl = _mpl(teacher, student, estimator=estimator)
    message = _refused_before_anything_moves(
        mpl, (x_l, y_l, x_u), ConfigError, f"the {who}'s logits depend on no parameter"
    )
    assert "unfreeze" in message
