"""MetaPseudoLabels as a library: precision, input checks, ensembles, extra teacher losses,
metrics and state."""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
from mpl_helpers import (
    MLP,
    N_CLASSES,
    N_FEATURES,
    STUDENT_OPTIMIZERS,
    TEST_DEVICE,
    cloned_buffers,
    cosine,
    flat,
    make_problem,
)
from torch import Tensor, nn
from torch.func import functional_call

from metapl import MetaPseudoLabels, TeacherLogits
from metapl.errors import ConfigError, DataError, MetaplError
from metapl.mpl.batch_checks import as_logits
from metapl.mpl.inputs import model_input

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64


def _mpl(teacher, student, **kwargs) -> MetaPseudoLabels:
    return MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9),
        **kwargs,
    )


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_teacher_gradient_is_close_to_float64_exact(autocast_dtype):
    """bf16, and float16 (accepted too, without loss scaling: docs/library.md's precision)."""
    teacher64, student64, x_l, y_l, x_u = make_problem("conv", seed=2)
    for m in (teacher64, student64):
        m.drop.p = 0.0  # dropout masks of different dtypes need not line up; the rest must
    teacher32, student32 = copy.deepcopy(teacher64).float(), copy.deepcopy(student64).float()

    conv_dtypes = []
    student32.conv.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))

    grads = {}
    for name, t, s, dtype, autocast in (
        ("f64", teacher64, student64, DT, None),
        ("autocast", teacher32, student32, torch.float32, autocast_dtype),
    ):
        mpl = _mpl(t, s, supervised_weight=0.0, autocast_dtype=autocast, temperature=1.5)
        metrics = mpl.step(x_l.to(dtype), y_l, x_u.to(dtype))
        grads[name] = flat(p.grad for p in t.parameters()).double()
        assert all(torch.isfinite(v) for v in metrics.values())
    assert conv_dtypes and all(d == autocast_dtype for d in conv_dtypes)  # autocast was on
    assert metrics["teacher_loss"].dtype == torch.float32  # losses are not in bf16
    assert grads["f64"].norm() > 1e-4
    assert cosine(grads["autocast"], grads["f64"]) >= 0.99


# ----------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "labels",
    [torch.tensor([0, 1, 3, 2, 0, 1]), torch.tensor([0, 1, -1, 2, 0, 1]), torch.zeros(6)],
    ids=["too_large", "negative", "float"],
)
def test_bad_labels_raise_data_error_before_the_student_moves(labels):
    teacher, student, x_l, _, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student)
    s_before = [p.detach().clone() for p in student.parameters()]
    t_before = [p.detach().clone() for p in teacher.parameters()]
    with pytest.raises(DataError, match="y_labeled"):
        mpl.step(x_l, labels, x_u)
    assert all(torch.equal(a, b) for a, b in zip(s_before, student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters()))
    assert mpl.step_count == 0


class _NoWorldSize:
    """A grad_sync without world_size, which the first-order step reads."""

    def mean_(self, tensors) -> None:
        pass


def _option_id(value: object) -> str:
    text = repr(value)
    return type(value).__name__ if " at 0x" in text else str(value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"estimator": "second_order"},
        {"estimator": "EXACT"},
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"temperature": math.nan},
        {"baseline_decay": 1.0},
        {"baseline_decay": -0.1},
        {"label_smoothing": 1.0},
        {"student_labeled_weight": -0.5},
        # each passed silently: NaN and Inf weights gave a NaN teacher loss at the first step, a
        # negative one trained the teacher away from its labels or from the student's progress
        {"student_labeled_weight": math.inf},
        {"supervised_weight": math.nan},
        {"supervised_weight": -1.0},
        {"mpl_weight": math.nan},
        {"mpl_weight": -1.0},
        {"mpl_weight": math.inf},
        {"temperature": math.inf},  # uniform targets whatever the teacher's logits
        {"autocast_dtype": "bf16"},  # a string: torch's TypeError came from inside the step
        {"autocast_dtype": torch.float32},  # CPU autocast warned and ran in float32
        # every step said x_labeled's examples () and y_labeled (N,) disagree
        {"batch_dim": -1},
        {"batch_dim": 1.0},
        {"batch_dim": True},  # an int to isinstance, and no dimension number
        # not numbers: Python's "'<' not supported between instances of 'int' and 'str'"
        {"temperature": "2"},
        {"mpl_weight": None},
        {"label_smoothing": "0.1"},
        {"supervised_weight": 1j},
        # read by the first-order estimator only: ignored without a word by the others
        {"baseline_decay": 0.9},
        {"jvp": "tape", "estimator": "first_order"},
        {"jvp": "auto", "estimator": "double_backward"},
        # failed at the first step ("'int' object is not callable", "no attribute 'mean_'")
        {"teacher_extra_loss": 3},
        {"grad_sync": object()},
        {"grad_sync": _NoWorldSize()},
        # a truthy string: allow_student_hooks="false" let hooks change the update, silently
        {"allow_student_hooks": "false"},
        {"check_inputs": "no"},
        {"allow_tf32": 1},
    ],
    # (an object's repr holds its address: the two xdist workers must collect the same ids)
    ids=lambda k: "-".join(f"{a}={_option_id(b)}" for a, b in k.items()),
)
def test_bad_options_raise_config_error(kwargs):
    teacher, student, *_ = make_problem("mlp")
    with pytest.raises(ConfigError) as info:
        _mpl(teacher, student, **kwargs)
    assert isinstance(info.value, MetaplError)
    key = next(iter(kwargs))
    assert key in str(info.value)


def _unchanged(models, before) -> bool:
    now = [p for m in models for p in m.parameters()]
    return all(torch.equal(a, b) for a, b in zip(before, now))


