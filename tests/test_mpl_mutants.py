"""The MPL core where hand-made mutants survived the rest of the suite, each held to an independent
oracle in float64 (double backward, forward AD, a hand-made copy of the step, hand arithmetic):

- the tangent tape's rules for operations no registry model uses (subtraction, negation, division
  by a tensor with a tangent, ``cat`` with a constant part, tanh-GELU, a negative leaky slope,
  functional conv/linear/BatchNorm, eval-mode functional BatchNorm) and for a student that trains
  a layer's bias but not its weight (the bias-only tangent must be broadcast to the output);
- the first-use checks of a traced graph: logits 2% off in float32 (1e-5 in float64) are not
  trusted; a graph with the module's logits but another derivative trains on forward AD's J from
  its first step; a graph that passed them and fails later raises; tracing draws none of the
  step's random numbers (a draw fx made while tracing put J on other numbers than the update
  pass's);
- students with forward-pre, backward or backward-pre hooks keep their own forward (hooks run);
- the adjoint check's scale is the sum of its per-parameter terms' sizes: a float32 student whose
  terms cancel is exact and not refused;
- :mod:`metapl.mpl.numerics`: its gradient is the exact MPL gradient at the given temperature, and
  the agreement metrics are what they say;
- the first-order estimator: labels are sampled from softmax(logits / T), and its REINFORCE term
  sums over all processes' examples.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from mpl_helpers import flat, make_problem, rel_err
from test_tangent_replay import (
    RichNet,
    _assert_same_state,
    _problem,
    _run_steps,
    _sgd_mpl,
    forward_ad_jvp,
    tape_vs_native,
)
from torch import Tensor, nn

from metapl import MetaPseudoLabels
from metapl.errors import ConfigError
from metapl.mpl import double_backward_teacher_gradient
from metapl.mpl.inputs import model_input
from metapl.mpl.numerics import agreement_with_float64, mpl_teacher_gradient
from metapl.mpl.student_checks import check_derivatives
from metapl.mpl.tangent import TangentTape

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64


# ----------------------------------------------------------------------------- tangent rules


class MoreOps(nn.Module):
    """Operations with hand-written tangent rules that the registry models do not use."""

    def __init__(self, width: int = 4, classes: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def param(*shape, scale=0.5, shift=0.0):
            return nn.Parameter(shift + scale * torch.randn(*shape, generator=g))

        self.w_conv, self.b_conv = param(width, 3, 3, 3), param(width)
        self.bn1_w, self.bn1_b = param(width, shift=1.0), param(width)
        self.bn2_w, self.bn2_b = param(width, shift=1.0), param(width)
        self.register_buffer("rm", 0.3 * torch.randn(width, generator=g))
        self.register_buffer("rv", 0.5 + torch.rand(width, generator=g))
        self.gelu = nn.GELU(approximate="tanh")
        self.w_fc, self.b_fc = param(classes, width + 3), param(classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.conv2d(x, self.w_conv, self.b_conv, padding=1)
        h = F.batch_norm(h, None, None, self.bn1_w, self.bn1_b, training=True)
        h2 = F.batch_norm(h, self.rm, self.rv, self.bn2_w, self.bn2_b, training=False)
        a = F.gelu(h, approximate="tanh") - self.gelu(h2)  # sub
        b = -F.leaky_relu(h2, -0.3)  # neg; a negative slope
        c = torch.sub(a, b, alpha=0.5) / (1.5 + torch.sigmoid(b))  # div by an active tensor
        d = torch.cat([c, x], dim=1)  # x carries no tangent
        d = F.dropout(d, 0.5, training=False)  # the identity: no mask, the tangent passes
        return F.linear(d.mean(dim=(2, 3)), self.w_fc, self.b_fc)


def test_hand_written_rules_outside_the_registry_models_are_forward_ad():
    model = MoreOps().to(DT).train()
    x = torch.randn(5, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    tape, record, logits, _, j_tape, j_ref = tape_vs_native(model, x)
    assert tape.describe()["generic"] == 0, tape.describe()  # every node by its own rule
    assert rel_err(record.logits.detach(), logits.detach()) <= 1e-12
    assert j_ref.norm() > 1e-6
    assert rel_err(j_tape, j_ref) <= 1e-10, rel_err(j_tape, j_ref)


class BiasOnly(nn.Module):
    """Layers whose input carries no tangent and whose weight is frozen: only the bias moves the
    output, so the tangent is the bias broadcast over the batch (and, for the conv, the pixels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        b = self.bn(x)
        return self.fc(torch.cat([h, b], dim=1).mean(dim=(2, 3)))


@pytest.mark.parametrize("bn_train", [True, False], ids=["bn_train", "bn_eval"])
def test_a_bias_trained_without_its_weight_gets_a_broadcast_tangent(bn_train):
    torch.manual_seed(0)
    model = BiasOnly().to(DT)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        model.bn.running_mean.uniform_(-1.0, 1.0)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    model.train()
    model.bn.train(bn_train)
    trainable = ["conv.bias", "bn.bias", "fc.weight"]
    params = dict(model.named_parameters())
    x = torch.randn(4, 3, 5, 5, dtype=DT, generator=torch.Generator().manual_seed(2))
    tape = TangentTape(model, [params[n] for n in trainable])
    seed = 7
    torch.manual_seed(seed)
    record = tape.record(x)
    theta = {n: params[n].detach().clone() for n in trainable}
    g = torch.Generator().manual_seed(5)
    w = {n: torch.randn(theta[n].shape, generator=g, dtype=DT) for n in trainable}
    with torch.no_grad():
        for n in trainable:  # the optimizer step: the tape must read theta_t
            params[n].add_(torch.randn(theta[n].shape, generator=g, dtype=DT))
        j_tape = tape.tangent(
            record,
            {id(params[n]): theta[n] for n in trainable},
            {id(params[n]): w[n] for n in trainable},
        )
    j_ref = forward_ad_jvp(model, theta, w, x, seed).detach()
    assert tape.describe()["generic"] == 0
    assert j_ref.norm() > 1e-6
    assert rel_err(j_tape, j_ref) <= 1e-10, rel_err(j_tape, j_ref)


class SlightlyMistraced(RichNet):
    """fx drops the isinstance branch (as test_tangent_replay.Mistraced), here scaling by only
    ``self.factor``: the traced graph is a little off, not O(1)."""

    factor = 1.02

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        if isinstance(h, Tensor):
            h = h * self.factor
        return self.fc(self.drop(h).mean(dim=(2, 3)))


def test_a_float32_graph_two_percent_off_is_not_trusted():
    """The first-use check's float32 bar (no TF32) is tight: a graph 2% off falls back to forward
    AD, rather than passing a bar meant for bf16."""
    teacher, student, x_l, y_l, x_u = _problem(SlightlyMistraced)
    teacher, student = teacher.float(), student.float()
    mpl = _sgd_mpl(teacher, student, jvp="auto")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="logits differ"):
        mpl.step(x_l.float(), y_l, x_u.float())
    assert mpl.last_jvp_path == "forward_ad"


