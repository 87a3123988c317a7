"""The tangent tape (``jvp="tape"``): the exact step's JVP from the update pass's activations.

The tape replaces "forward AD of the student again" by "record the update pass, then propagate
tangents only". These tests hold it to the forward-AD JVP written here against torch alone
(``functional_call`` on dual tensors, the RNG replayed), in float64:

- every registry model that runs on a CPU: the record pass is the native forward/backward (same
  logits, parameter gradients and BatchNorm buffers), and J is forward AD's J at theta_t even
  after the live parameters have moved;
- whole MPL steps with ``jvp="tape"`` and ``jvp="forward_ad"`` leave the same models, optimizer
  states and buffers;
- students the tape cannot serve (untraceable, in-place, other random ops, hooks, a graph fx got
  wrong) fall back to forward AD under ``"auto"`` and are a ConfigError under ``"tape"``;
- operations without a hand-written rule go through the per-node forward-AD rule, exactly.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from mpl_helpers import cloned_buffers, make_problem, randomize_bn, rel_err
from torch import Tensor, nn
from torch.func import functional_call

from metapl import MetaPseudoLabels
from metapl.errors import ConfigError
from metapl.models import create_model
from metapl.mpl.jvp import MAX_TAPES
from metapl.mpl.tangent import TangentTape, TapeUnsupportedError, tolerance
from metapl.mpl.tangent_ops import PackedSigns, ones_with_layout

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64


# ----------------------------------------------------------------------------- helpers


def forward_ad_jvp(model: nn.Module, theta: dict[str, Tensor], w: dict[str, Tensor], x, seed):
    """d logits along w at theta by forward AD, with the RNG seeded as for the recorded pass."""
    torch.manual_seed(seed)
    with fwad.dual_level():
        weights = {n: fwad.make_dual(theta[n], w[n]) for n in theta}
        out = functional_call(model, {**cloned_buffers(model), **weights}, (x,))
        return fwad.unpack_dual(out).tangent


def tape_vs_native(model: nn.Module, x: Tensor, seed: int = 7):
    """Record ``model`` on ``x``, backward a random linear loss; do the same natively on a copy
    with the same seed. Then move the live parameters (as optimizer.step() would) and compute the
    tape's J at the recorded theta and forward AD's J there. Returns what the tests compare."""
    native = copy.deepcopy(model)
    params = dict(model.named_parameters())
    tape = TangentTape(model, params.values())

    torch.manual_seed(seed)
    record = tape.record(x)
    c = torch.randn(record.logits.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    (record.logits * c).sum().backward()
    torch.manual_seed(seed)
    logits = native(x)
    (logits * c).sum().backward()

    theta = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(5)
    w = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in params.items()}
    with torch.no_grad():  # the optimizer step: the tape must read theta_t, not these
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g, dtype=DT))
        j_tape = tape.tangent(
            record,
            {id(p): theta[n] for n, p in params.items()},
            {id(p): w[n] for n, p in params.items()},
        )
    j_ref = forward_ad_jvp(native, theta, w, x, seed)
    return tape, record, logits, native, j_tape, j_ref


def with_random_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    randomize_bn(model, torch.Generator().manual_seed(seed))
    return model


# ----------------------------------------------------------------------------- registry models

REGISTRY_CASES = {
    # name: (constructor options, input shape, how many nodes use the generic rule)
    "mlp": ({"dropout": 0.3, "in_features": 5}, (8, 5), 0),
    "digits_cnn": ({"dropout": 0.3}, (6, 1, 8, 8), 0),
    "digits_cnn_large": ({"dropout": 0.3}, (4, 1, 8, 8), 0),
    "small_cnn": ({"dropout": 0.3}, (4, 3, 8, 8), 0),
    "wrn28_2": ({"dropout": 0.3}, (3, 3, 32, 32), 0),
    "efficientnet_b0": ({"dropout": 0.3, "drop_path": 0.5}, (3, 3, 32, 32), 0),
    "resnet50": ({"dropout": 0.3}, (2, 3, 32, 32), 1),  # the stem's max pool
}


@pytest.mark.parametrize("name", list(REGISTRY_CASES))
def test_record_is_the_native_pass_and_tape_jvp_is_forward_ad(name):
    options, shape, n_generic = REGISTRY_CASES[name]
    torch.manual_seed(0)
    model = with_random_bn(create_model(name, 10, **options)).to(DT).train()
    x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(2))
    tape, record, logits, native, j_tape, j_ref = tape_vs_native(model, x)

    # the update pass: the native forward/backward, bit for bit on the CPU
    assert rel_err(record.logits.detach(), logits.detach()) <= 1e-12
    for (n, p), q in zip(model.named_parameters(), native.parameters()):
        assert q.grad is not None and q.grad.abs().max() > 0, n
        assert rel_err(p.grad, q.grad) <= 1e-12, n
    bufs, ref_bufs = dict(model.named_buffers()), dict(native.named_buffers())
    for n, b in bufs.items():  # running statistics updated once, as natively
        assert torch.equal(b, ref_bufs[n]), n
    # dropout really dropped (the mask matters), and the tape used its own rules
    masks = _masks(tape, record)
    assert masks and all((m == 0).any() and (m != 0).any() for m in masks)
    info = tape.describe()
    assert info["generic"] == n_generic, info
    # the JVP
    assert j_ref.norm() > 1e-6
    assert rel_err(j_tape, j_ref) <= 1e-10, rel_err(j_tape, j_ref)


def _masks(tape: TangentTape, record) -> list[Tensor]:
    """The dropout masks the record pass kept."""
    return [
        v for k, v in zip(tape._saved_keys, record.saved) if isinstance(k, tuple) and k[0] == "mask"
    ]


def test_stochastic_depth_is_recorded_not_redrawn():
    """EfficientNet's drop path draws with torch.rand: a tangent-free random source whose value
    the tape keeps; the tangent pass draws nothing."""
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", 10, dropout=0.0, drop_path=0.9).to(DT).train()
    x = torch.randn(4, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(2))
    tape, record, logits, native, j_tape, j_ref = tape_vs_native(model, x)
    before = torch.get_rng_state()
    params = dict(model.named_parameters())
    w = {id(p): torch.ones_like(p) for p in params.values()}
    with torch.no_grad():
        kept = tape.tangent(record, {}, w)
        released = tape.tangent(record, {}, w, release=True)  # frees primals as it goes
    assert torch.equal(before, torch.get_rng_state())
    assert rel_err(j_tape, j_ref) <= 1e-10
    assert torch.equal(kept, released) and record.saved == ()


# ----------------------------------------------------------------------------- whole steps


class RichNet(nn.Module):
    """Conv -> BN -> leaky ReLU -> [conv -> BN -> SiLU] * sigmoid gate + shortcut conv (with a
    bias: not before a BatchNorm, where its gradient is exactly 0) -> dropout -> mean pool ->
    linear: most hand-written rules in one small net."""

    def __init__(self, width: int = 6, classes: int = 3, p: float = 0.3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.gate = nn.Linear(width, width)
        self.shortcut = nn.Conv2d(width, width, 1, stride=2)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(width, classes)
        self.slope = 0.2  # a plain attribute: fx bakes its value into the graph

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.bn1(self.conv1(x)), self.slope)
        y = F.silu(self.bn2(self.conv2(h)))
        gate = torch.sigmoid(self.gate(y.mean(dim=(2, 3)))).view(y.shape[0], -1, 1, 1)
        y = y * gate + self.shortcut(h)
        return self.fc(self.drop(y).mean(dim=(2, 3)))


def _problem(model_fn, seed: int = 0, n_l: int = 4, n_u: int = 6, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher, student = model_fn().to(DT), model_fn().to(DT)
    randomize_bn(teacher, g)
    randomize_bn(student, g)
    x_l = torch.randn(n_l, 3, size, size, generator=g, dtype=DT)
    y_l = torch.randint(0, 3, (n_l,), generator=g)
    x_u = torch.randn(n_u, 3, size, size, generator=g, dtype=DT)
    return teacher.train(), student.train(), x_l, y_l, x_u


STUDENT_OPTS = {
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
}


def _run_steps(model_fn, opt_name: str, jvp: str, steps: int = 3, **kwargs):
    teacher, student, x_l, y_l, x_u = _problem(model_fn)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.5)
    s_opt = STUDENT_OPTS[opt_name](student.parameters())
    mpl = MetaPseudoLabels(teacher, student, t_opt, s_opt, temperature=1.3, jvp=jvp, **kwargs)
    metrics, paths = [], []
    for step in range(steps):
        torch.manual_seed(100 + step)
        x = x_u + 0.1 * step
        metrics.append(mpl.step(x_l, y_l, x))
        paths.append(mpl.last_jvp_path)
    return mpl, metrics, paths


class BakedNet(RichNet):
    """RichNet, scaled by a private float and a list, mixed by a tuple, shifted by a plain tensor
    attribute and a buffer read by attribute: values fx bakes into the traced graph."""

    def __init__(self):
        super().__init__()
        self._scale = 1.0
        self.mix = (1.0, 0.5)
        self.shift = torch.zeros(3, dtype=DT)
        self.register_buffer("mu", torch.zeros(3))
        self.weights = [1.0, 1.0]  # a list: the key must hash it, and see it change in place

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x) * self._scale * self.weights[0] * self.weights[1]
        return self.mix[0] * out + self.mix[1] * (out + self.shift + self.mu)


BAKED_CHANGES = {
    "private": lambda m: setattr(m, "_scale", 1.5),
    # (each changes the logits beyond a shift shared by all classes, which softmax ignores)
    "tuple": lambda m: setattr(m, "mix", (0.5, 2.0)),
    "tensor": lambda m: setattr(m, "shift", torch.tensor([0.3, -0.2, 0.1], dtype=DT)),
    "buffer": lambda m: setattr(m, "mu", torch.tensor([0.2, 0.0, -0.3], dtype=DT)),  # a new one
    "conv": lambda m: (setattr(m.conv1, "padding", (2, 2)), setattr(m.conv1, "dilation", (2, 2))),
    "list": lambda m: m.weights.__setitem__(1, 2.0),  # changed in place
}


def test_the_traced_graph_is_kept_across_steps():
    """Traced once: a step that checked the optimizers' holdings and found nothing changed must
    not drop the graph (tracing again every step would cost a trace and a first-use check each)."""
    teacher, student, x_l, y_l, x_u = _problem(RichNet)
    mpl = _sgd_mpl(teacher, student, jvp="tape")
    tapes = []
    for step in range(3):
        torch.manual_seed(step)
        mpl.step(x_l, y_l, x_u)
        tapes.append(next(iter(mpl._tapes.values())))
    assert tapes[0] is tapes[1] is tapes[2] and len(mpl._tapes) == 1


@pytest.mark.parametrize("change", sorted(BAKED_CHANGES))
def test_a_value_the_graph_baked_in_changed_between_steps_gets_a_new_graph(change):
    """The tape's key held public scalars only: a private scale, a tuple, a tensor attribute, a
    replaced buffer or a conv's padding changed after the first step, and the student kept
    training on the old graph, silently (the teacher's gradient 0.1-2x off finite differences,
    or a raw error after the student moved). Now a new graph: the tape's steps equal forward
    AD's, and J still comes from the tape."""
    runs = {}
    for jvp in ("auto", "forward_ad"):
        teacher, student, x_l, y_l, x_u = _problem(BakedNet)
        mpl = _sgd_mpl(teacher, student, jvp=jvp, supervised_weight=0.0)
        paths = []
        for step in range(3):
            if step == 1:
                BAKED_CHANGES[change](student)
            torch.manual_seed(100 + step)
            mpl.step(x_l, y_l, x_u + 0.1 * step)
            paths.append(mpl.last_jvp_path)
        runs[jvp] = mpl, paths
    assert runs["auto"][1] == ["tape"] * 3, runs["auto"][0].jvp_fallback_reason
    _assert_same_state(runs["auto"][0], runs["forward_ad"][0], tol=1e-10)


