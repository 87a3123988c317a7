"""Edge cases of the library step found by an audit of realistic usage (optimizer param groups,
parameters listed in odd ways): each was silently wrong before; what it did is in the test's
docstring."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from mpl_helpers import make_problem
from torch import nn

from metapl import MetaPseudoLabels
from metapl.errors import ConfigError, UnsupportedOptimizerError
from metapl.mpl import double_backward_teacher_gradient

pytestmark = pytest.mark.usefixtures("single_torch_thread")

O = torch.optim


def _sgd_mpl(teacher: nn.Module, student: nn.Module, **options) -> MetaPseudoLabels:
    """Both models with plain SGD (teacher lr 0.1, student 0.2)."""
    t_opt, s_opt = O.SGD(teacher.parameters(), lr=0.1), O.SGD(student.parameters(), lr=0.2)
    return MetaPseudoLabels(teacher, student, t_opt, s_opt, **options)


def _listed_twice(student: nn.Module, kind: str) -> O.Optimizer:
    """The student's optimizer with its first parameter listed twice in one group (torch warns,
    and its step() then updates that parameter twice)."""
    params = list(student.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "duplicate parameters" UserWarning
        if kind == "sgd":
            return O.SGD(params + [params[0]], lr=0.2, momentum=0.9)
        return O.Adam(params + [params[0]], lr=0.01, eps=1e-3)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("estimator", ["exact", "double_backward"])
def test_a_parameter_listed_twice_in_the_students_optimizer_is_a_config_error(estimator, kind):
    """torch steps a parameter listed twice twice; the exact estimators read one update per
    parameter. Before, the student moved as its optimizer moves it but the teacher's gradient
    was silently wrong (9x off finite differences along a direction with SGD, 46% with Adam),
    and so was the oracle's."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    s_opt = _listed_twice(student, kind)
    t_opt = O.SGD(teacher.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="lists the parameter 'fc1.weight' twice"):
        MetaPseudoLabels(teacher, student, t_opt, s_opt, estimator=estimator)
    with pytest.raises(ConfigError, match="twice"):
        double_backward_teacher_gradient(teacher, student, s_opt, x_l, y_l, x_u)


@pytest.mark.parametrize("group", [0, 1])
def test_a_parameter_listed_twice_after_construction_fails_before_anything_moves(group):
    """Appended between steps to its own group or to another (torch checks neither at step(),
    and steps it with both groups' hyperparameters): refused at the next step, with both
    models and the student's optimizer state as they were."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    *most, last = student.parameters()
    s_opt = O.SGD([{"params": most}, {"params": [last], "lr": 0.1}], lr=0.2, momentum=0.9)
    mpl = MetaPseudoLabels(teacher, student, O.SGD(teacher.parameters(), lr=0.1), s_opt)
    mpl.step(x_l, y_l, x_u)

    def everything() -> list[torch.Tensor]:
        momenta = [s_opt.state[p]["momentum_buffer"] for p in student.parameters()]
        return [*teacher.state_dict().values(), *student.state_dict().values(), *momenta]

    before = copy.deepcopy(everything())
    s_opt.param_groups[group]["params"].append(student.fc2.weight)
    with pytest.raises(ConfigError, match="lists the parameter 'fc2.weight' twice"):
        mpl.step(x_l, y_l, x_u)
    assert all(torch.equal(a, b) for a, b in zip(before, everything(), strict=True))


def test_the_first_order_estimator_takes_a_parameter_listed_twice():
    """It reads no update rule: the student's step is torch's, double update included."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    s_opt = _listed_twice(student, "sgd")
    mpl = MetaPseudoLabels(
        teacher, student, O.SGD(teacher.parameters(), lr=0.1), s_opt, estimator="first_order"
    )
    mpl.step(x_l, y_l, x_u)
    assert mpl.step_count == 1


class _Config:
    """A config object a model holds, whose fields a schedule changes between steps."""

    def __init__(self) -> None:
        self.scale = 1.0


class _Tanh:
    """A callable (not a module) with a field a schedule changes: ``k * tanh(x)``."""

    def __init__(self) -> None:
        self.k = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.k * torch.tanh(x)