class BarelyMistraced(SlightlyMistraced):
    factor = 1.0 + 1e-5


def test_a_float64_graph_one_in_100000_off_is_not_trusted():
    """In float64 the graph and the module agree bit for bit: the bar is 1e-8, not float32's
    1e-3, which a graph 1e-5 off would pass."""
    teacher, student, x_l, y_l, x_u = _problem(BarelyMistraced)
    mpl = _sgd_mpl(teacher, student, jvp="auto")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="logits differ"):
        mpl.step(x_l, y_l, x_u)
    assert mpl.last_jvp_path == "forward_ad"


class FixedShapeNoise(RichNet):
    """Noise of a fixed shape, one value per input channel: ``torch.randn(3, 1, 1)`` takes no
    proxy, so fx runs it while tracing (a real draw from the global stream) and bakes the value
    into the graph, whose logits then differ from the module's: J comes from forward AD."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x + 0.3 * torch.randn(3, 1, 1, dtype=DT))


def test_tracing_draws_no_random_numbers_of_the_step():
    """The step saves the random stream for J before it traces a new graph, then runs the update
    pass. The trace's draw came in between: forward AD replayed the trace's numbers, not the update
    pass's, and the teacher's gradient was 4.5% off the oracle at the graph's first step (32% for
    an MLP with noise on its features), silently: the warning said only that the step uses
    forward AD. The trace now gives them back: the same steps as with jvp="forward_ad", bit for
    bit."""
    teacher, student, x_l, y_l, x_u = _problem(FixedShapeNoise)
    oracle_teacher, oracle_student = copy.deepcopy((teacher, student))
    torch.manual_seed(0)
    oracle = double_backward_teacher_gradient(
        oracle_teacher,
        oracle_student,
        torch.optim.SGD(oracle_student.parameters(), lr=0.1),
        x_l,
        y_l,
        x_u,
    )
    mpl = _sgd_mpl(teacher, student, jvp="auto", supervised_weight=0.0)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="logits differ"):
        mpl.step(x_l, y_l, x_u)
    got = flat([p.grad for p in teacher.parameters()])
    assert got.norm() > 1e-6
    assert rel_err(got, flat(oracle)) <= 1e-10, rel_err(got, flat(oracle))
    with pytest.warns(UserWarning, match="logits differ"):
        auto, _, _ = _run_steps(FixedShapeNoise, "adamw", "auto", steps=2)
    ref, _, _ = _run_steps(FixedShapeNoise, "adamw", "forward_ad", steps=2)
    _assert_same_state(auto, ref, tol=0.0)


class TangentMistraced(RichNet):
    """The same logits as the traced graph, another derivative: the module detaches one of two
    paths (``isinstance`` is False on fx's proxies, so the graph keeps both). The first use's
    comparison of the traced graph's backward with the module's tells, before that of J."""

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        a = h
        if isinstance(h, Tensor):
            a = h.detach()
        return self.fc(self.drop(h).mean(dim=(2, 3))) + self.fc(a.mean(dim=(2, 3)))


def test_a_graph_with_another_derivative_trains_on_forward_ad_from_its_first_step():
    with pytest.warns(UserWarning, match="backward differs"):
        auto, _, paths = _run_steps(TangentMistraced, "adamw", "auto", steps=2)
    ref, _, _ = _run_steps(TangentMistraced, "adamw", "forward_ad", steps=2)
    assert paths == ["forward_ad"] * 2
    _assert_same_state(auto, ref, tol=0.0)  # the first step too: J is forward AD's, not the tape's
    with pytest.raises(ConfigError, match="backward differs"):
        _run_steps(TangentMistraced, "adamw", "tape", steps=1)


def test_a_checked_graph_whose_tangent_pass_fails_later_raises(monkeypatch):
    """On a graph's first use any failure of the tangent pass means: not this graph (forward AD
    from then on). A graph that passed its check and fails at a later step (out of memory, say)
    raises: a silent switch to forward AD for the rest of the run would hide the error."""
    teacher, student, x_l, y_l, x_u = _problem(RichNet)
    mpl = _sgd_mpl(teacher, student, jvp="auto")
    mpl.step(x_l, y_l, x_u)
    assert mpl.last_jvp_path == "tape"

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(TangentTape, "tangent", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        mpl.step(x_l, y_l, x_u)
    assert [type(t) for t in mpl._tapes.values()] == [TangentTape]
    assert mpl.jvp_fallback_reason is None


HOOKS = {
    "forward": lambda m, f: m.register_forward_hook(lambda *a: f()),
    "forward_pre": lambda m, f: m.register_forward_pre_hook(lambda *a: f()),
    "full_backward": lambda m, f: m.register_full_backward_hook(lambda *a: f()),
    "full_backward_pre": lambda m, f: m.register_full_backward_pre_hook(lambda *a: f()),
}


@pytest.mark.parametrize("kind", list(HOOKS))
def test_a_students_hooks_run_in_the_step(kind):
    """fx runs no hook of an inner module: with a forward hook the step keeps the module's own
    forward, so the hook runs, and J comes from forward AD. A backward hook can change the
    student's gradient where the exact gradient cannot see it: a ConfigError (test_step_usage.py);
    the first-order estimator runs it."""
    teacher, student, x_l, y_l, x_u = _problem(RichNet)
    unhooked_teacher, unhooked_student = copy.deepcopy(teacher), copy.deepcopy(student)
    calls = []
    HOOKS[kind](student.bn1, lambda: calls.append(1))
    if "backward" in kind:
        with pytest.raises(ConfigError, match="backward hook.*allow_student_hooks=True"):
            _sgd_mpl(teacher, student, jvp="auto")
        # a hook that only observes, vouched for: it runs, and the gradient is the unhooked one
        mpl = _sgd_mpl(teacher, student, jvp="auto", allow_student_hooks=True)
        torch.manual_seed(0)
        mpl.step(x_l, y_l, x_u)
        assert calls, kind
        torch.manual_seed(0)
        _sgd_mpl(unhooked_teacher, unhooked_student).step(x_l, y_l, x_u)
        for p, q in zip(teacher.parameters(), unhooked_teacher.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
        calls.clear()
        mpl = _sgd_mpl(teacher, student, estimator="first_order")
        mpl.step(x_l, y_l, x_u)
        assert calls, kind
        return
    mpl = _sgd_mpl(teacher, student, jvp="auto")
    for _ in range(2):
        calls.clear()
        mpl.step(x_l, y_l, x_u)
        assert calls, kind
        assert mpl.last_jvp_path == "forward_ad" and "hooks" in mpl.jvp_fallback_reason


# ----------------------------------------------------------------------------- adjoint check


class TwoBranches(nn.Module):
    """Logits from two linear maps of other features, the first scaled by ``scale``: the adjoint
    check's backward side is a sum of one term per parameter, <B^T u, t> over that parameter,
    and the first term grows as ``scale`` squared while the second stays."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(3, 3, generator=g))
        self.b = nn.Parameter(torch.randn(3, 3, generator=g))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * (x[:, :3] @ self.a) + torch.tanh(x[:, 3:]) @ self.b