def _close(a: Tensor, b: Tensor, tol: float) -> bool:
    """||a - b|| <= tol ||b|| (two zero tensors are close; tol = 0 means equal)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm()) <= tol * float(b.norm())


def _assert_same_state(a: MetaPseudoLabels, b: MetaPseudoLabels, tol: float = 1e-10):
    for model_a, model_b in ((a.teacher, b.teacher), (a.student, b.student)):
        for (n, p), q in zip(model_a.named_parameters(), model_b.parameters()):
            assert _close(p, q, tol), n
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                assert _close(p.grad, q.grad, tol), n
        for (n, buf), ref in zip(model_a.named_buffers(), model_b.buffers()):
            assert _close(buf, ref, tol), n
    for opt_a, opt_b in (
        (a.teacher_optimizer, b.teacher_optimizer),
        (a.student_optimizer, b.student_optimizer),
    ):
        sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for k in sa:
            for name, v in sa[k].items():
                if isinstance(v, Tensor) and v.is_floating_point() and v.dim():
                    assert _close(v, sb[k][name], tol), (k, name)


@pytest.mark.parametrize("opt_name", list(STUDENT_OPTS))
def test_whole_steps_with_the_tape_equal_forward_ad_steps(opt_name):
    tape, m_tape, paths = _run_steps(RichNet, opt_name, "tape")
    ref, m_ref, ref_paths = _run_steps(RichNet, opt_name, "forward_ad")
    assert paths == ["tape"] * 3 and ref_paths == ["forward_ad"] * 3
    _assert_same_state(tape, ref)
    for a, b in zip(m_tape, m_ref):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
    # the MPL signal is really there (not two zeros agreeing)
    assert max(abs(float(m["teacher_mpl"])) for m in m_ref) > 1e-6
    # after the first (checked) step the module's own forward no longer runs in the step
    assert all(t.checked for t in tape._tapes.values())


def test_switching_modes_builds_a_graph_per_mode_and_eval_batchnorm_is_exact():
    """BatchNorm in eval mode (running statistics, the affine rule) and dropout in train mode;
    then back to train: each set of modes has its own traced graph."""

    def run(jvp):
        teacher, student, x_l, y_l, x_u = _problem(RichNet)
        s_opt = STUDENT_OPTS["sgd_nesterov"](student.parameters())
        t_opt = torch.optim.SGD(teacher.parameters(), lr=0.05)
        mpl = MetaPseudoLabels(teacher, student, t_opt, s_opt, jvp=jvp)
        with torch.no_grad():  # non-trivial running statistics
            student(x_u * 2 + 0.5)
        for step, bn_eval in enumerate([False, True, True, False]):
            for m in (student.bn1, student.bn2):
                m.train(not bn_eval)
            torch.manual_seed(step)
            mpl.step(x_l, y_l, x_u + 0.1 * step)
            assert mpl.last_jvp_path == ("forward_ad" if jvp == "forward_ad" else "tape")
        return mpl

    tape, ref = run("tape"), run("forward_ad")
    assert len(tape._tapes) == 2
    _assert_same_state(tape, ref)


def test_a_changed_python_attribute_gets_a_new_graph():
    """A schedule that changes a value the forward reads (here the leaky slope) must not train
    on a graph that still has the old value baked in."""

    def run(jvp):
        teacher, student, x_l, y_l, x_u = _problem(RichNet)
        mpl = MetaPseudoLabels(
            teacher,
            student,
            torch.optim.SGD(teacher.parameters(), lr=0.05),
            STUDENT_OPTS["adamw"](student.parameters()),
            jvp=jvp,
        )
        for step, slope in enumerate([0.2, 0.2, 0.05, 0.05]):
            student.slope = slope
            torch.manual_seed(step)
            mpl.step(x_l, y_l, x_u + 0.1 * step)
        return mpl

    tape, ref = run("tape"), run("forward_ad")
    assert len(tape._tapes) == 2
    _assert_same_state(tape, ref)


def test_a_key_that_changes_every_step_keeps_the_last_graphs_only():
    """A schedule that changes a value the forward reads at every step traces a new graph each
    step: the step keeps the MAX_TAPES newest (each holds its own GraphModule), not all of them."""
    teacher, student, x_l, y_l, x_u = _problem(RichNet)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.05),
        torch.optim.SGD(student.parameters(), lr=0.1),
        jvp="tape",
    )
    slopes = [0.01 * (i + 1) for i in range(MAX_TAPES + 2)]
    for slope in slopes:
        student.slope = slope
        mpl.step(x_l, y_l, x_u)
        assert mpl.last_jvp_path == "tape"
    kept = [dict(key[0][1])["slope"] for key in mpl._tapes]  # key[0]: the root module's values
    assert kept == slopes[-MAX_TAPES:]


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_bf16_autocast_step_uses_the_tape_and_agrees_with_forward_ad(frozen_bn):
    """With the student's BatchNorm affine frozen too: its forward-AD output (bf16) came with a
    float32 tangent, which the next convolution refused in the step's first check."""

    def run(jvp):
        teacher, student, x_l, y_l, x_u = _problem(RichNet)
        teacher, student = teacher.float(), student.float()
        frozen = [
            p
            for m in student.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and frozen_bn
            for p in m.parameters()
        ]
        assert bool(frozen) == frozen_bn
        for p in frozen:
            p.requires_grad_(False)
        mpl = MetaPseudoLabels(
            teacher,
            student,
            torch.optim.SGD(teacher.parameters(), lr=0.0),
            STUDENT_OPTS["sgd_nesterov"](student.parameters()),
            supervised_weight=0.0,
            autocast_dtype=torch.bfloat16,
            jvp=jvp,
        )
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no fallback warning
            mpl.step(x_l.float(), y_l, x_u.float())
        assert mpl.last_jvp_path == ("tape" if jvp == "tape" else "forward_ad")
        return torch.cat([p.grad.reshape(-1) for p in teacher.parameters()]).double()

    a, b = run("tape"), run("forward_ad")
    assert b.norm() > 1e-6
    assert F.cosine_similarity(a, b, dim=0) > 0.99


