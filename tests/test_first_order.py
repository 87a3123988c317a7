"""The first-order (REINFORCE) estimator of the teacher's MPL gradient.

- One draw is exactly advantage * grad CE(y_hat, teacher(x_u) / T), with y_hat sampled from the
  teacher's distribution and advantage = R(theta_t) - R(theta_{t+1}) (old minus new), both on the
  same dropout mask; the student learns the same sampled labels.
- Its expectation points the way of the exact gradient (small student learning rate).
- The moving-average baseline starts at 0 and follows b <- d * b + (1 - d) * h.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from mpl_helpers import cloned_buffers, cosine, flat, make_problem
from torch import nn
from torch.func import functional_call

from metapl import MetaPseudoLabels

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64


def _toy(seed: int = 0):
    """Linear teacher and student on 4 features, 3 classes; no dropout, no BatchNorm."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher, student = nn.Linear(4, 3).to(DT), nn.Linear(4, 3).to(DT)
    x_l = torch.randn(8, 4, generator=g, dtype=DT)
    y_l = torch.randint(0, 3, (8,), generator=g)
    x_u = torch.randn(6, 4, generator=g, dtype=DT)
    return teacher, student, x_l, y_l, x_u


def test_one_draw_is_advantage_times_teacher_cross_entropy_gradient():
    """An independent re-implementation of one first-order step (MLP with BatchNorm + Dropout)."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=4)
    temperature, seed = 1.7, 99
    factory = lambda p: torch.optim.Adam(p, lr=0.05)  # noqa: E731
    s_opt = factory(student.parameters())
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
    mpl = MetaPseudoLabels(
        teacher, student, t_opt, s_opt, temperature=temperature, supervised_weight=0.0,
        estimator="first_order",
    )  # fmt: skip
    names = [n for n, _ in teacher.named_parameters()]
    t_params = [p for _, p in teacher.named_parameters()]
    s_copy = copy.deepcopy(student)
    s_opt_copy = factory(s_copy.parameters())

    torch.manual_seed(seed)
    logits = functional_call(
        teacher, {**cloned_buffers(teacher), **dict(zip(names, t_params))}, (torch.cat([x_l, x_u]),)
    )
    logits_u = logits[len(x_l) :]
    y_hat = torch.distributions.Categorical(probs=F.softmax(logits_u.detach() / temperature, -1))
    y_hat = y_hat.sample()
    labeled_rng = torch.get_rng_state()
    with torch.no_grad():
        before = F.cross_entropy(functional_call(s_copy, cloned_buffers(s_copy), (x_l,)), y_l)
    F.cross_entropy(s_copy(x_u), y_hat).backward()
    s_opt_copy.step()
    torch.set_rng_state(labeled_rng)  # R_new sees R_old's dropout mask
    with torch.no_grad():
        after = F.cross_entropy(functional_call(s_copy, cloned_buffers(s_copy), (x_l,)), y_l)
    advantage = before - after
    term = advantage * F.cross_entropy(logits_u / temperature, y_hat, reduction="sum")
    expected = torch.autograd.grad(term, t_params)

    torch.manual_seed(seed)
    metrics = mpl.step(x_l, y_l, x_u)
    torch.testing.assert_close(metrics["student_labeled_before"], before, rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["student_labeled_after"], after, rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["advantage"], advantage, rtol=1e-12, atol=0)
    # the metric teacher_mpl is the REINFORCE term's value (docs/library.md's metrics)
    torch.testing.assert_close(metrics["teacher_mpl"], term.detach(), rtol=1e-12, atol=0)
    assert abs(float(advantage)) > 1e-6
    for p, e in zip(teacher.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-14)
    for p, q in zip(student.parameters(), s_copy.parameters()):  # trained on the same y_hat
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_expected_first_order_gradient_points_like_the_exact_gradient():
    teacher, student, x_l, y_l, x_u = _toy()
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.05)
    t0 = copy.deepcopy(teacher.state_dict())
    s0 = copy.deepcopy(student.state_dict())
    t_opt0, s_opt0 = copy.deepcopy(t_opt.state_dict()), copy.deepcopy(s_opt.state_dict())

    def reset():
        teacher.load_state_dict(t0)
        student.load_state_dict(s0)
        t_opt.load_state_dict(copy.deepcopy(t_opt0))
        s_opt.load_state_dict(copy.deepcopy(s_opt0))

    MetaPseudoLabels(teacher, student, t_opt, s_opt, supervised_weight=0.0).step(x_l, y_l, x_u)
    exact = flat(p.grad for p in teacher.parameters()).clone()
    assert exact.norm() > 1e-3

    first_order = MetaPseudoLabels(
        teacher, student, t_opt, s_opt, supervised_weight=0.0, estimator="first_order"
    )
    n_draws = 2000
    total = torch.zeros_like(exact)
    for i in range(n_draws):
        reset()
        torch.manual_seed(10_000 + i)  # the only thing that changes: which labels are sampled
        first_order.step(x_l, y_l, x_u)
        total += flat(p.grad for p in teacher.parameters())
    mean = total / n_draws
    # The REINFORCE term sums log q over the batch, so the mean matches the exact gradient in
    # size too (a batch-mean CE would shrink it by 1 / len(x_u) and fail the ratio check).
    assert cosine(mean, exact) >= 0.9
    assert 0.8 <= float(mean.norm() / exact.norm()) <= 1.25
    assert cosine(-mean, exact) < 0  # a flipped reward sign (new - old) would fail above


def test_moving_average_baseline_starts_at_zero_and_follows_the_reward():
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=6)
    decay = 0.9
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.5, momentum=0.9),
        estimator="first_order",
        baseline_decay=decay,
    )
    assert mpl.baseline is None
    torch.manual_seed(0)
    m1 = mpl.step(x_l, y_l, x_u)
    h1 = m1["student_labeled_before"] - m1["student_labeled_after"]
    assert abs(float(h1)) > 1e-6
    torch.testing.assert_close(m1["advantage"], h1, rtol=1e-12, atol=0)  # baseline 0 at first
    torch.testing.assert_close(mpl.baseline, (1 - decay) * h1, rtol=1e-12, atol=0)
    b1 = (1 - decay) * h1

    m2 = mpl.step(x_l, y_l, x_u)
    h2 = m2["student_labeled_before"] - m2["student_labeled_after"]
    torch.testing.assert_close(m2["advantage"], h2 - b1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(mpl.baseline, decay * b1 + (1 - decay) * h2, rtol=1e-12, atol=0)

    # without a baseline the advantage is the reward itself and no baseline is kept
    plain = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.5),
        estimator="first_order",
    )
    m = plain.step(x_l, y_l, x_u)
    torch.testing.assert_close(
        m["advantage"], m["student_labeled_before"] - m["student_labeled_after"], rtol=0, atol=0
    )
    assert plain.baseline is None