class _ConfiguredStudent(nn.Module):
    """Reads a scale from a config object or a dict it holds: fx bakes the value in."""

    def __init__(self, holder: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.holder = holder
        self.cfg = _Config() if holder == "object" else {"scale": 1.0}
        self.act = _Tanh() if holder == "callable" else torch.tanh

    def set_scale(self, scale: float) -> None:
        if self.holder == "function":  # an activation swapped by attribute
            self.act = torch.tanh if scale == 1.0 else torch.sigmoid
        elif isinstance(self.act, _Tanh):  # a field of a callable object, in place
            self.act.k = scale
        elif isinstance(self.cfg, dict):
            self.cfg["scale"] = scale
        else:
            self.cfg.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.cfg["scale"] if isinstance(self.cfg, dict) else self.cfg.scale
        return self.fc2(self.act(self.fc1(x)) * scale)


@pytest.mark.parametrize("holder", ["object", "dict", "function", "callable"])
def test_the_tape_follows_a_config_value_a_module_holds(holder):
    """jvp="auto" with a forward that reads ``self.cfg.scale`` (or ``self.cfg["scale"]``), or
    calls ``self.act`` (or a field of it), changed between steps. Before, the graph traced at the first step kept
    the old scale or function: the student's step was 0.7-3% off its own optimizer's, the
    teacher's gradient 9-92% off double backward, silently."""
    torch.manual_seed(0)
    dt = torch.float64
    teacher = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dt)
    student = _ConfiguredStudent(holder).to(dt)
    g = torch.Generator().manual_seed(1)
    x_l, x_u = torch.randn(6, 4, generator=g, dtype=dt), torch.randn(8, 4, generator=g, dtype=dt)
    y_l = torch.randint(0, 3, (6,), generator=g)
    s_opt = O.SGD(student.parameters(), lr=0.2, momentum=0.9)
    t_opt = O.SGD(teacher.parameters(), lr=0.0)
    mpl = MetaPseudoLabels(teacher, student, t_opt, s_opt, supervised_weight=0.0, jvp="auto")
    for scale in (1.0, 0.5, 0.2):
        student.set_scale(scale)
        oracle = double_backward_teacher_gradient(teacher, student, s_opt, x_l, y_l, x_u)
        # the student's own step on the teacher's targets, on copies
        copied, copied_opt = copy.deepcopy((student, s_opt))
        with torch.no_grad():
            targets = torch.softmax(teacher(torch.cat([x_l, x_u]))[len(x_l) :], dim=-1)
        copied_opt.zero_grad()
        (-(targets * torch.log_softmax(copied(x_u), -1)).sum(-1).mean()).backward()
        copied_opt.step()

        mpl.step(x_l, y_l, x_u)
        assert mpl.last_jvp_path == "tape"
        for p, expected in zip(teacher.parameters(), oracle, strict=True):
            assert p.grad is not None
            torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=1e-14)
        for p, expected in zip(student.parameters(), copied.parameters(), strict=True):
            torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-14)


