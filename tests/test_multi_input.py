"""Models of several inputs (token ids and a mask): the step takes a tuple or list of tensors
(``model(*x)``) or a dict of tensors (``model(**x)``) as well as one tensor.

The exact teacher gradient is checked as in test_exact_gradient.py: in float64 over two steps,
against the double-backward oracle and central finite differences of the REAL optimizer step
(mpl_helpers, torch alone), by both ways of computing J; the student's update against its own
optimizer's. The models embed int64 token ids: no tangent may reach them, and the finite-values
check must skip them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from exact_checks import checked_exact_step
from mpl_helpers import (
    N_CLASSES,
    STUDENT_OPTIMIZERS,
    TEST_DEVICE,
    flat,
    randomize_bn,
    rel_err,
)
from torch import Tensor, nn

from metapl import MetaPseudoLabels, TeacherLogits
from metapl.errors import ConfigError, DataError
from metapl.mpl import TangentTape, double_backward_teacher_gradient
from metapl.mpl.inputs import holding

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64
VOCAB, DIM, HIDDEN = 13, 6, 7
N_L, N_U = 6, 8


class TokenClassifier(nn.Module):
    """Embedding of int64 token ids, mean over the positions a float mask keeps, then Linear (no
    bias) -> BatchNorm1d -> tanh -> Dropout -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.bn = nn.BatchNorm1d(HIDDEN)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(HIDDEN, N_CLASSES)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        kept = mask.unsqueeze(-1)
        pooled = (self.emb(ids) * kept).sum(1) / kept.sum(1)
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(pooled)))))


class OptionalMask(TokenClassifier):
    """The mask may be left out (every position kept): fx traces ``mask`` as a proxy, so its
    graph always multiplies by it; a call without it is another function than the traced one."""

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            mask = torch.ones(ids.shape, dtype=self.emb.weight.dtype, device=ids.device)
        return super().forward(ids, mask)


def _tokens(g: torch.Generator, n: int, length: int) -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = (torch.rand(n, length, generator=g) < 0.7).to(DT)
    mask[:, 0] = 1.0  # every example keeps a token
    return ids.to(TEST_DEVICE), mask.to(TEST_DEVICE)


def _as(kind: str, ids: Tensor, mask: Tensor):
    """The batch as the caller passes it: a tuple, a list, or a dict (keys in another order than
    the forward's arguments: they bind by name)."""
    if kind == "dict":
        return {"mask": mask, "ids": ids}
    return [ids, mask] if kind == "list" else (ids, mask)