def _bad_batches():
    g = torch.Generator().manual_seed(1)
    x_l, x_u = torch.randn(6, N_FEATURES, generator=g), torch.randn(8, N_FEATURES, generator=g)
    y_l = torch.randint(0, N_CLASSES, (6,), generator=g)
    nan_u = x_u.clone()
    nan_u[3, 1] = math.nan
    return {
        "one label too few": ((x_l, y_l[:5], x_u), "disagree"),  # used to drop an example silently
        "one label too many": ((x_l[:5], y_l, x_u), "disagree"),
        "one-hot labels": ((x_l, F.one_hot(y_l, N_CLASSES), x_u), "disagree"),
        "no unlabeled examples": ((x_l, y_l, x_u[:0]), "x_unlabeled has no examples"),
        "no labeled examples": ((x_l[:0], y_l[:0], x_u), "x_labeled has no examples"),
        "NaN in x_unlabeled": ((x_l, y_l, nan_u), "x_unlabeled holds NaN or Inf"),
    }


def test_a_batch_dim_past_the_inputs_dimensions_is_named_as_such():
    """batch_dim=2 on [N, F] batches was reported as "x_labeled has no examples"."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student, batch_dim=2)
    with pytest.raises(DataError, match=r"x_labeled has shape \(\d+, \d+\), with no dimension 2"):
        mpl.step(x_l, y_l, x_u)


def test_a_scalar_batch_has_no_examples_whatever_the_batch_dim():
    """Only a tensor with dimensions, none of them batch_dim, is told its examples lie along
    another dimension; a 0-dim one has no examples at all (a check of batch_dim alone told it it
    had shape () "with no dimension 1 to hold its examples")."""
    for batch_dim in (0, 1):
        with pytest.raises(DataError, match=r"^x_unlabeled has no examples \(shape \(\)\)$"):
            model_input("x_unlabeled", torch.tensor(1.0), batch_dim)
    with pytest.raises(DataError, match=r"^x_unlabeled has shape \(3,\), with no dimension 1"):
        model_input("x_unlabeled", torch.ones(3), 1)


@pytest.mark.parametrize("case", list(_bad_batches()))
def test_bad_batches_raise_data_error_before_anything_moves(case):
    """Each used to pass silently (a dropped example, NaN losses, NaN weights) or as a raw
    PyTorch error."""
    (x_l, y_l, x_u), message = _bad_batches()[case]
    teacher, student, *_ = make_problem("mlp")
    mpl = _mpl(teacher, student)
    dev = TEST_DEVICE
    before = [p.detach().clone() for m in (teacher, student) for p in m.parameters()]
    with pytest.raises(DataError, match=message):
        mpl.step(x_l.to(dev, DT), y_l.to(dev), x_u.to(dev, DT))
    assert _unchanged((teacher, student), before) and mpl.step_count == 0


def _bad_values():
    """(step keyword arguments to change, message) for values only a host sync can see."""
    _, _, x_l, y_l, x_u = make_problem("mlp")
    nan_u, inf_l = x_u.clone(), x_l.clone()
    nan_u[3, 1], inf_l[0, 0] = math.nan, math.inf
    too_high, negative = y_l.clone(), y_l.clone()
    too_high[2], negative[4] = N_CLASSES, -1
    return {
        "label = num_classes": (
            {"y_labeled": too_high},
            rf"^y_labeled out of range: found \d+\.\.{N_CLASSES}, the model has {N_CLASSES} classes",
        ),
        "negative label": ({"y_labeled": negative}, r"^y_labeled out of range: found -1\.\."),
        "Inf in x_labeled": ({"x_labeled": inf_l}, "^x_labeled holds NaN or Inf values$"),
        "NaN in x_unlabeled": ({"x_unlabeled": nan_u}, "^x_unlabeled holds NaN or Inf values$"),
        "NaN in the teacher's view": (
            {"teacher_x_unlabeled": nan_u},
            "^teacher_x_unlabeled holds NaN or Inf values$",
        ),
        "Inf in the teacher's labeled view": (
            {"teacher_x_labeled": inf_l},
            "^teacher_x_labeled holds NaN or Inf values$",
        ),
        "NaN in an extra teacher input": (
            {"teacher_extra_inputs": (x_u, nan_u)},
            r"^teacher_extra_inputs\[1\] holds NaN or Inf values$",
        ),
    }


def _any_extra_loss(logits: TeacherLogits) -> Tensor:
    """0, from the teacher's logits: extra inputs need an extra loss, with or without them."""
    return sum((x.sum() for x in logits.extra), logits.unlabeled.sum()) * 0


@pytest.mark.parametrize("steps_before", [0, 1], ids=["first step", "after a step"])
@pytest.mark.parametrize("case", list(_bad_values()))
def test_bad_values_leave_models_and_random_stream_as_they_were(case, steps_before):
    """The value checks (one host sync) used to come after the teacher's forward: a NaN in a batch
    was reported with the teacher's BatchNorm running statistics already NaN. Every batch the
    teacher sees is checked before it, and the label range once the teacher's logits give the
    classes, with its buffers and the random numbers put back."""
    changes, message = _bad_values()[case]
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student, teacher_extra_loss=_any_extra_loss)
    for _ in range(steps_before):
        mpl.step(x_l, y_l, x_u)
    state = [copy.deepcopy(m.state_dict()) for m in (teacher, student)]
    rng = torch.get_rng_state()
    batch = {"x_labeled": x_l, "y_labeled": y_l, "x_unlabeled": x_u, **changes}
    with pytest.raises(DataError, match=message):
        mpl.step(**batch)
    for model, before in zip((teacher, student), state):
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name
    assert torch.equal(torch.get_rng_state(), rng)
    assert mpl.step_count == steps_before


