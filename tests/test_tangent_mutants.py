"""The tangent tape where hand-made mutants survived the rest of the suite, each held to forward AD
(``torch.autograd.forward_ad`` on the module itself) in float64:

- rules for options no other test's student uses: exact (erf) GELU as a module and a function, a
  dilated conv, a conv with reflect padding (not the zero padding the conv rule assumes), ``F.pad``
  in reflect mode and with a non-zero fill value (the tangent of a constant fill is 0), a constant
  minus a tangent, BatchNorm without running statistics in eval mode (batch statistics), a
  tensor attribute with a tangent (``.mT``), and BatchNorm without gamma and beta in train mode;
- BatchNorm's tangent of a bf16 input, in bf16 with float32 statistics as autocast's BatchNorm
  computes (held to forward AD of ``F.batch_norm`` in float64, within bf16's rounding), with and
  without tangents of its affine parameters;
- the generic rule of a layer that updates its buffers in train mode (InstanceNorm with running
  statistics) runs on copies of them: the buffers end as the native pass leaves them;
- a conversion by ``x.type(dtype)`` (a bug: the tape treated every ``.type`` call as ``x.type()``,
  the type's name, and dropped the tangent);
- logits that their own rule reads (a final sigmoid): the tangent pass must not free them;
- a layer registered twice inside a module that fx keeps whole (ALBERT-style sharing in
  ``nn.TransformerEncoder``): the generic rule and the record pass on copies of the buffers give
  the student its own parameters and buffers back (torch's ``functional_call`` left its tensors
  in one of the two places);
- the first-use checks of a traced graph: a NaN error (logits or J) is no agreement, and a graph
  whose logits have no tangent at all while the module's do is not trusted.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from exact_checks import checked_exact_step
from mpl_helpers import make_problem, rel_err
from test_tangent_replay import (
    FIRST_USE_REASONS,
    RichNet,
    _assert_same_state,
    _problem,
    _run_steps,
    _sgd_mpl,
    tape_vs_native,
)
from torch import Tensor, nn

from metapl import MetaPseudoLabels
from metapl.mpl import tangent_ops

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64


class ExtraOps(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv_reflect = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.conv_dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics in eval mode
        self.gelu = nn.GELU()
        self.w = nn.Parameter(torch.randn(4, 4, generator=g) / 2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.gelu(self.conv_reflect(x))
        h = F.pad(h, (1, 1, 1, 1), "reflect")
        h = self.bn(self.conv_dilated(h))
        h = 1.0 - F.gelu(h)
        h = F.pad(h, (1, 0, 0, 1), value=0.7)
        return self.fc(h.mean(dim=(2, 3)) @ self.w.mT)


def test_rules_for_less_common_options_are_forward_ad():
    torch.manual_seed(0)
    model = ExtraOps().to(DT).train()
    model.bn.eval()  # still batch statistics: it has no running ones
    x = torch.randn(5, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    tape, record, logits, _, j_tape, j_ref = tape_vs_native(model, x)
    generic = tape.describe()["generic_ops"]
    # the reflect-padded conv and the attribute go through forward AD of their node, the rest
    # through the hand-written rules under test
    assert len(generic) == 2 and any("conv_reflect" in g for g in generic), generic
    assert rel_err(record.logits.detach(), logits.detach()) <= 1e-12
    assert j_ref.norm() > 1e-6
    assert rel_err(j_tape, j_ref) <= 1e-10, rel_err(j_tape, j_ref)


class TypeCast(nn.Module):
    """``x.type(dtype)`` converts like ``x.to(dtype)``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.relu(self.a(x)).type(torch.float64))