def _problem(seed: int, kind: str = "tuple", lengths=(5, 5), model=TokenClassifier):
    """(teacher, student, x_l, y_l, x_u, new_unlabeled): ``new_unlabeled(step)`` is a fresh
    unlabeled batch of the same kind."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher, student = model(), model()
    randomize_bn(teacher, g)
    randomize_bn(student, g)
    x_l = _as(kind, *_tokens(g, N_L, lengths[0]))
    y_l = torch.randint(0, N_CLASSES, (N_L,), generator=g).to(TEST_DEVICE)
    x_u = _as(kind, *_tokens(g, N_U, lengths[1]))

    def new_unlabeled(step: int):
        return _as(kind, *_tokens(torch.Generator().manual_seed(500 + step), N_U, lengths[1]))

    teacher, student = teacher.to(TEST_DEVICE, DT).train(), student.to(TEST_DEVICE, DT).train()
    return teacher, student, x_l, y_l, x_u, new_unlabeled


def _sgd_mpl(teacher: nn.Module, student: nn.Module, **options) -> MetaPseudoLabels:
    """A step with plain SGD (lr 0.1) for both models: for the tests of what the step accepts."""
    t_opt, s_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (teacher, student))
    return MetaPseudoLabels(teacher, student, t_opt, s_opt, **options)


def _assert_teacher_gradient_is(teacher: nn.Module, oracle) -> None:
    """The teacher's gradient is not trivially zero and is ``oracle``'s, up to a relative 1e-10."""
    exact = flat(p.grad for p in teacher.parameters())
    assert exact.norm() > 1e-6
    assert rel_err(exact, flat(oracle)) <= 1e-10


# ----------------------------------------------------------------------------- exact gradient


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
@pytest.mark.parametrize(
    "kind, lengths",
    [("tuple", (5, 5)), ("dict", (5, 5)), ("list", (4, 6))],
    ids=["tuple", "dict", "list-other-lengths"],
)
@pytest.mark.parametrize("jvp", ["forward_ad", "tape"])
def test_exact_gradient_of_a_two_input_student(opt_name, kind, lengths, jvp):
    """Two steps; before each, the oracle, finite differences and the student's real optimizer
    step at the same point. Other lengths for x_l and x_u: the teacher runs two forwards (its
    leaves cannot be concatenated), and the oracles must see the same."""
    factory = STUDENT_OPTIMIZERS[opt_name]
    teacher, student, x_l, y_l, _, new_unlabeled = _problem(3, kind, lengths)
    s_opt = factory(student.parameters())
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.5),
        s_opt,
        temperature=0.8,
        supervised_weight=0.0,
        jvp=jvp,
    )
    gen = torch.Generator().manual_seed(11)
    for step in range(2):
        seed, x_u = 1234 + step, new_unlabeled(step)
        checked_exact_step(mpl, factory, x_l, y_l, x_u, seed=seed, gen=gen, temperature=0.8)
        assert mpl.last_jvp_path == jvp, mpl.jvp_fallback_reason
    assert student.emb.weight.grad is not None  # the embedding learns, from integer ids


def test_the_teacher_sees_another_kind_of_input_than_the_student():
    """teacher_x_labeled / teacher_x_unlabeled as dicts while the student takes tuples, and the
    teacher sees every token (its own mask): the step and the oracle agree."""
    teacher, student, x_l, y_l, x_u, _ = _problem(4)
    t_l, t_u = ({"ids": ids, "mask": torch.ones_like(mask)} for ids, mask in (x_l, x_u))
    s_opt = torch.optim.Adam(student.parameters(), lr=0.01, eps=1e-3)
    torch.manual_seed(7)
    oracle = double_backward_teacher_gradient(
        teacher, student, s_opt, x_l, y_l, x_u, teacher_x_labeled=t_l, teacher_x_unlabeled=t_u
    )
    mpl = MetaPseudoLabels(
        teacher, student, torch.optim.SGD(teacher.parameters(), lr=0.1), s_opt, supervised_weight=0
    )
    torch.manual_seed(7)
    mpl.step(x_l, y_l, x_u, teacher_x_labeled=t_l, teacher_x_unlabeled=t_u)
    _assert_teacher_gradient_is(teacher, oracle)


# ----------------------------------------------------------------------------- other paths


def _run(estimator: str, steps: int = 3, kind: str = "dict"):
    teacher, student, x_l, y_l, _, new_unlabeled = _problem(5, kind)
    t0, s0 = flat(teacher.parameters()).detach().clone(), flat(student.parameters()).detach()
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9, nesterov=True),
        torch.optim.AdamW(student.parameters(), lr=0.01, eps=1e-3, weight_decay=0.1),
        temperature=0.8,
        estimator=estimator,
        student_labeled_weight=0.5,
    )
    torch.manual_seed(11)
    metrics = [mpl.step(x_l, y_l, new_unlabeled(s)) for s in range(steps)]
    assert rel_err(flat(teacher.parameters()).detach(), t0) > 1e-4
    assert rel_err(flat(student.parameters()).detach(), s0.clone()) > 1e-4
    assert all(torch.isfinite(v).all() for m in metrics for v in m.values())
    return teacher, student


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_the_double_backward_step_equals_the_exact_step(kind):
    """Both estimators, side by side from the same weights and seed, with the student's own
    labeled loss: the same teachers and students after three steps."""
    t_exact, s_exact = _run("exact", kind=kind)
    t_db, s_db = _run("double_backward", kind=kind)
    for a, b in ((t_exact, t_db), (s_exact, s_db)):
        assert rel_err(flat(a.parameters()).detach(), flat(b.parameters()).detach()) < 1e-10
        assert rel_err(flat(a.buffers()), flat(b.buffers())) < 1e-10


def test_the_first_order_step_moves_both_models():
    _run("first_order")


class StackedBag(nn.Module):
    """E independent bags of embeddings stacked on dimension 0: ids, mask [E, N, L] -> [E, N, C]."""

    def __init__(self, members: int, g: torch.Generator):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(members, VOCAB, DIM, generator=g, dtype=DT))
        self.w = nn.Parameter(torch.randn(members, DIM, N_CLASSES, generator=g, dtype=DT) / 2)
        self.b = nn.Parameter(0.1 * torch.randn(members, 1, N_CLASSES, generator=g, dtype=DT))

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        member = torch.arange(ids.shape[0], device=ids.device)[:, None, None]
        return _bag(self.emb[member, ids], mask) @ self.w + self.b


class MemberBag(nn.Module):
    """Member ``e`` of a StackedBag as an ordinary model: ids, mask [N, L] -> logits [N, C]."""

    def __init__(self, stacked: StackedBag, e: int):
        super().__init__()
        for name, p in stacked.named_parameters():
            setattr(self, name, nn.Parameter(p.detach()[e].clone()))

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return _bag(self.emb[ids], mask) @ self.w + self.b


def _bag(embedded: Tensor, mask: Tensor) -> Tensor:
    kept = mask.unsqueeze(-1)
    return torch.tanh((embedded * kept).sum(-2) / kept.sum(-2))


def test_batch_dim_1_ensemble_of_two_input_models_with_an_extra_teacher_input():
    """Every leaf holds the examples along batch_dim 1 (members first); the members get the
    update they get alone, the extra teacher input (a pair too) included."""
    E = 3
    g = torch.Generator().manual_seed(0)
    teacher, student = StackedBag(E, g).to(TEST_DEVICE), StackedBag(E, g).to(TEST_DEVICE)

    def batch(n: int, length: int) -> tuple[Tensor, Tensor]:
        ids, mask = _tokens(g, E * n, length)
        return ids.reshape(E, n, length), mask.reshape(E, n, length)

    x_l, x_u, x_e = batch(N_L, 5), batch(N_U, 5), batch(4, 3)
    y_l = torch.randint(0, N_CLASSES, (E, N_L), generator=g).to(TEST_DEVICE)

    def extra_loss(logits: TeacherLogits) -> Tensor:
        return 0.1 * logits.extra[0].pow(2).mean(dim=(-2, -1)).sum()

    def build(t, s, batch_dim):
        return MetaPseudoLabels(
            t,
            s,
            torch.optim.SGD(t.parameters(), lr=0.1, momentum=0.5),
            torch.optim.Adam(s.parameters(), lr=0.01, eps=1e-3),
            temperature=1.5,
            teacher_extra_loss=extra_loss,
            batch_dim=batch_dim,
        )

    alone = [(MemberBag(teacher, e), MemberBag(student, e)) for e in range(E)]
    ens = build(teacher, student, batch_dim=1)
    singles = [build(t, s, batch_dim=0) for t, s in alone]
    for _ in range(2):
        ens.step(x_l, y_l, x_u, teacher_extra_inputs=[x_e])
        for e, (mpl, (t, s)) in enumerate(zip(singles, alone)):
            member = [tuple(leaf[e] for leaf in x) for x in (x_l, x_u, x_e)]
            mpl.step(member[0], y_l[e], member[1], teacher_extra_inputs=[member[2]])
            for p_ens, p_one in zip(teacher.parameters(), t.parameters()):
                assert p_one.grad.abs().max() > 1e-6
                torch.testing.assert_close(p_ens.grad[e], p_one.grad, rtol=1e-10, atol=1e-12)
            for p_ens, p_one in zip(student.parameters(), s.parameters()):
                torch.testing.assert_close(p_ens[e], p_one, rtol=1e-10, atol=1e-12)


class OneTokenEach(nn.Module):
    """One token id and one weight per example: leaves of shape [N], whose only dimension holds
    the examples."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.fc = nn.Linear(DIM, N_CLASSES)

    def forward(self, ids: Tensor, weight: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.emb(ids) * weight.unsqueeze(-1)))


