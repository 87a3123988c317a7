"""Gaps a hand-made mutation audit found in the exact step's helper modules: the double-backward
oracle itself (metapl.mpl.reference, also checked here on its own against finite differences of
the real optimizer step), model inputs (metapl.mpl.inputs), the double-backward checks
(metapl.mpl.double_backward_checks) and the stacked models of the two-moons experiment
(metapl.experiments.stacked).

Tiny models, no training: each test takes a fraction of a second, once torch has warmed up in
the process (the first oracle call of a process takes a few seconds, whichever test makes it).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from mpl_helpers import MLP, STUDENT_OPTIMIZERS, FiniteDifferenceProbe, flat, make_problem, rel_err
from torch import Tensor, nn

from metapl.errors import ConfigError, DataError
from metapl.experiments.stacked import StackedMLP
from metapl.mpl import double_backward_teacher_gradient
from metapl.mpl.double_backward_checks import check_gradient_derivative, grad_to_targets
from metapl.mpl.inputs import holding, joint_forward, model_input, restoring_functional_call

# ----------------------------------------------------------------------------- reference (oracle)


def _check_the_oracle_by_finite_differences(teacher, student, optimizer, batches, seed, **kwargs):
    """The oracle's teacher gradient, put in ``.grad``, against central finite differences of R
    through the real optimizer step (FiniteDifferenceProbe), with the step's options ``kwargs``."""
    factory = STUDENT_OPTIMIZERS[optimizer]
    s_opt = factory(student.parameters())
    gen = torch.Generator().manual_seed(0)
    probe = FiniteDifferenceProbe(
        teacher, student, s_opt, factory, *batches, gen=gen, seed=seed, **kwargs
    )
    torch.manual_seed(seed)
    grads = double_backward_teacher_gradient(teacher, student, s_opt, *batches, **kwargs)
    for p, g in zip(teacher.parameters(), grads):
        p.grad = g
    probe.check("oracle")


def test_the_oracle_on_its_own_matches_finite_differences_of_the_real_step():
    """The double-backward oracle that the step's tests trust, checked directly against central
    finite differences of R through the REAL optimizer step (not only through the step it
    checks), with a temperature and the student's own labeled loss."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=3)
    _check_the_oracle_by_finite_differences(
        teacher,
        student,
        "sgd_momentum",
        (x_l, y_l, x_u),
        seed=11,
        temperature=0.7,
        student_labeled_weight=0.5,
    )


def test_the_oracle_modifies_nothing():
    """The oracle reads the models and the optimizer and changes none of them: not a parameter,
    not a BatchNorm's running statistics (of the teacher or the student), not the optimizer's
    momentum, so that the step under test starts from the very same point."""
    teacher, student, x_l, y_l, x_u = make_problem("conv", seed=6)
    s_opt = STUDENT_OPTIMIZERS["adam"](student.parameters())
    student(x_u).sum().backward()
    s_opt.step()  # an optimizer with state
    s_opt.zero_grad()

    def snapshot():
        tensors = [*teacher.state_dict().values(), *student.state_dict().values()]
        tensors += [t for st in s_opt.state.values() for t in st.values()]
        return [t.detach().clone() for t in tensors]

    before = snapshot()
    torch.manual_seed(6)
    double_backward_teacher_gradient(
        teacher, student, s_opt, x_l, y_l, x_u, student_labeled_weight=0.3
    )
    after = snapshot()
    assert len(after) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


class _CountingStudent(nn.Module):
    """Logits scaled by a step counter that the forward itself advances (a buffer it reads and
    updates in place)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        self.count.add_(1.0)
        return self.fc(x) * (0.5 * self.count)


def test_the_oracles_passes_after_the_update_see_the_buffers_as_the_update_pass_left_them():
    """With the student's own labeled loss, the labeled pass at theta_t runs on a copy of the
    buffers: the pass at theta_{t+1} sees them advanced once (by the update pass), as the real
    step leaves them, not twice."""
    teacher, _, x_l, y_l, x_u = make_problem("mlp", seed=4)
    torch.manual_seed(4)
    student = _CountingStudent().double().train()
    _check_the_oracle_by_finite_differences(
        teacher, student, "sgd", (x_l, y_l, x_u), seed=5, student_labeled_weight=0.5
    )
    assert float(student.count) == 0.0  # nothing of the student's own was touched


