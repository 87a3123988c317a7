"""The exact step's checks of the student (:mod:`metapl.mpl.student_checks`) where hand-made
mutants survived the rest of the suite:

- :func:`forward_ad_error` turns torch's "no forward AD for this op" errors into a ConfigError
  and leaves every other NotImplementedError alone (a student's own came out as a message about
  forward-mode AD);
- :func:`check_derivatives` takes a student whose gradient is exactly 0 (both sides of its
  adjoint check 0, nothing to scale them by) instead of dividing by zero;
- :func:`check_student_takes` names labels on another kind of device than the student's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from mpl_helpers import make_problem
from torch import Tensor, nn

from metapl import MetaPseudoLabels
from metapl.errors import ConfigError, DataError
from metapl.mpl.student_checks import forward_ad_error

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64


def test_only_torchs_forward_ad_errors_become_a_config_error():
    own = NotImplementedError("MyLayer.forward: the sparse path is not implemented yet")
    assert forward_ad_error(own) is None
    with torch.autograd.forward_ad.dual_level():  # torch's own message, whatever its wording
        x = torch.autograd.forward_ad.make_dual(torch.ones(3), torch.ones(3))
        with pytest.raises(NotImplementedError) as info:
            torch.nn.functional.embedding_bag(
                torch.tensor([0, 1]), x.reshape(3, 1), torch.tensor([0])
            )
    error = forward_ad_error(info.value)
    assert isinstance(error, ConfigError)
    assert "without forward-mode AD" in str(error) and "embedding_bag" in str(error)


class _Rounded(nn.Module):
    """Weights rounded to quarters without a straight-through estimator: the backward reaches
    them, with a gradient of exactly 0, and forward AD's tangent is 0 too."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, torch.round(self.fc.weight * 4) / 4, torch.round(self.fc.bias * 4) / 4)


def test_a_student_whose_gradient_is_exactly_zero_passes_the_adjoint_check_and_steps():
    """Both sides of <u, J t> = <B^T u, t> are 0, and so is the scale: no refusal (and no
    ZeroDivisionError); J is 0, so the teacher's gradient is its supervised loss's alone."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    teacher = nn.Linear(4, 3).double()
    student = _Rounded().double()
    x_l, x_u = torch.randn(6, 4, generator=g, dtype=DT), torch.randn(9, 4, generator=g, dtype=DT)
    y_l = torch.randint(0, 3, (6,), generator=g)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.1),
    )
    oracle = copy.deepcopy(teacher)
    supervised = F.cross_entropy(oracle(x_l), y_l)
    expected = torch.autograd.grad(supervised, list(oracle.parameters()))
    mpl.step(x_l, y_l, x_u)
    for p, e in zip(teacher.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=0)


def test_labels_on_another_kind_of_device_than_the_student_are_a_data_error():
    """The student meets y_labeled only after its step (its labeled loss at theta_{t+1}): labels
    on another kind of device are named before anything moves. Without a second device: meta."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.1),
    )
    before = [p.detach().clone() for m in (teacher, student) for p in m.parameters()]
    with pytest.raises(DataError, match="y_labeled is on meta and the student on cpu"):
        mpl.step(x_l, y_l.to("meta"), x_u)
    after = [p.detach() for m in (teacher, student) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
