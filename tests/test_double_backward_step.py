"""The ``double_backward`` estimator is a whole MPL step whose teacher gradient comes from a
second-order graph. Run side by side with the exact (JVP) step from the same weights, seed and
batches, both must leave the same teacher, student and optimizer states after several steps: two
independent computations of grad_Psi R(theta_{t+1}), checked inside the real training step (with
the supervised term, BatchNorm and dropout), not only the bare gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from mpl_helpers import MLP, N_CLASSES, STUDENT_OPTIMIZERS, make_problem, rel_err
from torch import Tensor, nn

from metapl import MetaPseudoLabels
from metapl.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _run(estimator: str, opt_name: str, kind: str, steps: int = 3, labeled: float = 0.0):
    teacher, student, x_l, y_l, x_u = make_problem(kind, seed=5)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9, nesterov=True),
        STUDENT_OPTIMIZERS[opt_name](student.parameters()),
        temperature=0.8,
        label_smoothing=0.1,
        estimator=estimator,
        student_labeled_weight=labeled,
    )
    torch.manual_seed(11)
    metrics = [mpl.step(x_l, y_l, x_u + 0.1 * s) for s in range(steps)]
    return teacher, student, metrics


def _side_by_side(make_student, trained, **options) -> nn.Module:
    """The exact and double-backward steps from the same weights, seed and batches (float64, two
    steps of SGD on the parameters ``trained(student)`` gives): both models end the same. Returns
    the double-backward step's student."""
    steps = {}
    for estimator in ("exact", "double_backward"):
        teacher, _, x_l, y_l, x_u = make_problem("mlp", seed=5)
        torch.manual_seed(3)
        student = make_student().to(x_l.device, torch.float64)
        mpl = MetaPseudoLabels(
            teacher,
            student,
            torch.optim.SGD(teacher.parameters(), lr=0.05),
            torch.optim.SGD(trained(student), lr=0.3),
            estimator=estimator,
            **options,
        )
        torch.manual_seed(11)
        for s in range(2):
            mpl.step(x_l, y_l, x_u + 0.1 * s)
        steps[estimator] = teacher, student
    (t_exact, s_exact), (t_db, s_db) = steps.values()
    assert rel_err(flat(s_exact.parameters()), flat(s_db.parameters())) < 1e-10
    assert rel_err(flat(t_exact.parameters()), flat(t_db.parameters())) < 1e-10
    return s_db


@pytest.mark.parametrize("opt_name", ["sgd_nesterov", "rmsprop_momentum", "adamw"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("labeled", [0.0, 0.5], ids=["paper", "student_labeled"])
def test_double_backward_step_equals_exact_step(opt_name, kind, labeled):
    """Also with the student's own labeled loss (``student_labeled_weight``)."""
    t_exact, s_exact, m_exact = _run("exact", opt_name, kind, labeled=labeled)
    t_db, s_db, m_db = _run("double_backward", opt_name, kind, labeled=labeled)
    assert rel_err(flat(t_exact.parameters()), flat(t_db.parameters())) < 1e-10
    assert rel_err(flat(s_exact.parameters()), flat(s_db.parameters())) < 1e-10
    assert rel_err(flat(t_exact.buffers()), flat(t_db.buffers())) < 1e-10
    assert rel_err(flat(s_exact.buffers()), flat(s_db.buffers())) < 1e-10
    for a, b in zip(m_exact, m_db):
        assert torch.allclose(a["student_labeled_after"], b["student_labeled_after"], rtol=1e-10)
        assert ("student_labeled" in a) == ("student_labeled" in b) == (labeled > 0)


class _PassDependent(nn.Module):
    """An MLP, then ``a`` for a batch of ``a_rows`` examples and ``b`` for one of ``b_rows`` (a
    stand-in for a stochastic-depth block one pass skipped): the parameters of ``a`` and ``b`` get
    a gradient from one of the student's two losses (unlabeled, labeled) only, or none."""

    def __init__(self, a_rows: int, b_rows: int):
        super().__init__()
        self.body = MLP()
        self.a, self.b = nn.Linear(N_CLASSES, N_CLASSES), nn.Linear(N_CLASSES, N_CLASSES)
        self.a_rows, self.b_rows = a_rows, b_rows

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        if x.shape[0] == self.a_rows:
            h = self.a(h)
        if x.shape[0] == self.b_rows:
            h = self.b(h)
        return h


@pytest.mark.parametrize(
    "rows, body_frozen",
    [((6, None), False), ((8, None), False), ((8, 6), True)],
    ids=["a-labeled-only", "a-unlabeled-only", "passes-share-nothing"],
)
def test_parameters_reached_by_one_of_the_students_losses_step_as_in_the_exact_step(
    rows, body_frozen
):
    """A parameter that only the labeled pass (6 examples) or only the x_u pass (8) reaches has
    a gradient from one of the student's losses and None from the other: the double-backward
    step must step it on the one it has, as the exact step does (a sum that took None for the
    total dropped it).
    With ``body`` frozen, the x_u pass (through ``a``) and the labeled passes (through ``b``)
    share no parameter: R(theta_{t+1}) does not depend on the targets, and its gradient in them
    is 0 (None was a TypeError). float64, the two estimators side by side."""

    def student() -> nn.Module:
        model = _PassDependent(*rows)
        model.body.requires_grad_(not body_frozen)
        return model

    s_db = _side_by_side(
        student,
        lambda model: [p for p in model.parameters() if p.requires_grad],
        student_labeled_weight=0.5,
    )
    torch.manual_seed(3)
    fresh = _PassDependent(*rows).to(s_db.a.weight.device, torch.float64)
    assert not torch.equal(s_db.a.weight, fresh.a.weight)  # the layer one loss reaches moved


def test_a_student_whose_optimizer_trains_only_its_head_steps_as_in_the_exact_step():
    """The other parameters still require grad, but no optimizer holds them: the double-backward
    step's functional call leaves them in place, read as the module's own, which the check of a
    forward reading parameters outside the call took for one (a refusal, naming '0.weight')."""
    _side_by_side(MLP, lambda model: model.fc2.parameters())


def test_double_backward_step_moves_the_teacher_differently_without_the_mpl_term():
    """Guard against a vacuous comparison: the MPL term changes the teacher's update."""
    t_db, _, _ = _run("double_backward", "sgd_nesterov", "mlp", steps=1)
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=5)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9, nesterov=True),
        STUDENT_OPTIMIZERS["sgd_nesterov"](student.parameters()),
        temperature=0.8,
        label_smoothing=0.1,
        mpl_weight=0.0,
    )
    torch.manual_seed(11)
    mpl.step(x_l, y_l, x_u)
    assert rel_err(flat(t_db.parameters()), flat(teacher.parameters())) > 1e-6


def test_double_backward_refuses_data_parallel():
    teacher, student, *_ = make_problem("mlp")
    with pytest.raises(ConfigError, match="one process"):
        MetaPseudoLabels(
            teacher,
            copy.deepcopy(student),
            torch.optim.SGD(teacher.parameters(), lr=0.1),
            torch.optim.SGD(student.parameters(), lr=0.1),
            estimator="double_backward",
            grad_sync=object(),
        )
