"""A transformer student (``nn.TransformerEncoderLayer``, with a padding mask) takes every exact
path, and a student without second derivatives is refused by double backward before it moves.

torch runs ``F.scaled_dot_product_attention`` in a fused kernel (flash attention, on a CPU too),
which has a backward but neither forward-mode AD nor a second derivative: the exact step refused
such a student (pointing at double backward) and double backward failed inside the teacher's
backward, after the student's optimizer had stepped. The step now runs the student's passes in
the math kernel (metapl.mpl.replay.differentiable_attention). Checked as in test_exact_gradient.py:
float64, two steps, against the double-backward oracle and central finite differences of the REAL
optimizer step (mpl_helpers: torch alone, in the kernel torch picks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from exact_checks import checked_exact_step
from mpl_helpers import (
    N_CLASSES,
    STUDENT_OPTIMIZERS,
    flat,
    rel_err,
)
from torch import Tensor, nn
from torch.func import functional_call

from metapl import MetaPseudoLabels
from metapl.errors import ConfigError
from metapl.mpl.double_backward_checks import grad_to_targets

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64
FEATURES, WIDTH, LENGTH = 5, 8, 6
N_L, N_U = 5, 7


class AttentionClassifier(nn.Module):
    """Linear embedding of each position, one transformer encoder layer (2 heads) that skips the
    padded positions, mean over the kept positions, Linear to the classes."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(FEATURES, WIDTH)
        self.encoder = nn.TransformerEncoderLayer(WIDTH, 2, 16, dropout=dropout, batch_first=True)
        self.head = nn.Linear(WIDTH, N_CLASSES)

    def forward(self, x: Tensor, padded: Tensor) -> Tensor:
        h = self.encoder(self.embed(x), src_key_padding_mask=padded)
        kept = (~padded).unsqueeze(-1).to(h.dtype)
        return self.head((h * kept).sum(1) / kept.sum(1))


def _sequences(g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, LENGTH, FEATURES, generator=g, dtype=DT)
    padded = torch.rand(n, LENGTH, generator=g) < 0.3
    padded[:, 0] = False  # every sequence keeps a position
    return x, padded


def _problem(seed: int, dropout: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = AttentionClassifier(dropout).to(DT).train()
    student = AttentionClassifier(dropout).to(DT).train()
    x_l = _sequences(g, N_L)
    y_l = torch.randint(0, N_CLASSES, (N_L,), generator=g)
    x_u = _sequences(g, N_U)
    return teacher, student, x_l, y_l, x_u


def _sgd_mpl(teacher: nn.Module, student: nn.Module, **options) -> MetaPseudoLabels:
    t_opt, s_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (teacher, student))
    return MetaPseudoLabels(teacher, student, t_opt, s_opt, **options)


def test_torch_runs_this_student_in_a_kernel_without_forward_ad():
    """The premise: without the step's choice of kernel, forward-mode AD fails on this student
    (if a torch release adds the derivatives, this test says the workaround may go)."""
    _, student, _, _, x_u = _problem(0)
    _assert_no_forward_ad(student, x_u)


def _assert_no_forward_ad(student: nn.Module, x: tuple[Tensor, Tensor]) -> None:
    params = {n: p.detach() for n, p in student.named_parameters()}
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    with pytest.raises(NotImplementedError, match="forward AD with _scaled_dot_product_flash"):
        torch.func.jvp(lambda p: functional_call(student, p, x), (params,), (zeros,))


@pytest.mark.parametrize("jvp", ["forward_ad", "tape"])
def test_exact_gradient_of_a_transformer_student(jvp):
    """Two steps of an Adam student; before each, the oracle, finite differences of the real step
    and the student's real optimizer step at the same point."""
    factory = STUDENT_OPTIMIZERS["adam"]
    teacher, student, x_l, y_l, x_u = _problem(1)
    s_opt = factory(student.parameters())
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.5),
        s_opt,
        supervised_weight=0.0,
        jvp=jvp,
    )
    gen = torch.Generator().manual_seed(11)
    for step in range(2):
        checked_exact_step(mpl, factory, x_l, y_l, x_u, seed=1234 + step, gen=gen)
        assert mpl.last_jvp_path == jvp, mpl.jvp_fallback_reason