def test_leaves_of_one_dimension_hold_one_value_per_example():
    """A leaf needs batch_dim + 1 dimensions, not more: [N] token ids and [N] weights are a
    batch of N examples (and the teacher concatenates them)."""
    g = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    teacher, student = (OneTokenEach().to(TEST_DEVICE, DT) for _ in range(2))

    def batch(n: int) -> tuple[Tensor, Tensor]:
        ids, weight = torch.randint(0, VOCAB, (n,), generator=g), torch.rand(n, generator=g)
        return ids.to(TEST_DEVICE), (0.5 + weight).to(TEST_DEVICE, DT)

    x_l, x_u = batch(N_L), batch(N_U)
    y_l = torch.randint(0, N_CLASSES, (N_L,), generator=g).to(TEST_DEVICE)
    s_opt = torch.optim.Adam(student.parameters(), lr=0.01, eps=1e-3)
    torch.manual_seed(3)
    oracle = double_backward_teacher_gradient(teacher, student, s_opt, x_l, y_l, x_u)
    mpl = MetaPseudoLabels(
        teacher, student, torch.optim.SGD(teacher.parameters(), lr=0.1), s_opt, supervised_weight=0
    )
    torch.manual_seed(3)
    mpl.step(x_l, y_l, x_u)
    _assert_teacher_gradient_is(teacher, oracle)