def test_a_dtype_conversion_by_type_keeps_its_tangent():
    """``.type`` was a method without a tangent (as ``x.type()``, the name): J lost every path
    through ``h.type(torch.float64)`` (44% off forward AD here; in a step the first-use check
    refused the graph)."""
    torch.manual_seed(0)
    model = TypeCast().to(DT).train()
    x = torch.randn(5, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    tape, record, logits, _, j_tape, j_ref = tape_vs_native(model, x)
    assert tape.describe()["generic"] == 0
    assert j_ref.norm() > 1e-6
    assert rel_err(j_tape, j_ref) <= 1e-10, rel_err(j_tape, j_ref)


class SigmoidOut(nn.Module):
    """Logits from an activation whose rule reads its own output: the output node is among the
    primals the tangent pass frees after their last reader, and must not be freed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.fc(x))


def test_logits_read_by_their_own_rule_keep_their_tangent():
    torch.manual_seed(0)
    model = SigmoidOut().to(DT).train()
    x = torch.randn(5, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    *_, j_tape, j_ref = tape_vs_native(model, x)
    assert j_tape is not None and j_ref.norm() > 1e-6
    assert rel_err(j_tape, j_ref) <= 1e-10, rel_err(j_tape, j_ref)


@pytest.mark.parametrize("where", ["logits", "backward", "J"])
def test_a_nan_error_at_the_first_use_is_no_agreement(monkeypatch, where):
    """``err <= tol`` is False for NaN (a graph whose logits or J came out NaN): the graph is
    given up, as for any other difference; ``err > tol`` would have trusted it."""
    import metapl.mpl.jvp as jvp_module

    teacher, student, x_l, y_l, x_u = make_problem("mlp", dtype=DT)
    mpl = _sgd_mpl(teacher, student, jvp="auto")
    nan = float("nan")
    errors = iter(
        {"logits": [nan, 0.0, 0.0], "backward": [0.0, nan, 0.0]}.get(where, [0.0, 0.0, nan])
    )
    monkeypatch.setattr(jvp_module, "relative_error", lambda a, b: next(errors))
    with pytest.warns(UserWarning, match="uses forward-mode AD"):
        mpl.step(x_l, y_l, x_u)
    assert mpl.last_jvp_path == "forward_ad"
    assert FIRST_USE_REASONS[where] in mpl.jvp_fallback_reason and "nan" in mpl.jvp_fallback_reason


class TangentFree(RichNet):
    """The module's logits depend on its parameters; fx's graph, the same logits, detached
    (``isinstance`` is False on a proxy): the tape says J is None (no tangent), forward AD says
    otherwise; the traced graph's backward reaches no parameter, the module's does. The first
    use's comparison of the backward tells (before that of J)."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if not isinstance(out, Tensor):
            out = out.detach()
        return out


def test_a_graph_without_a_tangent_is_not_trusted_when_forward_ad_has_one():
    with pytest.warns(UserWarning, match="backward differs"):
        auto, _, paths = _run_steps(TangentFree, "adamw", "auto", steps=2)
    ref, _, _ = _run_steps(TangentFree, "adamw", "forward_ad", steps=2)
    assert paths == ["forward_ad"] * 2
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in ref.teacher.parameters())
    _assert_same_state(auto, ref, tol=0.0)


def _trains_as_forward_ad_with(monkeypatch, method: str, replacement, warning: str) -> None:
    """With TangentTape's ``method`` replaced, jvp="auto" warns ``warning``, gives the graph up at
    its first use and trains as forward AD does, bit for bit, from the first step."""
    from metapl.mpl.tangent import TangentTape

    real = getattr(TangentTape, method)
    monkeypatch.setattr(TangentTape, method, replacement)
    with pytest.warns(UserWarning, match=warning):
        auto, _, paths = _run_steps(RichNet, "adamw", "auto", steps=2)
    monkeypatch.setattr(TangentTape, method, real)
    ref, _, _ = _run_steps(RichNet, "adamw", "forward_ad", steps=2)
    assert paths == ["forward_ad"] * 2
    _assert_same_state(auto, ref, tol=0.0)