def test_check_inputs_false_skips_the_value_checks_and_their_host_sync(monkeypatch):
    """README: check_inputs=False turns off the value checks of every step (finite inputs,
    labels in range), which cost a host sync: a NaN batch is then not refused, and the check is
    never called."""
    import metapl.mpl.step as step_module

    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    nan_u = x_u.clone()
    nan_u[0, 0] = math.nan
    with pytest.raises(DataError, match="x_unlabeled holds NaN"):
        _mpl(teacher, student).step(x_l, y_l, nan_u)

    def no_sync(*args):
        raise AssertionError("check_values ran")

    mpl = _mpl(teacher, student, check_inputs=False)
    mpl.step(x_l, y_l, x_u)  # (the first step's replay check would see the NaN: another error)
    monkeypatch.setattr(step_module, "check_values", no_sync)
    metrics = mpl.step(x_l, y_l, nan_u)
    assert not torch.isfinite(metrics["teacher_loss"])


@pytest.mark.parametrize("estimator", ["exact", "first_order", "double_backward"])
def test_with_check_inputs_false_a_label_beyond_the_classes_fails_before_the_student_moves(
    estimator,
):
    """The opt-out's cost is torch's own error, not a student moved and a teacher not: the
    teacher's supervised loss, which reads every label, comes before the student's step."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student, check_inputs=False, estimator=estimator)
    mpl.step(x_l, y_l, x_u)
    before = [p.detach().clone() for p in (*student.parameters(), *teacher.parameters())]
    with pytest.raises((RuntimeError, IndexError)):
        mpl.step(x_l, y_l + 100, x_u)
    after = (*student.parameters(), *teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_nan_batch_on_the_first_exact_step_without_value_checks_is_named_as_such():
    """The first exact step compares two of the student's forwards; with check_inputs=False a NaN
    in x_unlabeled reached that comparison, which blamed the student: a ConfigError saying it
    "draws random numbers elsewhere". Nothing moves (a restore point covers the first step)."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    nan_u = x_u.clone()
    nan_u[0, 0] = math.nan
    mpl = _mpl(teacher, student, check_inputs=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(DataError, match="x_unlabeled holds NaN or Inf values: the first exact"):
        mpl.step(x_l, y_l, nan_u)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    mpl.step(x_l, y_l, x_u)  # and the next step, on finite values, runs


def test_the_models_buffers_are_saved_only_when_a_step_may_be_refused_after_their_forwards(
    monkeypatch,
):
    """Whether the highest label fits is known from the teacher's logits only, and whether each
    model gives one row per example from its logits only, so the models' buffers and the random
    state are saved (RestorePoint) before their forwards: on the first step, when a label reaches
    the last step's number of classes, and for a batch size no step has passed with yet. Not on
    every step (on a GPU, saving the random state is a host sync)."""
    import metapl.mpl.step as step_module

    saved: list[object] = []
    restore_point = step_module.RestorePoint
    monkeypatch.setattr(
        step_module, "RestorePoint", lambda models: saved.append(1) or restore_point(models)
    )
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    too_high = y_l.clone()
    too_high[0] = N_CLASSES
    mpl = _mpl(teacher, student)
    saves = []
    for labels, unlabeled in (
        (y_l, x_u),
        (y_l, x_u),
        (too_high, x_u),
        (y_l, x_u),
        (y_l, x_u[:5]),
        (y_l, x_u[:5]),
        (y_l, x_u),
    ):
        try:
            mpl.step(x_l, labels, unlabeled)
        except DataError:
            assert labels is too_high
        saves.append(len(saved))
    assert saves == [1, 1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize(
    "where, bad",
    [(0, "x_l.npy"), (2, None), (2, {1, 2}), (1, "list")],
    ids=["str", "None", "set", "labels as a list"],
)
def test_a_batch_of_an_unsupported_type_is_a_data_error(where, bad):
    """Inputs may be tensors, tuples, lists and dicts of tensors (test_multi_input.py); anything
    else was an AttributeError from inside the step. Labels must be a tensor."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    batch: list = [x_l, y_l, x_u]
    batch[where] = y_l.tolist() if bad == "list" else bad
    name = ("x_labeled", "y_labeled", "x_unlabeled")[where]
    kinds = "a tensor, a tuple or list of tensors, or a dict of str -> tensor"
    expected = "a tensor" if where == 1 else kinds
    before = [p.detach().clone() for m in (teacher, student) for p in m.parameters()]
    with pytest.raises(
        DataError, match=f"^{name} must be {expected}, got {type(batch[where]).__name__}$"
    ):
        _mpl(teacher, student).step(*batch)
    assert _unchanged((teacher, student), before)


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(N_FEATURES, N_CLASSES)

    def forward(self, x):
        return {"logits": self.fc(x)}


@pytest.mark.parametrize("who", ["teacher", "student"])
def test_models_must_return_logits_of_the_same_classes(who):
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    other = _DictOut().to(TEST_DEVICE, DT)
    pair = (other, student) if who == "teacher" else (teacher, other)
    with pytest.raises(ConfigError, match=f"the {who} must return a tensor of logits"):
        _mpl(*pair).step(x_l, y_l, x_u)
    fewer = MLP(classes=N_CLASSES - 1).to(TEST_DEVICE, DT)
    with pytest.raises(ConfigError, match="both must predict the same classes"):
        _mpl(teacher, fewer).step(x_l, y_l, x_u)


class _HasLogits:
    def __init__(self, logits):
        self.logits = logits


@pytest.mark.parametrize(
    "out, hint",
    [
        ({"logits": torch.zeros(2, 3)}, "model(x)['logits']"),
        ({"scores": torch.zeros(2, 3)}, "the logits from model(x)'s dict"),
        ((torch.zeros(2, 3), torch.zeros(())), "model(x)[0]"),
        ([torch.zeros(2, 3)], "model(x)[0]"),
        (_HasLogits(torch.zeros(2, 3)), "model(x).logits"),
        (3.0, "returns the logits from model(x)"),
    ],
)
def test_a_model_that_returns_no_tensor_is_told_how_to_pick_its_logits(out, hint):
    # the example wrapper fits the output: a tuple has no ['logits'], an object no [0]
    with pytest.raises(ConfigError, match=re.escape(hint)):
        as_logits(out, "student")


def test_optimizers_and_models_that_cannot_be_an_mpl_pair():
    teacher, student, *_ = make_problem("mlp")
    with pytest.raises(ConfigError, match="two modules"):
        _mpl(student, student)
    for name, params in (("teacher", student.parameters()), ("student", teacher.parameters())):
        optimizers = {name: torch.optim.SGD(params, lr=0.1)}
        for model, other in (("teacher", teacher), ("student", student)):
            optimizers.setdefault(model, torch.optim.SGD(other.parameters(), lr=0.1))
        with pytest.raises(ConfigError, match=f"{name}_optimizer must optimize the {name}'s"):
            MetaPseudoLabels(teacher, student, optimizers["teacher"], optimizers["student"])
    stranger = nn.Linear(2, 2).to(TEST_DEVICE, DT)  # one parameter of a third module, among its own
    for name in ("teacher", "student"):
        optimizers = {
            model: torch.optim.SGD(m.parameters(), lr=0.1)
            for model, m in (("teacher", teacher), ("student", student))
        }
        optimizers[name].add_param_group({"params": [stranger.weight]})
        with pytest.raises(ConfigError, match=f"{name}_optimizer must optimize the {name}'s"):
            MetaPseudoLabels(teacher, student, optimizers["teacher"], optimizers["student"])
    with pytest.raises(ConfigError, match="needs a closure"):
        MetaPseudoLabels(
            teacher,
            student,
            torch.optim.SGD(teacher.parameters(), lr=0.1),
            torch.optim.LBFGS(student.parameters()),
            estimator="first_order",
        )


@pytest.mark.parametrize("jvp", ["forward_ad", "auto"])
def test_a_param_group_added_after_construction_is_part_of_the_exact_step(jvp):
    """The step follows its student optimizer's parameters. Oracle: the same history, with the
    step object built anew after ``add_param_group``. (The group used to be left out of w: the
    teacher's gradient was 12% off, silently.)"""
    grads = []
    for rebuild in (False, True):
        teacher, student, x_l, y_l, x_u = make_problem("mlp")
        first = list(student.fc1.parameters()) + list(student.bn.parameters())
        student_opt = torch.optim.SGD(first, lr=0.3, momentum=0.9)
        teacher_opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
        mpl = MetaPseudoLabels(teacher, student, teacher_opt, student_opt, jvp=jvp)
        torch.manual_seed(4)
        mpl.step(x_l, y_l, x_u)  # fc2 not trained yet (and, with "auto", a tape is traced)
        student_opt.add_param_group({"params": list(student.fc2.parameters())})
        if rebuild:
            mpl = MetaPseudoLabels(teacher, student, teacher_opt, student_opt, jvp=jvp)
        torch.manual_seed(5)
        mpl.step(x_l, y_l, x_u)
        grads.append(flat([p.grad for p in teacher.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- ensembles


class StackedMLP(nn.Module):
    """E independent 2-layer MLPs in one module: x [E, N, d] -> logits [E, N, C]."""

    def __init__(self, members: int, d_in: int, hidden: int, classes: int, generator):
        super().__init__()

        def init(*shape, scale):
            return nn.Parameter(scale * torch.randn(*shape, generator=generator, dtype=DT))

        self.w1 = init(members, d_in, hidden, scale=d_in**-0.5)
        self.b1 = init(members, 1, hidden, scale=0.1)
        self.w2 = init(members, hidden, classes, scale=hidden**-0.5)
        self.b2 = init(members, 1, classes, scale=0.1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2


class MemberMLP(nn.Module):
    """Member ``e`` of a StackedMLP as an ordinary model: x [N, d] -> logits [N, C]."""

    def __init__(self, stacked: StackedMLP, e: int):
        super().__init__()
        for name, p in stacked.named_parameters():
            setattr(self, name, nn.Parameter(p.detach()[e].clone()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2


@pytest.mark.parametrize("opt_name", ["sgd_nesterov", "rmsprop_centered", "adam_l2"])
@pytest.mark.parametrize("labeled", [0.0, 0.7], ids=["paper", "student_labeled"])
def test_batch_dim_1_ensemble_members_get_the_gradient_they_get_alone(opt_name, labeled):
    E, N_L, N_U, D, H, C = 3, 5, 7, 4, 6, 3
    g = torch.Generator().manual_seed(0)
    teacher, student = StackedMLP(E, D, H, C, g), StackedMLP(E, D, H, C, g)
    x_l = torch.randn(E, N_L, D, generator=g, dtype=DT)
    y_l = torch.randint(0, C, (E, N_L), generator=g)
    x_u = torch.randn(E, N_U, D, generator=g, dtype=DT)
    x_e = torch.randn(E, 2, D, generator=g, dtype=DT)
    factory = STUDENT_OPTIMIZERS[opt_name]

    def extra_loss(logits: TeacherLogits) -> Tensor:  # per-member, summed over members
        return 0.1 * logits.extra[0].pow(2).mean(dim=(-2, -1)).sum()

    def build(t, s, batch_dim):
        return MetaPseudoLabels(
            t,
            s,
            torch.optim.SGD(t.parameters(), lr=0.1, momentum=0.5),
            factory(s.parameters()),
            temperature=1.5,
            label_smoothing=0.1,
            teacher_extra_loss=extra_loss,
            batch_dim=batch_dim,
            student_labeled_weight=labeled,
        )

    alone = [(MemberMLP(teacher, e), MemberMLP(student, e)) for e in range(E)]
    ens = build(teacher, student, batch_dim=1)
    singles = [build(t, s, batch_dim=0) for t, s in alone]
    for _ in range(2):
        ens.step(x_l, y_l, x_u, teacher_extra_inputs=(x_e,))
        for e, (mpl, (t, s)) in enumerate(zip(singles, alone)):
            mpl.step(x_l[e], y_l[e], x_u[e], teacher_extra_inputs=(x_e[e],))
            for p_ens, p_one in zip(teacher.parameters(), t.parameters()):
                assert p_one.grad.abs().max() > 1e-6
                torch.testing.assert_close(p_ens.grad[e], p_one.grad, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(p_ens[e], p_one, rtol=1e-10, atol=1e-12)
            for p_ens, p_one in zip(student.parameters(), s.parameters()):
                torch.testing.assert_close(p_ens[e], p_one, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- extra teacher loss


def test_teacher_extra_loss_sees_extra_logits_and_adds_its_gradient():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    student = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    x_l, x_u = torch.randn(4, 5, generator=g, dtype=DT), torch.randn(6, 5, generator=g, dtype=DT)
    y_l = torch.randint(0, 3, (4,), generator=g)
    x_weak, x_strong = x_u + 0.1, x_u * 0.9  # like UDA's two views of the unlabeled batch

    seen: list[TeacherLogits] = []

    def consistency(logits: TeacherLogits) -> Tensor:
        seen.append(logits)
        weak, strong = logits.extra
        return F.kl_div(
            F.log_softmax(strong, -1), F.softmax(weak.detach(), -1), reduction="batchmean"
        )

    def run(extra: bool):
        t, s = copy.deepcopy(teacher), copy.deepcopy(student)
        mpl = _mpl(t, s, temperature=0.9, teacher_extra_loss=consistency if extra else None)
        metrics = mpl.step(x_l, y_l, x_u, teacher_extra_inputs=(x_weak, x_strong) if extra else ())
        return metrics, [p.grad.clone() for p in t.parameters()], mpl

    m_without, g_without, _ = run(False)
    assert not seen
    m_with, g_with, _ = run(True)
    assert len(seen) == 1
    logits = seen[0]
    with torch.no_grad():
        for got, x in zip(
            (logits.labeled, logits.unlabeled, *logits.extra), (x_l, x_u, x_weak, x_strong)
        ):
            torch.testing.assert_close(got, teacher(x), rtol=1e-12, atol=1e-14)
    assert len(logits.extra) == 2 and torch.equal(logits.labels, y_l) and logits.step == 0

    params = list(teacher.parameters())
    value = consistency(
        TeacherLogits(teacher(x_l), teacher(x_u), (teacher(x_weak), teacher(x_strong)), y_l, 0)
    )
    g_extra = torch.autograd.grad(value, params)
    assert all(ge.abs().max() > 1e-6 for ge in g_extra)
    torch.testing.assert_close(m_with["teacher_extra"], value.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        m_with["teacher_loss"], m_without["teacher_loss"] + value.detach(), rtol=1e-12, atol=0
    )
    for gw, go, ge in zip(g_with, g_without, g_extra):
        torch.testing.assert_close(gw, go + ge, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- metrics and state


@pytest.mark.parametrize("estimator", ["exact", "double_backward", "first_order"])
def test_metrics_are_detached_scalars_with_the_right_values(estimator):
    """The exact estimators' R(theta_{t+1}) and teacher loss; double backward's MPL term is R
    itself (its value; its gradient comes through the targets), not a surrogate of value 0."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=9)
    seed = 5
    mpl = _mpl(teacher, student, estimator=estimator)
    torch.manual_seed(seed)
    metrics = mpl.step(x_l, y_l, x_u)
    expected_keys = {
        "student_unlabeled",
        "student_labeled_after",
        "teacher_loss",
        "teacher_supervised",
        "teacher_mpl",
    }
    if estimator == "first_order":
        expected_keys |= {"student_labeled_before", "advantage"}
    assert expected_keys <= metrics.keys()
    for name, value in metrics.items():
        assert isinstance(value, Tensor), name
        assert value.dim() == 0, name
        assert not value.requires_grad and value.grad_fn is None, name
        assert torch.isfinite(value), name

    if estimator == "double_backward":
        assert torch.equal(metrics["teacher_mpl"], metrics["student_labeled_after"])
    if estimator != "first_order":
        # R(theta_{t+1}) on the dropout mask of the step's labeled forward: after the same seed,
        # draw as the step does (teacher forward, student forward on x_u), then evaluate.
        torch.manual_seed(seed)
        with torch.no_grad():
            functional_call(teacher, cloned_buffers(teacher), (torch.cat([x_l, x_u]),))
            functional_call(student, cloned_buffers(student), (x_u,))
            out = functional_call(student, cloned_buffers(student), (x_l,))
        torch.testing.assert_close(
            metrics["student_labeled_after"], F.cross_entropy(out, y_l), rtol=1e-12, atol=0
        )
        torch.testing.assert_close(
            metrics["teacher_loss"],
            metrics["teacher_supervised"] + metrics["teacher_mpl"],
            rtol=1e-12,
            atol=0,
        )


@pytest.mark.parametrize("estimator", ["exact", "double_backward", "first_order"])
def test_teacher_loss_is_the_weighted_sum_of_its_terms(estimator):
    """docs/library.md's metrics: teacher_loss = supervised_weight * teacher_supervised +
    mpl_weight * teacher_mpl (+ teacher_extra), with weights other than 1 (a metric that summed
    the unweighted terms would pass the test above)."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=9)
    mpl = _mpl(
        teacher,
        student,
        estimator=estimator,
        supervised_weight=0.7,
        mpl_weight=2.5,
        teacher_extra_loss=lambda logits: 0.1 * logits.unlabeled.square().mean(),
    )
    m = mpl.step(x_l, y_l, x_u)
    weighted = 0.7 * m["teacher_supervised"] + 2.5 * m["teacher_mpl"] + m["teacher_extra"]
    torch.testing.assert_close(m["teacher_loss"], weighted, rtol=1e-12, atol=0)


def test_the_exact_mpl_term_of_plain_sgd_is_the_change_in_r_to_first_order():
    """docs/library.md: the exact estimator's teacher_mpl is the surrogate <g(Psi), w>, not R;
    for plain SGD it is, to first order in the learning rate, R(theta_{t+1}) - R(theta_t): the
    difference shrinks as lr^2 while the change shrinks as lr. (No dropout: R before and after on
    one function.)"""
    errors = []
    for lr in (1e-2, 1e-3):
        teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=2)
        student.drop.p = 0.0
        with torch.no_grad():
            before = F.cross_entropy(functional_call(student, cloned_buffers(student), (x_l,)), y_l)
        mpl = MetaPseudoLabels(
            teacher,
            student,
            torch.optim.SGD(teacher.parameters(), lr=0.1),
            torch.optim.SGD(student.parameters(), lr=lr),
        )
        m = mpl.step(x_l, y_l, x_u)
        change = m["student_labeled_after"] - before
        assert abs(float(change)) > lr * 1e-3  # the step changed R
        errors.append(float((m["teacher_mpl"] - change).abs() / change.abs()))
    assert errors[0] < 0.01 and errors[1] < errors[0] / 5


@pytest.mark.parametrize("estimator", ["exact", "double_backward", "first_order"])
def test_the_step_zeroes_both_optimizers_gradients_itself(estimator):
    """README: step() zeroes both optimizers' gradients: gradients left in .grad before it (a
    caller's own backward) change neither model's update."""
    steps = []
    for leftover in (False, True):
        teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=3)
        mpl = _mpl(teacher, student, estimator=estimator)
        if leftover:
            for p in (*teacher.parameters(), *student.parameters()):
                p.grad = torch.randn_like(p)
        torch.manual_seed(0)
        mpl.step(x_l, y_l, x_u)
        steps.append(flat([*teacher.parameters(), *student.parameters()]).detach())
    assert torch.equal(steps[0], steps[1])


@pytest.mark.parametrize("estimator", ["exact", "double_backward", "first_order"])
def test_each_model_runs_in_the_mode_it_was_left_in(estimator):
    """README: step() runs each model in the mode the caller left it in, as a plain training
    step does: models left in eval mode stay there, their BatchNorm statistics do not move (eval
    mode reads them), and both still train."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=3)
    teacher.eval(), student.eval()
    buffers = [b.clone() for m in (teacher, student) for b in m.buffers()]
    before = [flat(m.parameters()).detach().clone() for m in (teacher, student)]
    _mpl(teacher, student, estimator=estimator).step(x_l, y_l, x_u)
    assert not teacher.training and not student.training
    assert all(torch.equal(a, b) for a, b in zip(buffers, [*teacher.buffers(), *student.buffers()]))
    for model, params in zip((teacher, student), before):
        assert not torch.equal(flat(model.parameters()), params)


def test_student_labeled_weight_adds_the_labels_to_the_students_own_step():
    """With ``student_labeled_weight=w`` the student moves exactly as its optimizer moves it on
    CE(targets, student(x_u)) + w * CE(y_l, student(x_l)), the labeled pass drawn after the x_u
    pass (a hand-made copy of the step, same seed; metric = the labeled CE before the step)."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=9)
    ref = copy.deepcopy(student)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    mpl = _mpl(teacher, student, student_labeled_weight=0.7, temperature=0.5)
    torch.manual_seed(4)
    with torch.no_grad():
        logits = functional_call(teacher, cloned_buffers(teacher), (torch.cat([x_l, x_u]),))
        targets = F.softmax(logits[len(x_l) :] / 0.5, dim=-1)
    unlabeled = -(targets * F.log_softmax(ref(x_u), dim=-1)).sum(-1).mean()
    labeled = F.cross_entropy(functional_call(ref, cloned_buffers(ref), (x_l,)), y_l)
    (unlabeled + 0.7 * labeled).backward()
    ref_opt.step()
    torch.manual_seed(4)
    metrics = mpl.step(x_l, y_l, x_u)
    for mine, theirs in zip(student.parameters(), ref.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(metrics["student_labeled"], labeled.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["student_unlabeled"], unlabeled.detach(), rtol=1e-12, atol=0)


def _first_order_with_baseline(teacher: nn.Module, student: nn.Module) -> MetaPseudoLabels:
    """A first-order step with a moving-average baseline (the state_dict's baseline)."""
    return MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.3),
        estimator="first_order",
        baseline_decay=0.5,
    )


def test_state_dict_round_trips_step_count_and_baseline():
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=10)

    build = _first_order_with_baseline

    mpl = build(teacher, student)
    for i in range(3):
        torch.manual_seed(i)
        mpl.step(x_l, y_l, x_u)
    assert mpl.step_count == 3
    assert mpl.baseline is not None and float(mpl.baseline) != 0.0

    buffer = io.BytesIO()
    torch.save(mpl.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)

    t2, s2 = copy.deepcopy(teacher), copy.deepcopy(student)
    t3, s3 = copy.deepcopy(teacher), copy.deepcopy(student)
    restored, fresh = build(t2, s2), build(t3, s3)
    restored.load_state_dict(state)
    assert restored.step_count == 3
    torch.testing.assert_close(restored.baseline, mpl.baseline, rtol=0, atol=0)

    results = []
    for m in (mpl, restored, fresh):
        torch.manual_seed(42)
        results.append(m.step(x_l, y_l, x_u))
    # the restored step continues exactly; a fresh one (baseline 0) does not
    torch.testing.assert_close(results[1]["advantage"], results[0]["advantage"], rtol=0, atol=0)
    assert not torch.equal(results[2]["advantage"], results[0]["advantage"])
    for p, q in zip(teacher.parameters(), t2.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert restored.step_count == 4

    exact = _mpl(*make_problem("mlp")[:2])
    exact.load_state_dict({"step_count": 7, "baseline": None})
    assert exact.state_dict() == {"step_count": 7, "baseline": None}


def test_a_loaded_baseline_of_another_shape_is_refused_before_anything_moves():
    """A baseline from another run (one per member of a 3-model ensemble, say) broadcast
    against this run's one reward: every advantage came from the wrong baseline."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=10)
    mpl = _first_order_with_baseline(teacher, student)
    mpl.load_state_dict({"step_count": 5, "baseline": torch.zeros(3, dtype=x_l.dtype)})
    before = copy.deepcopy((teacher.state_dict(), student.state_dict()))
    with pytest.raises(ConfigError, match=r"baseline has shape \(3,\), this batch's reward \(\)"):
        mpl.step(x_l, y_l, x_u)
    for saved, model in zip(before, (teacher, student)):
        for key, value in model.state_dict().items():
            assert torch.equal(value, saved[key]), key
    mpl.load_state_dict({"step_count": 5, "baseline": torch.tensor(0.25, dtype=x_l.dtype)})
    assert "advantage" in mpl.step(x_l, y_l, x_u)


def test_teacher_logits_carry_the_step_count():
    teacher, student, x_l, y_l, x_u = make_problem("conv", seed=1)
    steps = []
    mpl = _mpl(
        teacher,
        student,
        teacher_extra_loss=lambda lg: steps.append(lg.step) or lg.unlabeled.sum() * 0.0,
    )
    mpl.load_state_dict({"step_count": 5, "baseline": None})
    for _ in range(2):
        mpl.step(x_l, y_l, x_u)
    assert steps == [5, 6]


def test_extra_inputs_of_another_shape_get_their_own_teacher_forward():
    """Inputs that cannot be concatenated with the batch are forwarded one by one (BatchNorm
    then normalises each on its own batch)."""
    teacher, student, x_l, y_l, x_u = make_problem("conv", seed=1)
    teacher.drop.p = 0.0
    big = torch.randn(2, 3, 8, 8, dtype=DT)
    seen: list[TeacherLogits] = []

    def extra(lg: TeacherLogits) -> Tensor:
        seen.append(lg)
        return lg.extra[0].pow(2).mean()

    with torch.no_grad():
        expected = [
            functional_call(teacher, cloned_buffers(teacher), (x,)) for x in (x_l, x_u, big)
        ]
    mpl = _mpl(teacher, student, teacher_extra_loss=extra)
    mpl.step(x_l, y_l, x_u, teacher_extra_inputs=(big,))
    (lg,) = seen
    for got, want in zip((lg.labeled, lg.unlabeled, lg.extra[0]), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_the_readme_names_each_options_default_as_the_constructor_has_it():
    """A new user writing a step from the README alone had to guess the defaults of temperature,
    the weights, the estimator and most other options: the table named four of them."""
    import ast
    import inspect
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("Options (keyword arguments, with their defaults):\n\n", 1)[1]
    named = {}
    for row in table.split("\n\n", 1)[0].splitlines()[2:]:
        option, meaning = (cell.strip() for cell in row.strip("| ").split(" | ", 1))
        name = re.match(r"`(\w+)", option).group(1)
        found = re.match(r"default `?([^`:;( ]+)`?", meaning) or re.search(
            r"`([^`]+)` \(default\)", meaning
        )
        if found:
            named[name] = ast.literal_eval(found.group(1))
    signature = inspect.signature(MetaPseudoLabels.__init__).parameters
    defaults = {k: p.default for k, p in signature.items() if p.kind is p.KEYWORD_ONLY}
    assert named == defaults


# ----------------------------------------------------------------------------- more bad inputs
# Found by an adversarial pass over the constructor's and step()'s arguments: each was a raw
# Python or torch error from inside the step (some after the student had moved) or a silently
# different step.


@pytest.mark.parametrize(
    "who, bad",
    [
        ("student", None),
        ("teacher", lambda x: x),
        ("student_optimizer", None),
        ("teacher_optimizer", "sgd"),
    ],
)
def test_models_and_optimizers_of_the_wrong_type_are_config_errors(who, bad):
    """An AttributeError from deep in the construction ('NoneType' object has no attribute
    'parameters' / 'param_groups'), or an UnsupportedOptimizerError calling a string "str"."""
    teacher, student, *_ = make_problem("mlp")
    args = {
        "teacher": teacher,
        "student": student,
        "teacher_optimizer": torch.optim.SGD(teacher.parameters(), lr=0.1),
        "student_optimizer": torch.optim.SGD(student.parameters(), lr=0.1),
    }
    args[who] = bad
    with pytest.raises(ConfigError, match=f"^(the )?{who} must be "):
        MetaPseudoLabels(*args.values())


@pytest.mark.parametrize(
    "extras, error, message",
    [
        # a tensor was taken row by row: each row a batch of its own (here BatchNorm's raw error)
        (
            "tensor",
            DataError,
            "teacher_extra_inputs must be a list or tuple of batches, got a Tensor",
        ),
        (
            "none",
            DataError,
            "teacher_extra_inputs must be a list or tuple of batches, got a NoneType",
        ),
        # without an extra loss their logits went nowhere, but they joined the teacher's batch
        ("list", ConfigError, "no teacher_extra_loss reads their logits"),
    ],
)
def test_teacher_extra_inputs_that_cannot_be_used_fail_before_anything_moves(
    extras, error, message
):
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student)
    given = {"tensor": x_u, "none": None, "list": [x_u]}[extras]
    state = [copy.deepcopy(m.state_dict()) for m in (teacher, student)]
    with pytest.raises(error, match=re.escape(message)):
        mpl.step(x_l, y_l, x_u, teacher_extra_inputs=given)
    for model, before in zip((teacher, student), state):
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert mpl.step_count == 0


@pytest.mark.parametrize("dtype", [torch.complex128, torch.int64])
def test_an_extra_loss_that_is_not_real_floating_fails_before_the_student_moves(dtype):
    """A complex loss failed in the teacher's backward ("grad can be implicitly created only for
    real scalar outputs"), after the student had stepped."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student, teacher_extra_loss=lambda lg: lg.extra[0].sum().to(dtype))
    before = flat(student.parameters()).clone()
    with pytest.raises(ConfigError, match=f"real floating-point tensor, got {dtype}"):
        mpl.step(x_l, y_l, x_u, teacher_extra_inputs=[x_u])
    assert torch.equal(flat(student.parameters()), before)
    assert not mpl.student_optimizer.state


class _Cast(nn.Module):
    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).to(self.dtype)


@pytest.mark.parametrize("who", ["teacher", "student"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.complex128])
def test_logits_that_are_not_floating_point_fail_before_the_student_moves(who, dtype):
    """Integer logits from the teacher (an argmax, say) gave float targets once divided by the
    temperature: the student stepped on them, then the teacher's CE failed in log_softmax.
    Complex ones failed in torch's softmax or the student's backward."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    if who == "teacher":
        teacher = _Cast(teacher, dtype)
    else:
        student = _Cast(student, dtype)
    mpl = _mpl(teacher, student)
    before = flat(student.parameters()).clone()
    with pytest.raises(ConfigError, match=f"the {who} must return floating-point logits"):
        mpl.step(x_l, y_l, x_u)
    assert torch.equal(flat(student.parameters()), before)
    assert not mpl.student_optimizer.state


@pytest.mark.parametrize("layout", ["sparse_coo", "nested"])
def test_a_sparse_or_nested_batch_is_a_data_error(layout):
    """torch's NotImplementedError ('aten::ne.Scalar' ... 'SparseCPU' backend) came from the value
    checks; without them, from the teacher's joint forward."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _mpl(teacher, student)
    if layout == "nested":
        bad = torch.nested.nested_tensor(list(x_u), layout=torch.jagged)
    else:
        bad = x_u.to_sparse()
    with pytest.raises(DataError, match=f"^x_unlabeled is a {layout} tensor: the step takes dense"):
        mpl.step(x_l, y_l, bad)
    assert mpl.step_count == 0


def test_a_student_with_nan_weights_is_named_as_such_on_the_first_exact_step():
    """Its NaN logits failed the replay check's comparison, which blamed random numbers drawn
    outside torch's generator."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    with torch.no_grad():
        next(student.parameters())[0, 0] = math.nan  # a run that diverged
    mpl = _mpl(teacher, student)
    with pytest.raises(ConfigError, match="^the student's logits on x_unlabeled hold NaN or Inf"):
        mpl.step(x_l, y_l, x_u)


@pytest.mark.parametrize(
    "state",
    [
        {},
        None,
        {"step_count": 5},  # set the counter, then raised a KeyError
        {"step_count": "abc", "baseline": None},
        {"step_count": -1, "baseline": None},
        {"step_count": 1.5, "baseline": None},
        # failed in the next first-order step, after the student had moved
        {"step_count": 1, "baseline": 0.5},
        {"step_count": 1, "baseline": "x"},
        # taken: a NaN baseline made the teacher NaN at the next step, and another key was
        # ignored (a typo, or another object's state)
        {"step_count": 1, "baseline": torch.tensor(float("nan"))},
        {"step_count": 1, "baseline": None, "baselines": torch.tensor(0.5)},
    ],
    ids=repr,
)
def test_load_state_dict_refuses_a_state_it_cannot_use_and_changes_nothing(state):
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _first_order_with_baseline(teacher, student)
    mpl.step(x_l, y_l, x_u)
    before = mpl.state_dict()
    with pytest.raises(ConfigError, match="state_dict"):
        mpl.load_state_dict(state)
    assert mpl.step_count == before["step_count"] and mpl.baseline is before["baseline"]
    mpl.load_state_dict({"step_count": torch.tensor(4), "baseline": None})  # a saved int tensor
    assert mpl.step_count == 4


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"y_labeled": [0, 1, 2]}, DataError, "y_labeled must be a tensor, got list"),
        ({"y_labeled": "few"}, DataError, "disagree"),  # a gradient from 3 of 6 examples
        ({"y_labeled": "float"}, DataError, "integer class indices"),
        ({"y_labeled": "high"}, DataError, "out of range"),  # torch's gather error
        ({"x_unlabeled": "empty"}, DataError, "x_unlabeled has no examples"),
        ({"temperature": -1.0}, ConfigError, "temperature must be a finite number > 0"),
        ({"student_optimizer": "teacher's"}, ConfigError, "the student's own parameters"),
    ],
)
def test_the_oracle_takes_its_inputs_with_the_steps_checks(change, error, message):
    """double_backward_teacher_gradient (docs/library.md, the oracle) returned a gradient without
    a word for labels too few, a negative temperature or an empty batch, and raised raw errors
    for the others (a KeyError for an optimizer over other parameters)."""
    from metapl.mpl import double_backward_teacher_gradient

    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    args = {
        "teacher": teacher,
        "student": student,
        "student_optimizer": torch.optim.SGD(student.parameters(), lr=0.1),
        "x_labeled": x_l,
        "y_labeled": y_l,
        "x_unlabeled": x_u,
    }
    named = {
        "few": y_l[:3],
        "float": y_l.double(),
        "high": y_l + N_CLASSES,
        "empty": x_u[:0],
        "teacher's": torch.optim.SGD(teacher.parameters(), lr=0.1),
    }
    temperature = change.pop("temperature", 1.0)
    args.update({k: named.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    with pytest.raises(error, match=message):
        double_backward_teacher_gradient(*args.values(), temperature=temperature)