# ----------------------------------------------------------------------------- the teacher's forward


@pytest.mark.parametrize(
    "lengths, extra, calls",
    [
        ((5, 5), None, [N_L + N_U]),
        ((4, 6), None, [N_L, N_U]),
        ((5, 5), "dict", [N_L, N_U, 2]),
        ((5, 5), "tuple", [N_L + N_U + 2]),
    ],
    ids=["one-forward", "other-lengths", "extra-of-another-kind", "extra-in-the-one-forward"],
)
def test_the_teacher_runs_one_forward_when_the_inputs_line_up(lengths, extra, calls):
    """Concatenated leaf by leaf when every leaf's shape agrees but for the examples (BatchNorm
    sees all of them together), one forward per input otherwise."""
    teacher, student, x_l, y_l, x_u, _ = _problem(6, lengths=lengths)
    ids, mask = x_u
    extras = {
        None: [],
        "dict": [{"ids": ids[:2], "mask": mask[:2]}],
        "tuple": [(ids[:2], mask[:2])],
    }[extra]
    seen: list[int] = []  # the examples of each teacher forward (a dict arrives as keywords)
    teacher.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(len((*args, *kwargs.values())[0])), with_kwargs=True
    )
    mpl = _sgd_mpl(
        teacher,
        student,
        teacher_extra_loss=(lambda logits: logits.extra[0].sum() * 0) if extras else None,
    )
    mpl.step(x_l, y_l, x_u, teacher_extra_inputs=extras)
    assert seen == calls


# ----------------------------------------------------------------------------- the tangent tape


def _auto_mpl(teacher: nn.Module, student: nn.Module) -> MetaPseudoLabels:
    """jvp="auto" (the tape where it holds, forward AD where not), a momentum SGD student and no
    supervised term: the step of the tape's checks."""
    s_opt = torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.05)
    return MetaPseudoLabels(teacher, student, t_opt, s_opt, supervised_weight=0.0, jvp="auto")


def _falls_back_to_forward_ad_exactly(mpl: MetaPseudoLabels, x_l, y_l: Tensor, x_u, warning: str):
    """A step of ``mpl`` on this batch warns ``warning`` and computes J by forward AD, and the
    teacher's gradient is double backward's from the same weights and seed."""
    torch.manual_seed(3)
    oracle = double_backward_teacher_gradient(
        mpl.teacher, mpl.student, mpl.student_optimizer, x_l, y_l, x_u
    )
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match=warning):
        mpl.step(x_l, y_l, x_u)
    assert mpl.last_jvp_path == "forward_ad"
    _assert_teacher_gradient_is(mpl.teacher, oracle)