class _TeacherWithAnUnusedParameter(MLP):
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.ones(4))


def test_the_oracle_gives_an_unused_teacher_parameter_a_zero_gradient():
    """A teacher parameter that no forward reaches gets a gradient of exactly zero (its place in
    the list kept), as the step leaves it."""
    _, student, x_l, y_l, x_u = make_problem("mlp", seed=2)
    torch.manual_seed(2)
    teacher = _TeacherWithAnUnusedParameter().double().train()
    s_opt = torch.optim.SGD(student.parameters(), lr=0.3)
    grads = double_backward_teacher_gradient(teacher, student, s_opt, x_l, y_l, x_u)
    names = [n for n, _ in teacher.named_parameters()]
    assert len(grads) == len(names)
    by_name = dict(zip(names, grads))
    assert torch.equal(by_name["unused"], torch.zeros(4, dtype=torch.float64))
    assert by_name["fc2.weight"].abs().sum() > 0


class _Member(nn.Module):
    """Member ``e`` of a StackedMLP as an ordinary model: x [N, d] -> logits [N, C]."""

    def __init__(self, stacked: StackedMLP, e: int):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(w[e : e + 1].clone()) for w in stacked.weights)
        self.biases = nn.ParameterList(nn.Parameter(b[e : e + 1].clone()) for b in stacked.biases)

    def forward(self, x: Tensor) -> Tensor:
        x = x.unsqueeze(0)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        return x.squeeze(0)


def test_the_oracle_with_batch_dim_1_is_each_members_own_oracle():
    """Ensembles along dimension 0 (batch_dim=1, losses summed over members): the oracle's
    gradient for each member is the one it gives that member alone."""
    g = torch.Generator().manual_seed(0)
    teacher = StackedMLP(2, 5, 3, hidden=6, generator=g).double()
    student = StackedMLP(2, 5, 3, hidden=6, generator=g).double()
    x_l = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    x_u = torch.randn(2, 8, 5, generator=g, dtype=torch.float64)
    y_l = torch.randint(0, 3, (2, 6), generator=g)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.5)
    stacked = double_backward_teacher_gradient(
        teacher, student, s_opt, x_l, y_l, x_u, temperature=0.8, batch_dim=1
    )
    for e in range(2):
        t_e, s_e = _Member(teacher, e), _Member(student, e)
        alone = double_backward_teacher_gradient(
            t_e,
            s_e,
            torch.optim.SGD(s_e.parameters(), lr=0.5),
            x_l[e],
            y_l[e],
            x_u[e],
            temperature=0.8,
        )
        mine = flat(grad[e] for grad in stacked)
        assert rel_err(mine, flat(alone)) <= 1e-12, e
        assert flat(alone).norm() > 1e-6