def _adjoint_sums(scale: float, x: Tensor) -> list[float]:
    """The check's [<u, J t>, sum of the terms, sum of their sizes] for a float32 TwoBranches
    (what it hands ``average``), after it passed (a refusal raises)."""
    seen: list[list[float]] = []

    def average(tensors):
        seen.append(tensors[0].tolist())

    check_derivatives(
        TwoBranches(scale), model_input("x_u", x, 0), contextlib.nullcontext, False, average
    )
    return seen[-1]


def test_the_adjoint_check_scales_by_its_terms_sizes_not_their_sum():
    """The terms have either sign: here the two parameters' terms cancel (the first branch's
    scale is chosen so, from two probes of the check), and their sum is float32 rounding, as far
    from 0 as <u, J t> is from it. A check relative to that sum (``abs(sum(back))`` as its scale)
    would refuse this exact student (an error of 4.9e-1 here, float32's bar being 1e-3); relative
    to the sum of the terms' sizes the error is float32's 2e-8. (The other way round cannot
    happen: the sum is never larger than the sizes, so that scale could only refuse more.)"""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    _, s1, _ = _adjoint_sums(1.0, x)
    _, s2, _ = _adjoint_sums(2.0, x)
    first = (s2 - s1) / 3  # s(scale) = scale**2 * first + second
    second = s1 - first
    assert first * second < 0, "the premise: terms of opposite signs"
    scale = (-second / first) ** 0.5
    forward, back, size = _adjoint_sums(scale, x)
    assert abs(back) <= 1e-5 * size  # they cancel
    assert abs(forward - back) <= 1e-6 * size
    # the exact step takes this student
    teacher = nn.Linear(6, 3)
    student = TwoBranches(scale)
    mpl = _sgd_mpl(teacher, student, supervised_weight=0.0)
    mpl.step(x[:4], torch.tensor([0, 1, 2, 0]), x)
    assert mpl.step_count == 1