def test_a_wrong_tangent_pass_on_a_right_graph_is_not_trusted(monkeypatch):
    """The traced graph is the module (same logits, same backward) but its tangent pass is off by
    10%: only the first use's comparison of J with forward AD can tell."""
    from metapl.mpl.tangent import TangentTape

    real = TangentTape.tangent

    def off(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return None if out is None else 1.1 * out

    _trains_as_forward_ad_with(monkeypatch, "tangent", off, "tangent pass differs")


def test_a_graph_whose_backward_fails_is_not_trusted(monkeypatch):
    """The traced graph records but its backward fails (here: the record that the first use's
    comparison of backwards differentiates): the first use gives the graph up for forward AD, as
    for any other failure of it, instead of the step failing."""
    import inspect

    from metapl.mpl.tangent import TangentTape

    real = TangentTape.record

    def no_backward(self, *args, **kwargs):
        if any(frame.function == "_backward_difference" for frame in inspect.stack()):
            raise RuntimeError("no backward here")
        return real(self, *args, **kwargs)

    _trains_as_forward_ad_with(
        monkeypatch, "record", no_backward, "backward fails.*RuntimeError: no backward here"
    )


def test_a_frozen_parameter_keeps_the_graph():
    """A parameter frozen after construction (still in the optimizer) gets no gradient: the first
    use's comparison of backwards leaves it out, as the step does, instead of failing on it and
    giving a good graph up."""
    teacher, student, x_l, y_l, x_u = _problem(RichNet)
    mpl = _sgd_mpl(teacher, student, jvp="tape")
    next(student.parameters()).requires_grad_(False)
    for step in range(2):
        torch.manual_seed(step)
        mpl.step(x_l, y_l, x_u)
        assert mpl.last_jvp_path == "tape"


class NoAffineBatchNorm(nn.Module):
    """BatchNorm without gamma and beta in train mode: no parameter tangent of its own, so the
    tangent is the dx half alone (the fused pass over x gives xhat, not a tangent)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_batchnorm_without_affine_parameters_is_forward_ad():
    """Adding BatchNorm's xhat to the tangent put J 8% off here: the first-use check would refuse
    the graph in float32, but not under bf16 autocast's loose bar."""
    torch.manual_seed(0)
    model = NoAffineBatchNorm().to(DT).train()
    x = torch.randn(5, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    *_, j_tape, j_ref = tape_vs_native(model, x)
    assert j_ref.norm() > 1e-6
    assert rel_err(j_tape, j_ref) <= 1e-10, rel_err(j_tape, j_ref)


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("affine_tangents", [True, False], ids=["affine_moves", "affine_frozen"])
def test_batchnorm_tangent_of_a_bf16_input_stays_bf16_within_its_rounding(
    batch_stats, affine_tangents
):
    """As autocast's BatchNorm runs: bf16 activations, float32 statistics and parameters (no
    float32 copies of x and dx: 3 ms of the H200's tangent pass). Held to forward AD of
    ``F.batch_norm`` on the same values in float64, the bf16 tangent is within twice the error of
    that reference's own rounding to bf16 (measured 1.4x; statistics in bf16, or a term left out,
    are far beyond). With a frozen affine (no tangent of gamma or beta) on a CPU, the statistics
    came out in bf16 and the backward refused the float32 gamma."""
    g = torch.Generator().manual_seed(0)
    x, dx = (torch.randn(6, 4, 3, 3, generator=g).bfloat16() for _ in range(2))
    gamma, dgamma, dbeta = 1 + 0.3 * torch.randn(4, generator=g), *torch.randn(2, 4, generator=g)
    if not affine_tangents:
        dgamma = dbeta = torch.zeros(4)  # the reference's; the rule gets None
    rm, rv = 0.3 * torch.randn(4, generator=g), 0.5 + torch.rand(4, generator=g)
    got = tangent_ops.bn_tangent(
        x,
        dx,
        gamma,
        dgamma if affine_tangents else None,
        dbeta if affine_tangents else None,
        batch_stats,
        rm,
        rv,
        1e-5,
    )
    with fwad.dual_level():
        y = F.batch_norm(
            fwad.make_dual(x.double(), dx.double()),
            None if batch_stats else rm.double(),
            None if batch_stats else rv.double(),
            fwad.make_dual(gamma.double(), dgamma.double()),
            fwad.make_dual(torch.zeros(4, dtype=DT), dbeta.double()),
            training=batch_stats,
            eps=1e-5,
        )
        ref = fwad.unpack_dual(y).tangent
    assert got.dtype == torch.bfloat16
    rounding = rel_err(ref.bfloat16().double(), ref)
    assert rel_err(got.double(), ref) <= 2 * rounding, (rel_err(got.double(), ref), rounding)


class RunningInstanceNorm(nn.Module):
    """A layer without a rule that updates its buffers in train mode: its forward-AD rule runs it
    again, on copies of them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.norm(self.conv(x))).mean(dim=(2, 3)))


def test_the_generic_rule_leaves_a_layers_buffers_as_the_native_pass_does():
    """The tangent pass must not update the running statistics a second time (on the live buffers
    they moved twice as far as the native forward moved them)."""
    torch.manual_seed(0)
    model = RunningInstanceNorm().to(DT).train()
    x = torch.randn(5, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    tape, _, _, native, j_tape, j_ref = tape_vs_native(model, x)
    assert any("InstanceNorm2d" in g for g in tape.describe()["generic_ops"])
    assert rel_err(j_tape, j_ref) <= 1e-10, rel_err(j_tape, j_ref)
    for (name, b), ref in zip(model.named_buffers(), native.buffers()):
        assert torch.equal(b, ref), name


class SequenceBatchNorm(nn.Module):
    """BatchNorm over the features of ``[N, L, E]`` sequences (a transformer's norm as PatchTST
    has it): a layer with running statistics."""

    def __init__(self, width: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class SharedLayerEncoder(nn.Module):
    """An ``nn.TransformerEncoder`` whose two layers are one layer (``layers.0`` and ``layers.1``,
    ALBERT-style sharing), with BatchNorm for its norms, between a Linear embedding and a Linear
    head. fx keeps the encoder whole (a torch.nn module) and the tape has no rule for it: the
    tangent pass differentiates it by forward AD of the module (the generic rule), and the record
    module holds it, its aliased layer and the layer's buffers."""

    def __init__(self, features: int = 3, width: int = 4):
        super().__init__()
        self.embed = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, 2, 6, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.encoder.layers = nn.ModuleList([layer, layer])
        layer.norm1, layer.norm2 = SequenceBatchNorm(width), SequenceBatchNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def _shared_layer_problem():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    # (a plain teacher: the student's biases before a BatchNorm have a gradient of 0, all noise)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(5 * 3, 3)).to(DT)
    student = SharedLayerEncoder().to(DT).train()
    x_l, x_u = (
        torch.randn(4, 5, 3, generator=g, dtype=DT),
        torch.randn(6, 5, 3, generator=g, dtype=DT),
    )
    y_l = torch.randint(0, 3, (4,), generator=g)
    return teacher, student, x_l, y_l, x_u


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.5)


def _shared_layer_mpl(teacher, student) -> MetaPseudoLabels:
    return MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        _sgd(student.parameters()),
        supervised_weight=0.0,
        jvp="tape",
    )