def test_the_oracle_refuses_an_optimizer_state_that_torch_cannot_step():
    """AMSGrad switched on after the first step: torch's Adam.step() fails (no
    ``max_exp_avg_sq``), and the step refuses it. The oracle took the missing state as zeros
    and returned a gradient without a word."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    s_opt = O.Adam(student.parameters(), lr=0.01)
    mpl = MetaPseudoLabels(teacher, student, O.SGD(teacher.parameters(), lr=0.1), s_opt)
    mpl.step(x_l, y_l, x_u)
    s_opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(ConfigError, match="max_exp_avg_sq"):
        double_backward_teacher_gradient(teacher, student, s_opt, x_l, y_l, x_u)


@pytest.mark.parametrize("estimator", ["exact", "first_order"])
def test_an_optimizer_replaced_after_construction_gets_the_construction_checks(estimator):
    """``mpl.student_optimizer = ...`` between steps, with one the estimator cannot step (NAdam
    for the exact step, LBFGS's closure for the first-order one). Before, the exact step raised
    its UnsupportedOptimizerError mid-step, after both models' BatchNorm statistics had moved,
    and the first-order one a TypeError from LBFGS.step() after that."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _sgd_mpl(teacher, student, estimator=estimator)
    mpl.step(x_l, y_l, x_u)
    if estimator == "exact":
        mpl.student_optimizer = O.NAdam(student.parameters())
        refusal: type[Exception] = UnsupportedOptimizerError
    else:
        mpl.student_optimizer = O.LBFGS(student.parameters())
        refusal = ConfigError
    before = copy.deepcopy([*teacher.state_dict().values(), *student.state_dict().values()])
    with pytest.raises(refusal):
        mpl.step(x_l, y_l, x_u)
    after = [*teacher.state_dict().values(), *student.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize(
    ("estimator", "mode"), [("exact", "tapee"), ("exact", None), ("first_order", "tape")]
)
def test_the_jvp_setter_has_the_constructions_checks(estimator, mode):
    """``mpl.jvp = ...``: a typo or None ran as "auto", and a tape asked of the first-order
    estimator (which computes no J) was taken without a word; the constructor refuses both."""
    teacher, student, _, _, _ = make_problem("mlp")
    mpl = _sgd_mpl(teacher, student, estimator=estimator)
    with pytest.raises(ConfigError, match="jvp"):
        mpl.jvp = mode
    assert mpl.jvp == "forward_ad"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("temperature", 0.0, "temperature must be a finite number > 0"),
        ("mpl_weight", float("nan"), "mpl_weight must be a finite number >= 0"),
        ("estimator", "exakt", "estimator must be one of"),
    ],
)
def test_an_option_set_after_construction_gets_the_constructions_checks(name, value, message):
    """``mpl.temperature = 0`` gave NaN parameters, a NaN ``mpl_weight`` too, and
    ``mpl.estimator = "exakt"`` ran the first-order step, silently. A valid value set later (an
    MPL weight warm-up) keeps working."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = _sgd_mpl(teacher, student)
    mpl.mpl_weight = 0.5
    mpl.step(x_l, y_l, x_u)
    setattr(mpl, name, value)
    before = copy.deepcopy([*teacher.state_dict().values(), *student.state_dict().values()])
    with pytest.raises(ConfigError, match=message):
        mpl.step(x_l, y_l, x_u)
    after = [*teacher.state_dict().values(), *student.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("which", ["x_labeled", "y_labeled", "x_unlabeled", "teacher_x_unlabeled"])
@pytest.mark.parametrize("estimator", ["exact", "first_order"])
def test_a_batch_made_under_inference_mode_is_a_data_error_before_anything_moves(which, estimator):
    """Autograd cannot save an inference tensor for a backward: the step failed inside a model's
    forward with torch's "Inference tensors cannot be saved for backward"."""
    from metapl.errors import DataError

    teacher, student, x_l, y_l, x_u = make_problem("conv")
    mpl = _sgd_mpl(teacher, student, estimator=estimator)
    batch = {"x_labeled": x_l, "y_labeled": y_l, "x_unlabeled": x_u, "teacher_x_unlabeled": x_u}
    with torch.inference_mode():
        batch[which] = batch[which].clone()
    before = copy.deepcopy((teacher.state_dict(), student.state_dict()))
    with pytest.raises(DataError, match=f"^{which} was made under torch.inference_mode()"):
        mpl.step(**batch)
    for saved, model in zip(before, (teacher, student)):
        for key, value in model.state_dict().items():
            assert torch.equal(value, saved[key]), key


def test_models_on_two_devices_are_a_config_error_before_anything_moves():
    """torch's "Expected all tensors to be on the same device" came from the loss between the two
    models' outputs; the meta device stands in for a second device (no GPU needed)."""
    teacher, student, x_l, y_l, x_u = make_problem("conv")
    mpl = _sgd_mpl(teacher.to("meta"), student)
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(
        ConfigError, match=f"^the teacher is on meta and the student on {x_l.device}"
    ):
        mpl.step(x_l, y_l, x_u)
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]), key
    # a model spread over two devices (model parallel) is left to its own forward
    teacher, student, x_l, y_l, x_u = make_problem("conv")
    student.fc.to("meta")
    mpl = _sgd_mpl(teacher, student)
    try:
        mpl.step(x_l, y_l, x_u)
    except Exception as err:  # noqa: BLE001  (whatever torch says of meta tensors)
        assert "the teacher is on" not in str(err)