def test_the_tape_is_checked_for_each_way_of_calling_the_student():
    """fx traces every argument of the forward, also one a call leaves at its default. A tuple
    and then a dict of the same tensors run the same graph (each checked once); leaving the mask
    out runs the traced graph without the value it multiplies by: that call structure falls back
    to forward AD (``jvp="auto"``), with the reason, and the gradient stays exact. The ways of
    calling it that passed their checks keep the graph (it was given up for every way before)."""
    teacher, student, x_l, y_l, x_u, _ = _problem(8, model=OptionalMask)
    mpl = _auto_mpl(teacher, student)
    as_dict = [{"ids": ids, "mask": mask} for ids, mask in (x_l, x_u)]
    for batches in ((x_l, x_u), as_dict):
        mpl.step(batches[0], y_l, batches[1])
        assert mpl.last_jvp_path == "tape", mpl.jvp_fallback_reason
    (tape,) = mpl._tapes.values()
    assert isinstance(tape, TangentTape) and len(tape.checked) == 2

    ids_only = [(ids,) for ids, _ in (x_l, x_u)]
    _falls_back_to_forward_ad_exactly(
        mpl, ids_only[0], y_l, ids_only[1], "the traced student fails"
    )
    assert "the traced student fails" in str(mpl.jvp_fallback_reason)
    (tape,) = mpl._tapes.values()
    assert len(tape.failed) == 1 and len(tape.checked) == 2  # ids alone; tuple and dict

    mpl.step(x_l, y_l, x_u)  # the tuple again: the graph, exact
    assert mpl.last_jvp_path == "tape" and mpl.jvp_fallback_reason is None
    torch.manual_seed(3)
    oracle = double_backward_teacher_gradient(
        mpl.teacher, mpl.student, mpl.student_optimizer, x_l, y_l, x_u
    )
    torch.manual_seed(3)
    mpl.step(x_l, y_l, x_u)
    assert mpl.last_jvp_path == "tape"
    _assert_teacher_gradient_is(mpl.teacher, oracle)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, at its first use
        mpl.step(ids_only[0], y_l, ids_only[1])
    assert mpl.last_jvp_path == "forward_ad"
    assert "the traced student fails" in str(mpl.jvp_fallback_reason)

    t2, s2 = _problem(8, model=OptionalMask)[:2]
    strict = _sgd_mpl(t2, s2, jvp="tape")
    with pytest.raises(ConfigError, match="jvp='tape': the student cannot use the tangent tape"):
        strict.step(ids_only[0], y_l, ids_only[1])


def test_a_traced_graph_that_fails_prints_nothing(capsys):
    """fx prints the generated code's traceback to stderr when a traced graph fails: the step
    gives the graph up with a warning (its reason), and stderr stays the user's."""
    teacher, student, x_l, y_l, x_u, _ = _problem(8, model=OptionalMask)
    mpl = _auto_mpl(teacher, student)
    mpl.step(x_l, y_l, x_u)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="the traced student fails"):
        mpl.step(x_l[:1], y_l, x_u[:1])
    assert mpl.last_jvp_path == "forward_ad"
    assert capsys.readouterr().err == ""


class TwoOptional(TokenClassifier):
    """Two optional keyword inputs that weigh the positions: ``mask`` (default 1) and ``weight``
    (default None: not applied). fx traces ``isinstance(weight, Tensor)`` as False (a proxy is no
    tensor), so the traced graph never applies ``weight``: the module's function for a call
    without it, another one for a call with it."""

    def forward(self, ids: Tensor, mask: Tensor | float = 1.0, weight: Tensor | None = None):
        kept = mask * torch.ones(ids.shape, dtype=self.emb.weight.dtype, device=ids.device)
        if isinstance(weight, Tensor):
            kept = kept * weight
        return super().forward(ids, kept)