# ----------------------------------------------------------------------------- numerics


def _nesterov(params):
    return torch.optim.SGD(params, lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01)


def test_numerics_gradient_is_the_exact_mpl_gradient_at_its_temperature():
    """mpl_teacher_gradient in float64 on the CPU is grad_Psi R(theta_{t+1}) (the supervised term
    off, dropout off, BatchNorm with batch statistics), by double backward."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=3)
    temperature = 0.6
    got = mpl_teacher_gradient(
        teacher, student, _nesterov, (x_l, y_l, x_u), torch.device("cpu"), DT, None, temperature
    )
    t, s = copy.deepcopy(teacher).train(), copy.deepcopy(student).train()
    t.drop.p = s.drop.p = 0.0
    oracle = double_backward_teacher_gradient(
        t, s, _nesterov(list(s.parameters())), x_l, y_l, x_u, temperature=temperature
    )
    assert got.norm() > 1e-6
    assert rel_err(got, flat(oracle)) <= 1e-10, rel_err(got, flat(oracle))


def test_agreement_metrics_are_cosine_norm_ratio_and_relative_error():
    """Recomputed from the policy's gradient (bf16 autocast, a visible difference) and the float64
    reference (no autocast): norm_ratio = |policy| / |reference|, relative_error = |policy -
    reference| / |reference|."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=3)
    teacher, student = teacher.float(), student.float()
    batch, cpu = (x_l.float(), y_l, x_u.float()), torch.device("cpu")
    got = agreement_with_float64(teacher, student, _nesterov, batch, cpu, torch.bfloat16, 0.6)
    policy = mpl_teacher_gradient(
        teacher, student, _nesterov, batch, cpu, torch.float32, torch.bfloat16, 0.6
    )
    reference = mpl_teacher_gradient(teacher, student, _nesterov, batch, cpu, DT, None, 0.6)
    want = {
        "cosine": float(F.cosine_similarity(policy, reference, dim=0)),
        "norm_ratio": float(policy.norm() / reference.norm()),
        "relative_error": float((policy - reference).norm() / reference.norm()),
        "reference_norm": float(reference.norm()),
    }
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9), k
    assert abs(want["norm_ratio"] - 1.0) > 1e-4  # the two directions of the ratio differ here
    assert want["relative_error"] > 1e-4


