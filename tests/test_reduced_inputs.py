"""ReducedMPL's shape of the step: the teacher sees other inputs than the student (the large
teacher's class distributions vs the images). The exact gradient must still equal double backward,
with the RMSprop factor (Appendix C.2: the EfficientNet student trains with RMSprop)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from mpl_helpers import ConvNet, flat, rel_err
from torch import nn

from metapl import MetaPseudoLabels
from metapl.mpl import double_backward_teacher_gradient

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _calibrator(classes: int = 3) -> nn.Module:
    """A small ReLU MLP from a distribution to logits (the reduced teacher's shape)."""
    return nn.Sequential(
        nn.Linear(classes, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, classes)
    )


@pytest.mark.parametrize("opt", ["rmsprop", "sgd"])
def test_exact_gradient_with_separate_teacher_inputs(opt):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    teacher, student = _calibrator().double(), ConvNet().double()
    x_l = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    x_u = torch.randn(5, 3, 6, 6, generator=g, dtype=torch.float64)
    y_l = torch.randint(0, 3, (4,), generator=g)
    # the "large teacher's" distributions of the same examples
    p_l = F.softmax(torch.randn(4, 3, generator=g, dtype=torch.float64), -1)
    p_u = F.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), -1)
    make_opt = {
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9),
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    }[opt]
    s_opt = make_opt(student.parameters())
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.Adam(teacher.parameters(), lr=1e-4),
        s_opt,
        supervised_weight=0.0,
    )
    for step in range(2):
        t_copy, s_copy = copy.deepcopy(teacher), copy.deepcopy(student)
        o_copy = make_opt(s_copy.parameters())
        o_copy.load_state_dict(copy.deepcopy(s_opt.state_dict()))
        torch.manual_seed(100 + step)
        want = double_backward_teacher_gradient(
            t_copy, s_copy, o_copy, x_l, y_l, x_u, teacher_x_labeled=p_l, teacher_x_unlabeled=p_u
        )
        torch.manual_seed(100 + step)
        mpl.step(x_l, y_l, x_u, teacher_x_labeled=p_l, teacher_x_unlabeled=p_u)
        got = [p.grad for p in teacher.parameters()]
        assert flat(want).norm() > 1e-8
        assert rel_err(flat(got), flat(want)) < 1e-9


def test_teacher_inputs_are_what_the_teacher_sees():
    """The teacher is called on the distributions, never on the images."""
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            seen.append(x.shape)
            return self.fc(x)

    teacher, student = Spy(), nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.1),
    )
    x_l, x_u = torch.randn(2, 3, 2, 2), torch.randn(4, 3, 2, 2)
    mpl.step(
        x_l,
        torch.tensor([0, 1]),
        x_u,
        teacher_x_labeled=torch.rand(2, 3),
        teacher_x_unlabeled=torch.rand(4, 3),
    )
    assert seen == [torch.Size([6, 3])]