def test_a_nan_step_gives_no_verdict_on_the_tape():
    """A first step whose J is NaN in forward AD too (targets of temperature 1e-320: inf / inf)
    warned "the tangent pass differs from forward-mode AD (relative error nan)" and gave the tape
    up for good. Now the NaN goes to the caller (a training run's guard names the loss), and the
    next finite step checks the tape and uses it."""
    teacher, student, x_l, y_l, x_u = _problem(RichNet)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.0),
        torch.optim.SGD(student.parameters(), lr=0.1),
        temperature=1e-320,
        jvp="auto",
    )
    saved = copy.deepcopy(teacher.state_dict()), copy.deepcopy(student.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mpl.step(x_l, y_l, x_u)
        assert mpl.last_jvp_path == "forward_ad"
        assert not all(bool(torch.isfinite(p.grad).all()) for p in teacher.parameters())
        teacher.load_state_dict(saved[0])  # the NaN step wrote NaN into the student (plain SGD
        student.load_state_dict(saved[1])  # keeps no state to restore)
        mpl.temperature = 1.0
        mpl.step(x_l, y_l, x_u)
        assert mpl.last_jvp_path == "tape"
        assert all(bool(torch.isfinite(p.grad).all()) for p in teacher.parameters())


# ----------------------------------------------------------------------------- fallbacks


class Branchy(RichNet):
    """Data-dependent Python control flow: fx cannot trace it."""

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        if h.mean() > 0.0:
            h = h * 1.5
        return self.fc(self.drop(h).mean(dim=(2, 3)))


class InPlace(RichNet):
    """An in-place activation: the saved primals would not be what the update pass saw."""

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return self.fc(self.drop(h).mean(dim=(2, 3)))


class InPlaceMethod(RichNet):
    def forward(self, x: Tensor) -> Tensor:
        h = self.bn1(self.conv1(x)).mul_(2.0)
        return self.fc(self.drop(F.relu(h)).mean(dim=(2, 3)))


class OtherRandom(RichNet):
    """A random op with a tangent that is not dropout (randomized leaky ReLU)."""

    def forward(self, x: Tensor) -> Tensor:
        h = F.rrelu(self.bn1(self.conv1(x)), training=True)
        return self.fc(self.drop(h).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "model_fn, why",
    [
        (Branchy, "trace"),
        (InPlace, "in place"),
        (InPlaceMethod, "in place"),
        (OtherRandom, "random"),
    ],
    ids=["untraceable", "inplace_kwarg", "inplace_method", "rrelu"],
)
def test_students_the_tape_cannot_serve_fall_back_or_raise(model_fn, why):
    auto, m_auto, paths = _run_steps(model_fn, "sgd_nesterov", "auto", steps=2)
    ref, m_ref, _ = _run_steps(model_fn, "sgd_nesterov", "forward_ad", steps=2)
    assert paths == ["forward_ad"] * 2
    assert why in auto.jvp_fallback_reason
    _assert_same_state(auto, ref, tol=0.0)  # the very same computation
    teacher, student, *_ = _problem(model_fn)
    with pytest.raises(ConfigError, match="jvp='tape'.*" + why):
        MetaPseudoLabels(
            teacher,
            student,
            torch.optim.SGD(teacher.parameters(), lr=0.1),
            torch.optim.SGD(student.parameters(), lr=0.1),
            jvp="tape",
        )


class Mistraced(RichNet):
    """fx traces proxies, not tensors: the isinstance branch silently disappears from the graph.
    Only the first-use comparison with the module can tell."""

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        if isinstance(h, Tensor):
            h = h * 2.0
        return self.fc(self.drop(h).mean(dim=(2, 3)))


def test_a_graph_that_computes_something_else_is_caught_at_its_first_step():
    with pytest.warns(UserWarning, match="logits differ") as warned:
        auto, _, paths = _run_steps(Mistraced, "adamw", "auto", steps=2)
    ref, _, _ = _run_steps(Mistraced, "adamw", "forward_ad", steps=2)
    assert paths == ["forward_ad"] * 2
    # given up for good: the second step neither records on the graph again nor warns again
    assert [str(w.message) for w in warned if "metapl" in str(w.message)] == [
        f"metapl: the exact step uses forward-mode AD: {auto.jvp_fallback_reason}"
    ]
    (tape,) = auto._tapes.values()  # given up for the one way the student is called
    assert list(tape.failed.values()) == [auto.jvp_fallback_reason]
    _assert_same_state(auto, ref, tol=0.0)
    with pytest.raises(ConfigError, match="logits differ"):
        _run_steps(Mistraced, "adamw", "tape", steps=1)


class RandomInsideGeneric(nn.Module):
    """Attention dropout inside an op without a tangent rule: its forward-AD rule would redraw."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x.mean(dim=(2, 3))).unsqueeze(0)
        h = F.scaled_dot_product_attention(h, h, h, dropout_p=0.5)
        return self.fc(h.squeeze(0))


def test_a_generic_op_that_draws_random_numbers_is_refused():
    with pytest.warns(UserWarning, match="draws random numbers"):
        auto, _, paths = _run_steps(RandomInsideGeneric, "sgd_nesterov", "auto", steps=2)
    ref, _, _ = _run_steps(RandomInsideGeneric, "sgd_nesterov", "forward_ad", steps=2)
    assert paths == ["forward_ad"] * 2
    _assert_same_state(auto, ref, tol=1e-12)
    # the candidates, as such: the pass cannot tell which of them drew
    with pytest.raises(ConfigError, match=r"draws random numbers \(one of: .*scaled_dot_product"):
        _run_steps(RandomInsideGeneric, "sgd_nesterov", "tape", steps=1)


def _sgd_mpl(teacher, student, **options) -> MetaPseudoLabels:
    return MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.1),
        **options,
    )


def test_hooks_mean_forward_ad_until_they_are_removed():
    teacher, student, x_l, y_l, x_u = _problem(RichNet)
    mpl = _sgd_mpl(teacher, student, jvp="auto")
    handle = student.bn1.register_forward_hook(lambda m, i, o: None)
    mpl.step(x_l, y_l, x_u)
    assert mpl.last_jvp_path == "forward_ad" and "hooks" in mpl.jvp_fallback_reason
    handle.remove()
    mpl.step(x_l, y_l, x_u)
    assert mpl.last_jvp_path == "tape" and mpl.jvp_fallback_reason is None


@pytest.mark.parametrize(
    "dtype, strict, with_tf32",
    [
        (torch.float64, 1e-8, 1e-8),
        (torch.float32, 1e-3, 0.25),
        (torch.bfloat16, 0.25, 0.25),
        (torch.float16, 0.25, 0.25),
    ],
)
def test_the_tape_checks_tolerance_by_dtype_and_tf32(dtype, strict, with_tf32):
    """How far the tape's first record and J may be from the module and forward AD: float64 and
    float32 tight, float32 with TF32 as loose as bf16 (TF32 matmuls round to a 10-bit mantissa,
    like bf16's 8 bits: a correct graph then differs by far more than 1e-3)."""
    assert tolerance(dtype, tf32=False) == strict
    assert tolerance(dtype, tf32=True) == with_tf32


@pytest.mark.parametrize("where", ["logits", "backward", "J"])
def test_the_tape_check_judges_a_float32_student_by_the_updates_tf32_flag(monkeypatch, where):
    """TF32 runs only on CUDA, so the step's TF32 flag is set by hand (``_tf32_on``) and the
    tape's error made up: one between the float32 and the TF32 tolerance, at the first record's
    logits, its backward or at J. With TF32 off the graph is given up (forward AD, with the reason); with TF32
    on the same error is trusted and J comes from the tape. Fails if the call site did not pass
    the update pass's flag, or if TF32 had float32's tolerance."""
    import metapl.mpl.jvp as jvp_module

    err = 1e-2
    assert tolerance(torch.float32, tf32=False) < err <= tolerance(torch.float32, tf32=True)
    for tf32 in (False, True):
        teacher, student, x_l, y_l, x_u = make_problem("mlp", dtype=torch.float32)
        mpl = _sgd_mpl(teacher, student, jvp="auto")
        monkeypatch.setattr(MetaPseudoLabels, "_tf32_on", lambda self, on=tf32: on)
        # relative_error in jvp.py is called three times at a graph's first step: the first
        # record's logits against the module's, its backward against the module's, then J
        # against forward AD's
        errors = iter(
            {"logits": [err, 0.0, 0.0], "backward": [0.0, err, 0.0]}.get(where, [0.0, 0.0, err])
        )
        monkeypatch.setattr(jvp_module, "relative_error", lambda a, b, errors=errors: next(errors))
        if tf32:
            mpl.step(x_l, y_l, x_u)
            assert mpl.last_jvp_path == "tape" and mpl.jvp_fallback_reason is None
            continue
        with pytest.warns(UserWarning, match="uses forward-mode AD"):
            mpl.step(x_l, y_l, x_u)
        assert mpl.last_jvp_path == "forward_ad"
        what = FIRST_USE_REASONS[where]
        assert what in mpl.jvp_fallback_reason and f"{err:.2e}" in mpl.jvp_fallback_reason


# What the step says when a graph's first use differs from the module and forward AD, by where.
FIRST_USE_REASONS = {
    "logits": "logits differ",
    "backward": "backward differs",
    "J": "tangent pass differs",
}


def test_the_library_default_is_forward_ad():
    """fx tracing would run a user's forward on proxies (side effects included): opt-in only."""
    teacher, student, x_l, y_l, x_u = _problem(RichNet)
    mpl = _sgd_mpl(teacher, student)
    mpl.step(x_l, y_l, x_u)
    assert mpl.jvp == "forward_ad" and mpl.last_jvp_path == "forward_ad"


def test_bad_jvp_option_is_a_config_error():
    teacher, student, *_ = _problem(RichNet)
    with pytest.raises(ConfigError, match="jvp must be one of"):
        _sgd_mpl(teacher, student, jvp="reverse")


# ----------------------------------------------------------------------------- generic rule


class Unruled(nn.Module):
    """Operations without a hand-written rule (tanh, max pool, layer norm, a weight view used
    twice): each is differentiated alone by forward AD from its saved inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.norm = nn.LayerNorm(6)
        self.w = nn.Parameter(torch.randn(6, 4) / 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.pool(self.conv(x)))
        h = F.max_pool2d(h, 4).flatten(1)
        h = self.norm(h)
        wt = self.w.t().t()  # a view of a parameter that the matmul rule needs as a primal
        h = h @ wt  # (N, 6) @ (6, 4)
        return self.fc(F.dropout(h, 0.2, True))


def test_operations_without_a_rule_use_the_generic_rule_exactly():
    torch.manual_seed(0)
    model = Unruled().to(DT).train()
    x = torch.randn(5, 3, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(2))
    params = dict(model.named_parameters())
    tape = TangentTape(model, params.values())
    generic = tape.describe()["generic_ops"]
    assert any("tanh" in g for g in generic) and any("MaxPool2d" in g for g in generic)
    assert any("max_pool2d" in g for g in generic) and any("LayerNorm" in g for g in generic)
    _, record, logits, native, j_tape, j_ref = tape_vs_native(model, x)
    assert rel_err(record.logits.detach(), logits.detach()) <= 1e-12
    assert j_ref.norm() > 1e-6
    assert rel_err(j_tape, j_ref) <= 1e-10


def test_whole_steps_through_generic_rules_equal_forward_ad():
    def unruled_rgb():
        return Unruled()

    tape, _, paths = _run_steps(unruled_rgb, "adamw", "tape")
    ref, _, _ = _run_steps(unruled_rgb, "adamw", "forward_ad")
    assert paths == ["tape"] * 3
    _assert_same_state(tape, ref)


def test_a_saved_view_of_a_weight_keeps_the_recorded_values():
    """``wt`` above is a view of a parameter: after optimizer.step() moved the parameter in place
    the tape must still use theta_t (it copies such views at record time)."""
    torch.manual_seed(0)
    model = Unruled().to(DT).train()
    x = torch.randn(5, 3, 8, 8, dtype=DT)
    tape = TangentTape(model, model.parameters())
    record = tape.record(x)
    views = [v for v in record.saved if isinstance(v, Tensor) and v.shape == (6, 4)]
    assert views and all(
        v.untyped_storage().data_ptr() != model.w.untyped_storage().data_ptr() for v in views
    )


def test_untraceable_models_raise_the_tape_error_directly():
    with pytest.raises(TapeUnsupportedError, match="fx cannot trace"):
        TangentTape(Branchy().to(DT), Branchy().parameters())


def test_ones_for_dropout_masks_have_the_input_layout():
    x = torch.randn(4, 6, 5, 5).to(memory_format=torch.channels_last)
    for t in (x, x[:, 1:], x.permute(1, 0, 2, 3)):
        ones = ones_with_layout(t)
        assert torch.equal(ones, torch.ones_like(t))
        assert ones.shape == t.shape
    # a CPU dropout of the ones draws exactly what a dropout of x draws
    torch.manual_seed(3)
    a = F.dropout(x[:, 1:], 0.4, True)
    torch.manual_seed(3)
    mask = F.dropout(ones_with_layout(x[:, 1:]), 0.4, True)
    assert torch.equal(a, x[:, 1:] * mask)


def test_training_runs_use_the_tape_and_check_the_option():
    """The engine opts in (config key mpl_jvp, default "auto"): a registry student uses the tape."""
    from metapl.train.config import apply_overrides
    from metapl.train.data import BatchSource
    from metapl.train.engine import Run, load_data
    from metapl.train.presets import load_preset

    cfg = apply_overrides(
        load_preset("digits-uda-mpl"), {"steps": 2, "warmup_steps": 1, "device": "cpu"}
    ).validate()
    assert cfg.mpl_jvp == "auto"
    split = load_data(cfg)
    run = Run(cfg, split, torch.device("cpu"))
    run.advance(BatchSource(split, cfg, run.method.views, torch.device("cpu")))
    assert run.method.mpl.last_jvp_path == "tape"
    with pytest.raises(ConfigError, match="mpl_jvp must be auto, tape or forward_ad"):
        apply_overrides(cfg, {"mpl_jvp": "reverse"}).validate()


@pytest.mark.parametrize("affine", [True, False], ids=["frozen_gamma", "no_affine"])
def test_eval_batchnorm_tangent_without_dgamma_passes_defined_saved_statistics(affine, monkeypatch):
    """BatchNorm with running statistics and no gamma tangent (frozen or no affine weight): the
    dx half calls native_batch_norm_backward without a forward pass. CUDA's kernel asserts that
    the saved mean and invstd are *defined* (empty in eval mode, as native_batch_norm returns
    them); None there was an internal assert on a GPU only. The tangent must be forward AD's."""
    from metapl.mpl import tangent_ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    dx = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    mean = torch.randn(3, generator=g, dtype=torch.float64)
    var = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    gamma = torch.randn(3, generator=g, dtype=torch.float64) if affine else None
    seen = []
    backward = torch.ops.aten.native_batch_norm_backward

    class Aten:
        def __getattr__(self, name):
            return getattr(torch.ops.aten, name)

        @staticmethod
        def native_batch_norm_backward(*args):
            seen.append(args[5:7])
            return backward(*args)

    monkeypatch.setattr(tangent_ops, "aten", Aten())
    got = tangent_ops.bn_tangent(x, dx, gamma, None, None, False, mean, var, 1e-5)
    assert seen and all(s is not None for s in seen[0])
    with fwad.dual_level():
        out = F.batch_norm(fwad.make_dual(x, dx), mean, var, gamma, None, False, 0.0, 1e-5)
        want = fwad.unpack_dual(out).tangent
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["wrn28_2", "resnet50", "efficientnet_b0", "small_cnn"])
def test_the_tape_keeps_nothing_autograd_does_not_keep_for_the_backward(name):
    """The exact step's memory peaks in the update pass's backward, with autograd's saved tensors
    all alive: a primal the tape keeps beyond those raises that peak above the first-order
    step's. Reading leaky_relu's output kept WRN's last activation (before the pooling, which
    saves nothing): 14 MiB at Table 3's batch in bf16."""
    torch.manual_seed(0)
    model = create_model(name, 10, dropout=0.3).to(DT).train()
    tape = TangentTape(model, list(model.parameters()))
    kept_by_autograd = set()

    def pack(t: Tensor) -> Tensor:
        kept_by_autograd.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        record = tape.record(torch.randn(2, 3, 32, 32, dtype=DT))
    saved = [t for t in record.saved if isinstance(t, Tensor)]
    assert saved
    extra = [t.shape for t in saved if t.untyped_storage().data_ptr() not in kept_by_autograd]
    assert extra == []
    # beyond autograd's: an activation's signs, 1 bit an element, where the tape keeps neither
    # its input nor its output
    for signs in (v for v in record.saved if isinstance(v, PackedSigns)):
        assert signs.bits.dtype == torch.uint8
        assert signs.bits.numel() == -(-signs.shape.numel() // 8)


def test_the_tape_keeps_one_of_leaky_relus_input_and_output_where_a_convolution_reads_it():
    """Reading leaky_relu's input everywhere kept both it and its output (which the next
    convolution's rule keeps) through the tangent pass: on the H200 the exact step's peak rose
    330 MiB above the first-order step's. Where a convolution reads the output, the tape reads
    the output; where nothing keeps either (WRN's last activation, before the pooling), neither:
    the input's signs, packed (the input, kept into the update pass's backward after autograd
    freed it, put the exact step's peak 14 MiB above the first-order step's)."""
    model = create_model("wrn28_2", 10).to(DT).train()
    tape = TangentTape(model, list(model.parameters()))
    saved = set(tape._saved_keys)
    leaky = [s.node for s in tape._steps if s.node.target is F.leaky_relu]
    assert len(leaky) == 25
    conv_fed = [n for n in leaky if any(u.op == "call_module" for u in n.users)]
    assert len(conv_fed) == 24
    for node in leaky:
        x = node.args[0]
        if node in conv_fed:
            assert node in saved and x not in saved and ("signs", x) not in saved, node
        else:  # the last one
            assert x not in saved and node not in saved and ("signs", x) in saved, node


class Activations(nn.Module):
    """Each way to write a ReLU or leaky ReLU, with its input and output read by other layers or
    not: ``kept`` says which the tape should read (input, output, or the input's packed signs)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()
        self.leaky = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.conv(x)
        a = self.relu(h)  # output read by the BatchNorm: the output
        b = self.bn(a)
        c = F.leaky_relu(b, 0.2)  # input also read by conv2 (through b): the input
        d = self.conv2(b) + c
        e = d.relu()  # read by the pooling only: signs
        f = torch.relu(d) + F.relu(d) + self.leaky(d) + F.leaky_relu(d, -0.3)  # signs (all four)
        g = F.max_pool2d(F.relu(h), 3, 1, 1)  # the max pool's (generic) rule keeps the output
        return self.fc((e + f + g).mean(dim=(2, 3)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_activations_read_what_another_rule_keeps_else_packed_signs_exactly(channels_last):
    """The packed signs give forward AD's J (to float64 rounding) in either memory layout, for
    each spelling of the activations, where neither input nor output is kept by another rule."""
    torch.manual_seed(0)
    model = with_random_bn(Activations()).to(DT).train()
    x = torch.randn(3, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    tape, record, logits, native, j_tape, j_ref = tape_vs_native(model, x)
    assert j_ref.norm() > 1e-6
    assert rel_err(j_tape, j_ref) <= 1e-10, rel_err(j_tape, j_ref)
    saved = set(tape._saved_keys)
    acts = {s.node.name: s.node for s in tape._steps if s.node.name != "x"}
    relu, leaky = acts["relu"], acts["leaky_relu"]
    assert relu in saved and relu.args[0] not in saved  # the BatchNorm keeps the output
    (pooled,) = [n for n in acts.values() if n.target is F.relu and n.args[0] is relu.args[0]]
    assert pooled in saved  # so does the max pool
    assert leaky.args[0] in saved and leaky not in saved  # conv2 keeps the input
    # the five activations of d read one packing of its signs, and neither d nor their outputs
    d = acts["add"]
    assert [k for k in saved if isinstance(k, tuple) and k[0] == "signs"] == [("signs", d)]
    readers = list(d.users)
    assert len(readers) == 5 and not saved & {d, *readers}
    (packed,) = [v for v in record.saved if isinstance(v, PackedSigns)]
    assert packed.unpack().shape == (3, 4, 6, 6) and packed.bits.numel() == 3 * 4 * 6 * 6 // 8