def test_the_tape_is_checked_for_each_set_of_keyword_names():
    """A dict's call structure is its keys, not their number: {ids, weight} after {ids, mask}
    is another call, checked on its own first use. The graph ignores ``weight``: that call falls
    back to forward AD with the reason, and the gradient stays exact (trusted as the checked
    {ids, mask}, the student trained on the graph's function)."""
    teacher, student, x_l, y_l, x_u, _ = _problem(12, model=TwoOptional)
    mpl = _auto_mpl(teacher, student)
    masked = [{"ids": ids, "mask": mask} for ids, mask in (x_l, x_u)]
    mpl.step(masked[0], y_l, masked[1])
    assert mpl.last_jvp_path == "tape", mpl.jvp_fallback_reason
    (tape,) = mpl._tapes.values()
    assert isinstance(tape, TangentTape) and len(tape.checked) == 1

    weighted = [{"ids": ids, "weight": 0.5 + mask} for ids, mask in (x_l, x_u)]
    _falls_back_to_forward_ad_exactly(mpl, weighted[0], y_l, weighted[1], "logits differ")


# ----------------------------------------------------------------------------- checks


def _bad_unlabeled():
    ids, mask = _tokens(torch.Generator().manual_seed(9), N_U, 5)
    nan_mask = mask.clone()
    nan_mask[2, 1] = math.nan
    same = "every tensor of x_unlabeled must hold the same examples along batch_dim 0"
    return {
        "leaves of two batch sizes": (
            (ids[:-1], mask),
            rf"^x_unlabeled\[1\] has shape\[:1\] \(8,\), x_unlabeled\[0\] \(7,\): {same}$",
        ),
        "dict leaves of two batch sizes": (
            {"mask": mask[:-1], "ids": ids},
            rf"^x_unlabeled\['mask'\] has shape\[:1\] \(7,\), x_unlabeled\['ids'\] \(8,\): "
            rf"{same}$",
        ),
        "a nested container": (
            {"ids": ids, "masks": (mask,)},
            r"^x_unlabeled\['masks'\] is a tuple: nested containers are not supported; flatten "
            r"x_unlabeled into one tuple or dict of tensors$",
        ),
        "a None leaf": ((ids, None), r"^x_unlabeled\[1\] must be a tensor, got NoneType$"),
        "a str leaf": ([ids, "mask"], r"^x_unlabeled\[1\] must be a tensor, got str$"),
        "a number leaf": ({"ids": ids, "mask": 1.0}, r"^x_unlabeled\['mask'\] must be a tensor"),
        "a key that is not a str": ({0: ids}, "has the key 0: a dict input needs str keys"),
        "no tensors": ((), "^x_unlabeled holds no tensors"),
        "a leaf without the batch dimension": (
            (ids, mask[0, 0]),
            r"^x_unlabeled\[1\] has no examples \(shape \(\)\)$",
        ),
        "no examples": ((ids[:0], mask[:0]), r"^x_unlabeled has no examples"),
        "NaN in the float leaf": ((ids, nan_mask), r"^x_unlabeled\[1\] holds NaN or Inf values$"),
    }


@pytest.mark.parametrize("case", list(_bad_unlabeled()))
def test_bad_inputs_are_a_data_error_before_anything_moves(case):
    x_u, message = _bad_unlabeled()[case]
    teacher, student, x_l, y_l, _, _ = _problem(9)
    before = flat([*teacher.parameters(), *student.parameters()]).detach().clone()
    mpl = _sgd_mpl(teacher, student)
    with pytest.raises(DataError, match=message):
        mpl.step(x_l, y_l, x_u)
    assert torch.equal(flat([*teacher.parameters(), *student.parameters()]), before)
    assert mpl.step_count == 0


def test_integer_leaves_are_not_checked_for_finite_values():
    """Only floating leaves can hold NaN: token ids pass, and check_inputs stays one host sync.
    (On a step after the first: the first exact step also checks x_unlabeled's floating leaves
    before it compares the student's forwards on them.)"""
    teacher, student, x_l, y_l, x_u, _ = _problem(9, kind="dict")
    mpl = _sgd_mpl(teacher, student)
    mpl.step(x_l, y_l, x_u)
    checked: list[Tensor] = []
    original = torch.isfinite
    try:
        torch.isfinite = lambda t: checked.append(t) or original(t)  # type: ignore[assignment]
        mpl.step(x_l, y_l, x_u)
    finally:
        torch.isfinite = original
    assert [t.dtype for t in checked] == [DT, DT]  # the two masks
    assert checked[0] is x_l["mask"] and checked[1] is x_u["mask"]