def test_the_oracle_refuses_what_the_step_refuses():
    """The oracle's inputs get the step's checks (labels out of range, a temperature of 0, an
    optimizer over another model's parameters): a test that fed it a wrong batch got a clear
    error, not a raw one from deep inside torch or a gradient without a word."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp", seed=1)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.3)
    too_high = y_l.clone()
    too_high[0] = 3
    with pytest.raises(DataError, match=r"y_labeled out of range: found 0\.\.3, the model has 3"):
        double_backward_teacher_gradient(teacher, student, s_opt, x_l, too_high, x_u)
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0, got 0.0"):
        double_backward_teacher_gradient(teacher, student, s_opt, x_l, y_l, x_u, temperature=0.0)
    other = torch.optim.SGD(teacher.parameters(), lr=0.3)
    with pytest.raises(ConfigError, match="student_optimizer must optimize the student's own"):
        double_backward_teacher_gradient(teacher, student, other, x_l, y_l, x_u)


# ----------------------------------------------------------------------------- inputs


def test_batches_that_differ_before_batch_dim_get_one_forward_each():
    """With batch_dim=1 (say sequence-first tensors [T, N, d]) a labeled and an unlabeled batch of
    other lengths T cannot be concatenated: the teacher runs once on each, not into torch.cat's
    size error."""
    x_l = model_input("x_labeled", torch.randn(4, 6, 5), batch_dim=1)
    x_u = model_input("x_unlabeled", torch.randn(7, 8, 5), batch_dim=1)
    calls = []

    def forward(x, what):
        calls.append((tuple(x.args[0].shape), what))
        return x.args[0][..., :3]

    out = joint_forward(forward, [("labeled", x_l), ("unlabeled", x_u)], batch_dim=1)
    assert calls == [((4, 6, 5), "the labeled batch"), ((7, 8, 5), "the unlabeled batch")]
    assert [tuple(o.shape) for o in out] == [(4, 6, 3), (7, 8, 3)]
    same = model_input("x_unlabeled", torch.randn(4, 8, 5), batch_dim=1)
    calls.clear()
    out = joint_forward(forward, [("labeled", x_l), ("unlabeled", same)], batch_dim=1)
    assert calls == [((4, 14, 5), "the labeled and unlabeled batches (one forward on all of them)")]
    assert [tuple(o.shape) for o in out] == [(4, 6, 3), (4, 8, 3)]


def test_a_block_registered_under_two_names_keeps_its_parameters_after_a_functional_call():
    """ALBERT-style sharing (one block, two names): after a call with plain tensors in place of
    the parameters, the block holds its own Parameters again, the ones its optimizer updates."""
    block = nn.Linear(3, 3)
    net = nn.Sequential(block, nn.ReLU(), block)
    weight, bias = block.weight, block.bias
    state = {"0.weight": torch.zeros(3, 3), "0.bias": torch.ones(3)}
    out = restoring_functional_call(net, state, (torch.randn(2, 3),), {})
    assert torch.equal(out, torch.ones(2, 3))  # the call itself ran with the state's tensors
    assert block.weight is weight and block.bias is bias
    assert [p is q for p, q in zip(net.parameters(), (weight, bias))] == [True, True]


def test_holding_a_state_that_names_a_shared_block_twice_gives_its_own_back():
    """A state listing a shared block under both its names (named_parameters(
    remove_duplicate=False)) is undone in reverse: the block ends with its own Parameter."""
    block = nn.Linear(3, 3)
    net = nn.Sequential(block, nn.ReLU(), block)
    weight = block.weight
    with holding(net, {"0.weight": torch.zeros(3, 3), "2.weight": torch.ones(3, 3)}):
        assert torch.equal(block.weight, torch.ones(3, 3))
    assert block.weight is weight


def test_a_nested_tensor_of_the_strided_layout_is_refused_by_name():
    """torch.nested.nested_tensor's default layout is strided: it is a nested tensor all the same,
    refused with the way out, as a jagged one is (not torch's NotImplementedError later)."""
    with warnings.catch_warnings():  # torch's "prototype stage" UserWarning for this layout
        warnings.simplefilter("ignore", UserWarning)
        nested = torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(5, 4)])
    assert nested.layout == torch.strided and nested.is_nested
    with pytest.raises(DataError, match=r"x_unlabeled is a nested tensor: the step takes dense"):
        model_input("x_unlabeled", nested, batch_dim=0)


def test_a_dict_inside_a_tuple_input_is_a_nested_container():
    with pytest.raises(DataError, match=r"^x_labeled\[1\] is a dict: nested containers are not"):
        model_input("x_labeled", (torch.randn(2, 3), {"mask": torch.ones(2, 3)}), batch_dim=0)


# ----------------------------------------------------------------------------- double_backward_checks