def _steps(estimator: str, dropout: float, steps: int = 3, **options):
    teacher, student, x_l, y_l, x_u = _problem(2, dropout)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9, nesterov=True),
        torch.optim.AdamW(student.parameters(), lr=0.01, eps=1e-3, weight_decay=0.1),
        estimator=estimator,
        **options,
    )
    torch.manual_seed(5)
    for _ in range(steps):
        mpl.step(x_l, y_l, x_u)
    return teacher, student


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "attention-dropout"])
def test_the_double_backward_step_equals_the_exact_step(dropout):
    """Side by side from the same weights and seed, three steps: the same models. With dropout
    inside the attention, both draw the same masks (the same kernel in every student pass)."""
    t_exact, s_exact = _steps("exact", dropout, jvp="forward_ad")
    t_db, s_db = _steps("double_backward", dropout)
    t_ref, _ = _steps("exact", 0.0 if dropout else 0.2, jvp="forward_ad")
    for a, b in ((t_exact, t_db), (s_exact, s_db)):
        assert rel_err(flat(a.parameters()).detach(), flat(b.parameters()).detach()) < 1e-10
    # the comparison can fail: the other dropout setting trains another teacher
    assert rel_err(flat(t_exact.parameters()).detach(), flat(t_ref.parameters()).detach()) > 1e-6


@pytest.mark.parametrize("estimator", ["exact", "double_backward"])
def test_only_the_students_passes_run_in_the_math_kernel(estimator):
    """docs/library.md's attention: every student pass of an exact step runs with the fused
    kernels off (one function for J and the update); the teacher's passes keep torch's choice
    (the fused kernels stay allowed there)."""
    teacher, student, x_l, y_l, x_u = _problem(4)
    fused = {"teacher": [], "student": []}
    for name, model in (("teacher", teacher), ("student", student)):
        model.register_forward_pre_hook(
            lambda m, a, name=name: fused[name].append(torch.backends.cuda.flash_sdp_enabled())
        )
    mpl = _sgd_mpl(teacher, student, estimator=estimator)
    mpl.step(x_l, y_l, x_u)  # (its first-use trials of the student's inputs run before)
    fused["teacher"].clear()
    fused["student"].clear()
    mpl.step(x_l, y_l, x_u)
    assert fused["teacher"] == [True]
    assert len(fused["student"]) >= 2 and not any(fused["student"])


def test_the_students_kernel_choice_is_given_back():
    """The math kernel is switched on around the student's passes only: after the step, torch
    picks its own kernel again."""
    teacher, student, x_l, y_l, x_u = _problem(3)
    _sgd_mpl(teacher, student).step(x_l, y_l, x_u)
    _assert_no_forward_ad(student, x_u)


# ----------------------------------------------------------------------------- no 2nd derivative


class KeywordScorer(nn.Module):
    """A keyword-spotting classifier: class c's logit is the CTC log-likelihood of its keyword (a
    label sequence) over frames computed from x. torch's CTC loss has no second derivative
    (torch.cdist, used here before, has one since torch 2.14)."""

    KEYWORDS = ((1, 2), (2, 1), (1, 1))  # one per class; symbol 0 is CTC's blank
    FRAMES, SYMBOLS = 5, 3

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.frames = nn.Linear(8, self.FRAMES * self.SYMBOLS)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        h = self.frames(torch.tanh(self.bn(self.fc(x))))
        log_probs = h.view(n, self.FRAMES, self.SYMBOLS).transpose(0, 1).log_softmax(-1)
        frames = torch.full((n,), self.FRAMES, dtype=torch.long)
        scores = [
            -F.ctc_loss(
                log_probs,
                torch.tensor(keyword).expand(n, -1),
                frames,
                torch.full((n,), len(keyword), dtype=torch.long),
                reduction="none",
            )
            for keyword in self.KEYWORDS
        ]
        return torch.stack(scores, dim=1)