@pytest.mark.parametrize("estimator", ["exact", "first_order", "double_backward"])
def test_a_batch_computed_with_gradients_on_is_taken_as_data(estimator):
    """The step differentiates parameters, never inputs. A mask computed by a module with
    gradients on failed with torch's "backward through the graph a second time" after the
    student had moved (exact, first_order), and every estimator sent gradients into the
    module's parameters. Now its values are taken as they are: the same step as on the values
    alone, and the module untouched."""
    states, masks = [], nn.Linear(5, 5).to(TEST_DEVICE, DT)
    for graph in (True, False):
        teacher, student, x_l, y_l, (ids, mask), _ = _problem(9)
        with torch.set_grad_enabled(graph):
            x_u = (ids, torch.sigmoid(masks(mask)) + 0.1)
        mpl = _sgd_mpl(teacher, student, estimator=estimator, supervised_weight=0.0)
        for step in range(2):
            torch.manual_seed(step)
            mpl.step(x_l, y_l, x_u)
        states.append(flat([*teacher.state_dict().values(), *student.state_dict().values()]))
    assert torch.equal(states[0], states[1])
    assert masks.weight.grad is None


@pytest.mark.parametrize("which", ["teacher_x_labeled", "teacher_x_unlabeled"])
def test_a_teacher_view_of_other_examples_is_a_data_error(which):
    teacher, student, x_l, y_l, x_u, _ = _problem(10)
    mpl = _sgd_mpl(teacher, student)
    ids, mask = x_l if which == "teacher_x_labeled" else x_u
    n = len(ids)
    with pytest.raises(
        DataError,
        match=rf"^{which}'s examples \({n - 1},\) and {which[8:]}'s \({n},\) disagree",
    ):
        mpl.step(x_l, y_l, x_u, **{which: {"ids": ids[1:], "mask": mask[1:]}})
    assert mpl.step_count == 0


def test_labels_for_another_number_of_examples_are_a_data_error():
    teacher, student, x_l, y_l, x_u, _ = _problem(10)
    mpl = _sgd_mpl(teacher, student)
    with pytest.raises(DataError, match=r"x_labeled's examples \(6,\) and y_labeled \(5,\)"):
        mpl.step(x_l, y_l[:5], x_u)


def test_a_labeled_batch_of_one_the_student_cannot_take_is_refused_before_it_moves():
    """BatchNorm1d needs two examples in training mode: found by a trial forward on the pair."""
    teacher, student, x_l, y_l, x_u, _ = _problem(11, kind="dict")
    before = flat(student.state_dict().values()).clone()
    mpl = _sgd_mpl(teacher, student)
    one = {k: v[:1] for k, v in x_l.items()}
    with pytest.raises(ConfigError, match="cannot take a labeled batch of one example"):
        mpl.step(one, y_l[:1], x_u)
    assert torch.equal(flat(student.state_dict().values()), before)


def test_holding_swaps_each_tensor_where_it_lives_and_gives_the_modules_own_back():
    """metapl.mpl.inputs.holding (a checkpoint's recompute sees what the pass ran with): a block
    registered under two names is swapped once, under both names; an error in the block still
    gives back the module's own Parameters and buffers."""
    block = nn.Linear(2, 2)
    net = nn.Sequential(block, block, nn.BatchNorm1d(2))
    weight, mean = block.weight, net[2].running_mean
    state = {"0.weight": torch.zeros(2, 2), "2.running_mean": torch.ones(2)}
    with pytest.raises(ValueError, match="inside"), holding(net, state):
        assert net[1].weight is state["0.weight"] and net[2].running_mean is state["2.running_mean"]
        assert net[0].bias is block.bias
        raise ValueError("inside")
    assert net[0].weight is weight and net[1].weight is weight and net[2].running_mean is mean
    assert isinstance(net[0].weight, nn.Parameter)
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