def test_the_generic_rule_gives_a_shared_layer_its_parameters_back():
    """The generic rule runs the encoder on theta_t's dual tensors. Plain
    torch.func.functional_call puts the shared layer's Parameters back under one of its two names
    only: the layer would keep theta_t's plain tensors, which the student's optimizer does not
    update (the next step refuses: "student_optimizer must optimize the student's own
    parameters"; had it run, the student would train on a frozen layer). Two steps on the tape,
    each against the double-backward oracle, finite differences of the real step and the
    student's real step; the layer's weight is still the optimizer's Parameter under both names."""
    teacher, student, x_l, y_l, x_u = _shared_layer_problem()
    mpl = _shared_layer_mpl(teacher, student)
    layer = student.encoder.layers[0]
    weight = layer.linear1.weight
    gen = torch.Generator().manual_seed(3)
    for step in range(2):
        checked_exact_step(mpl, _sgd, x_l, y_l, x_u, seed=10 + step, gen=gen)
        assert mpl.last_jvp_path == "tape", mpl.jvp_fallback_reason
    tape = next(iter(mpl._tapes.values()))
    assert tape.describe()["generic_ops"] == ["encoder (TransformerEncoder)"]
    assert isinstance(weight, nn.Parameter)
    assert student.encoder.layers[1].linear1.weight is weight is layer.linear1.weight


def test_the_record_pass_on_copies_gives_a_shared_layer_its_buffers_back():
    """The first use of a graph records it on copies of the buffers. Plain
    torch.func.functional_call would leave the copies in the shared layer's BatchNorm (it puts the
    buffers back under one of the layer's two names only): the student's running statistics
    would be other tensors after each step (their values happen to be right: the last copy left
    there is updated as the real pass updates the statistics), and since a graph's key holds the
    buffers' identities, every step would trace the student again and check it anew. One graph
    serves every step, and the statistics stay the layer's own tensors, updated by the update
    passes alone (twice per step: the layer runs twice)."""
    teacher, student, x_l, y_l, x_u = _shared_layer_problem()
    mpl = _shared_layer_mpl(teacher, student)
    stats = student.encoder.layers[0].norm1.bn.running_mean
    tapes = []
    for step in range(3):
        torch.manual_seed(step)
        mpl.step(x_l, y_l, x_u)
        assert mpl.last_jvp_path == "tape", mpl.jvp_fallback_reason
        tapes.append(next(iter(mpl._tapes.values())))
    assert len(mpl._tapes) == 1 and tapes[0] is tapes[1] is tapes[2]
    assert student.encoder.layers[1].norm1.bn.running_mean is stats
    assert int(student.encoder.layers[0].norm1.bn.num_batches_tracked) == 3 * 2