def _distance_problem():
    torch.manual_seed(0)
    teacher, student = KeywordScorer().to(DT), KeywordScorer().to(DT)
    s_opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        s_opt,
        estimator="double_backward",
    )
    x_l, x_u = torch.randn(5, 4, dtype=DT), torch.randn(7, 4, dtype=DT)
    return mpl, x_l, torch.tensor([0, 1, 2, 0, 1]), x_u


def _everything(mpl: MetaPseudoLabels) -> list[Tensor]:
    tensors = [
        t.detach().clone() for m in (mpl.teacher, mpl.student) for t in m.state_dict().values()
    ]
    return [*tensors, torch.get_rng_state()]


def test_double_backward_refuses_a_student_without_second_derivatives_before_it_moves():
    mpl, x_l, y_l, x_u = _distance_problem()
    before = _everything(mpl)
    with pytest.raises(
        ConfigError, match=r"without a second derivative.*_ctc_loss_backward.*first_order"
    ):
        mpl.step(x_l, y_l, x_u)
    after = _everything(mpl)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not mpl.student_optimizer.state and not mpl.teacher_optimizer.state
    assert all(p.grad is None for p in mpl.teacher.parameters())


class _Raises(torch.autograd.Function):
    """Identity whose backward raises ``error``."""

    @staticmethod
    def forward(x: Tensor, error: Exception) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.error = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise ctx.error


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("the derivative for 'op' is missing"),
        RuntimeError("this case is not implemented"),
        NotImplementedError("the other case is not implemented"),
        ValueError("the derivative for 'op' is not implemented"),
    ],
    ids=["derivative-only", "not-implemented-only", "not-implemented-error", "value-error"],
)
def test_a_missing_second_derivative_is_named_and_nothing_else(error):
    """Torch's "the derivative for '...' is not implemented" (a RuntimeError or a
    NotImplementedError) becomes the ConfigError naming the estimators; any other error of that
    backward, even one that says half of it, comes as it is (a ConfigError would send the user to
    another estimator for a bug of the student's own)."""
    targets = torch.randn(3, N_CLASSES, dtype=DT, requires_grad=True)
    with pytest.raises(type(error), match=str(error)):
        grad_to_targets(_Raises.apply(targets * 2, error).sum(), targets)
    missing = NotImplementedError("the derivative for 'op' is not implemented")
    with pytest.raises(ConfigError, match=r"without a second derivative \(the derivative for"):
        grad_to_targets(_Raises.apply(targets * 2, missing).sum(), targets)
    missing = RuntimeError("the derivative for 'op' is not implemented")
    with pytest.raises(ConfigError, match="without a second derivative"):
        grad_to_targets(_Raises.apply(targets * 2, missing).sum(), targets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_float32_transformer_student_on_cuda_gets_double_backwards_gradient():
    """On CUDA torch runs float32 attention in a fused kernel (memory-efficient attention, with a
    head size of 8): the exact step, J by forward AD and by the tape, agrees with double backward
    over two steps (TF32 off: both in true float32)."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        states = {}
        for name, options in (
            ("forward_ad", {"jvp": "forward_ad"}),
            ("tape", {"jvp": "auto"}),
            ("double_backward", {"estimator": "double_backward"}),
        ):
            torch.manual_seed(0)
            teacher, student = (
                nn.Sequential(
                    nn.TransformerEncoder(
                        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1
                    ),
                    nn.Flatten(),
                    nn.Linear(16 * 8, N_CLASSES),
                ).cuda()
                for _ in range(2)
            )
            g = torch.Generator().manual_seed(1)
            x_l, x_u = (torch.randn(n, 8, 16, generator=g).cuda() for n in (8, 24))
            y_l = torch.randint(0, N_CLASSES, (8,), generator=g).cuda()
            mpl = MetaPseudoLabels(
                teacher,
                student,
                torch.optim.SGD(teacher.parameters(), lr=0.1),
                torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9),
                supervised_weight=0.0,
                **options,
            )
            for step in range(2):
                torch.manual_seed(10 + step)
                mpl.step(x_l, y_l, x_u)
            states[name] = flat(p.grad for p in teacher.parameters()).double()
        for name in ("forward_ad", "tape"):
            assert rel_err(states[name], states["double_backward"]) <= 1e-3, name
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