def _student_gradient(scale: float, detached: str = ""):
    """(grads, theta, targets, loss_of) of a linear student whose loss is ``scale`` times a soft
    cross-entropy; ``detached``: a backward computed off the graph (numpy, .detach()), "all" of
    it, or all but a term in the parameters ("targets": no path to the teacher's targets)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_()
    logits = x @ w
    q = torch.softmax(torch.randn(6, 3, generator=g, dtype=torch.float64), -1).requires_grad_()

    def loss_of(d: Tensor) -> Tensor:
        return scale * -(d * torch.log_softmax(logits, -1)).sum(-1).mean()

    (grad,) = torch.autograd.grad(loss_of(q), w, create_graph=True)
    if detached == "all":
        grad = grad.detach()
    elif detached == "targets":
        grad = grad.detach() + 0.0 * w
    return [grad], [w], q, loss_of


@pytest.mark.parametrize("detached", ["all", "targets"])
@pytest.mark.parametrize("scale", [1.0, 1e-9])
def test_a_detached_student_gradient_is_refused_at_any_scale_of_the_loss(scale, detached):
    """The comparison is relative: a loss scaled down (a small loss weight, say) does not hide a
    backward without a derivative, and a right one passes at any scale."""
    with pytest.raises(ConfigError, match="returns a gradient that its graph does not link"):
        check_gradient_derivative(*_student_gradient(scale, detached), tol=1e-6)
    for linked_scale in (scale, 1e6):
        check_gradient_derivative(*_student_gradient(linked_scale), tol=1e-6)


def test_every_parameters_gradient_is_checked_for_its_derivative():
    """A backward off the graph in the second of two parameters only (the bias, say) is refused
    as well: each reached gradient takes part in the comparison, not only the first."""
    grads, theta, q, loss_of = _student_gradient(1.0)
    g = torch.Generator().manual_seed(1)
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    logits = x @ theta[0] + b

    def with_bias(d: Tensor) -> Tensor:
        return -(d * torch.log_softmax(logits, -1)).sum(-1).mean()

    g_w, g_b = torch.autograd.grad(with_bias(q), [theta[0], b], create_graph=True)
    check_gradient_derivative([g_w, g_b], [theta[0], b], q, with_bias, tol=1e-6)
    with pytest.raises(ConfigError, match="returns a gradient that its graph does not link"):
        check_gradient_derivative([g_w, g_b.detach()], [theta[0], b], q, with_bias, tol=1e-6)


def test_a_risk_that_does_not_reach_the_targets_sends_them_no_gradient():
    """grad_to_targets: when R(theta_{t+1}) does not depend on the teacher's targets at all, their
    gradient is zero (the teacher's MPL signal is nothing), not anything else."""
    q = torch.softmax(torch.randn(4, 3), -1).requires_grad_()
    w = torch.randn(3, requires_grad=True)
    assert torch.equal(grad_to_targets((2 * w).sum(), q), torch.zeros(4, 3))


# ----------------------------------------------------------------------------- stacked


def test_a_stacked_mlp_starts_as_pytorchs_linear_layers_do_from_its_generator():
    """Each member's layers start as nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
    weights and biases alike, drawn from the given generator only: the same seed gives the same
    members whatever torch's global generator did (the two-moons runs are seeded by it)."""
    torch.manual_seed(0)
    a = StackedMLP(3, 4, 2, hidden=16, depth=2, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    b = StackedMLP(3, 4, 2, hidden=16, depth=2, generator=torch.Generator().manual_seed(7))
    assert a.members == 3
    assert [tuple(w.shape) for w in a.weights] == [(3, 4, 16), (3, 16, 16), (3, 16, 2)]
    assert [tuple(p.shape) for p in a.biases] == [(3, 1, 16), (3, 1, 16), (3, 1, 2)]
    for w, bias, fan_in in zip(a.weights, a.biases, (4, 16, 16)):
        bound = fan_in**-0.5
        assert w.abs().max() <= bound and bias.abs().max() <= bound
        assert w.max() > 0.5 * bound and w.min() < -0.5 * bound  # both signs, the full range
        assert bias.max() > 0 > bias.min()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_a_stacked_member_is_an_mlp_with_dropout_only_before_its_classifier():
    """Member e computes relu(x W1 + b1) -> relu(. W2 + b2) -> dropout -> . W3 + b3: logits (no
    ReLU on them), biases included, and dropout on the classifier's input only."""
    g = torch.Generator().manual_seed(3)
    model = StackedMLP(2, 3, 4, hidden=5, depth=2, dropout=0.5, generator=g)
    x = torch.randn(2, 7, 3, generator=g)
    model.eval()
    want = x
    for i, (w, bias) in enumerate(zip(model.weights, model.biases)):
        want = want @ w + bias
        if i < 2:
            want = torch.relu(want)
    assert torch.allclose(model(x), want, atol=1e-6)
    assert (model(x) < 0).any()  # logits, not ReLU'd
    model.train()
    seen = []
    model.dropout.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-1]))
    model(x)
    assert seen == [5]  # the hidden features reach dropout, the 3 input features never do
