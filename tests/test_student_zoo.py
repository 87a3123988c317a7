"""Students whose forward reaches their parameters where the step's extra passes cannot see it.

Every estimator runs passes of the student on other tensors than its own parameters
(``torch.func.functional_call``: double backward's differentiable update from copies of theta_t,
the exact step's J on dual tensors) and trusts those passes to compute the student's function.
Two kinds of forward broke that silently for double backward (the exact step refused them, with
a message about custom Functions, or not at all):

- a parameter read through a reference the module kept (a list, a closure): the passes never
  reach it (the student stepped another way than its optimizer alone, the teacher's gradient 22%
  off finite differences);
- a forward that writes its parameters in place (``F.embedding`` with ``max_norm``; an
  ``nn.Embedding`` with it is refused at construction): every extra pass writes again (the student
  2e-4 from its real step, the teacher's gradient 1e-3 off).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mpl_helpers import N_CLASSES, flat, token_batches
from torch import Tensor, nn

from metapl import MetaPseudoLabels
from metapl.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64
ESTIMATORS = [{"jvp": "forward_ad"}, {"jvp": "auto"}, {"estimator": "double_backward"}]
IDS = ["forward_ad", "auto", "double_backward"]


class HeldWeight(nn.Module):
    """Linear -> tanh -> Linear, the first layer's weight read from a list built with it."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, N_CLASSES)
        self.held = [self.body.weight]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(x @ self.held[0].T + self.body.bias))


class MaxNormTokens(nn.Module):
    """A table of token vectors looked up with F.embedding(max_norm=1), mean over positions,
    Linear."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(20, 6))
        self.fc = nn.Linear(6, N_CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(F.embedding(ids, self.table, max_norm=1.0).mean(1))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 6), nn.Linear(6, N_CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        return self.fc(self.emb(ids).mean(1))


def _refused_before_anything_moves(teacher, student, batches, options, match: str) -> None:
    torch.manual_seed(0)
    teacher, student = teacher.to(DT), student.to(DT)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.5, momentum=0.9),
        supervised_weight=0.0,
        **options,
    )
    state = flat([*teacher.state_dict().values(), *student.state_dict().values()]).clone()
    rng = torch.get_rng_state()
    with pytest.raises(ConfigError, match=match):
        mpl.step(*batches)
    after = flat([*teacher.state_dict().values(), *student.state_dict().values()])
    assert torch.equal(after, state) and torch.equal(torch.get_rng_state(), rng)
    assert not mpl.student_optimizer.state and not mpl.teacher_optimizer.state


@pytest.mark.parametrize("options", ESTIMATORS, ids=IDS)
def test_a_parameter_held_outside_its_module_is_named(options):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x_l, x_u = torch.randn(6, 4, generator=g, dtype=DT), torch.randn(9, 4, generator=g, dtype=DT)
    y_l = torch.randint(0, N_CLASSES, (6,), generator=g)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, N_CLASSES))
    _refused_before_anything_moves(
        teacher, HeldWeight(), (x_l, y_l, x_u), options, r"reads its parameter 'body.weight'"
    )


@pytest.mark.parametrize("options", ESTIMATORS, ids=IDS)
def test_a_forward_that_writes_its_parameters_is_refused(options):
    """Also by the exact step, whose trial of x_labeled renormalized the real table's rows."""
    _refused_before_anything_moves(
        Tokens(), MaxNormTokens(), token_batches(), options, r"writes its parameter 'table'"
    )