# ----------------------------------------------------------------------------- first order


def _linear_problem(seed: int = 0, n_u: int = 64):
    """Linear teacher (sharp logits) and student; no dropout, so sampling is the first draw."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher, student = nn.Linear(4, 3).to(DT), nn.Linear(4, 3).to(DT)
    with torch.no_grad():
        teacher.weight.mul_(6.0)
    x_l = torch.randn(8, 4, generator=g, dtype=DT)
    y_l = torch.randint(0, 3, (8,), generator=g)
    x_u = torch.randn(n_u, 4, generator=g, dtype=DT)
    return teacher, student, x_l, y_l, x_u


def test_first_order_samples_the_students_labels_at_the_temperature():
    """The student learns y_hat ~ softmax(teacher(x_u) / T): a copy trained on labels drawn so,
    after the same seed, lands on the same weights."""
    teacher, student, x_l, y_l, x_u = _linear_problem()
    temperature = 4.0
    ref = copy.deepcopy(student)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.5),
        temperature=temperature,
        estimator="first_order",
    )
    torch.manual_seed(3)
    with torch.no_grad():
        q = F.softmax(teacher(x_u) / temperature, dim=-1)
    y_hat = torch.distributions.Categorical(probs=q).sample()
    F.cross_entropy(ref(x_u), y_hat).backward()
    torch.optim.SGD(ref.parameters(), lr=0.5).step()
    torch.manual_seed(3)
    mpl.step(x_l, y_l, x_u)
    for mine, theirs in zip(student.parameters(), ref.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)


class _SameShard:
    """Data parallelism where every process holds this process's batches: averaging across
    processes changes nothing."""

    world_size = 2

    def mean_(self, tensors) -> None:
        pass


def test_first_order_term_sums_over_all_processes_examples():
    """With world_size processes holding the same shard, the whole batch is world_size copies of
    it: the REINFORCE term, a sum over examples, is world_size times one process's; the student
    (a batch mean) moves as it does alone."""
    grads, students = [], []
    for sync in (None, _SameShard()):
        teacher, student, x_l, y_l, x_u = _linear_problem(n_u=12)
        mpl = MetaPseudoLabels(
            teacher,
            student,
            torch.optim.SGD(teacher.parameters(), lr=0.1),
            torch.optim.SGD(student.parameters(), lr=0.5),
            supervised_weight=0.0,
            estimator="first_order",
            grad_sync=sync,
        )
        torch.manual_seed(1)
        mpl.step(x_l, y_l, x_u)
        grads.append(flat(p.grad for p in teacher.parameters()))
        students.append(flat(p.detach() for p in student.parameters()))
    assert grads[0].norm() > 1e-8
    torch.testing.assert_close(grads[1], 2.0 * grads[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(students[1], students[0], rtol=0, atol=0)
