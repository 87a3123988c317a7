"""The tangent tape's less common paths, each held to its behaviour (not just run).

Tangent rules for spellings of an operation that the registry models do not use (methods, keyword
aliases, arguments computed in the graph, tuple outputs, partial tangents, mixed dtypes) are held to
forward-mode AD in float64, to 1e-12: the oracle is ``torch.autograd.forward_ad`` on
``functional_call`` of the very model, with the same random numbers, written here against torch
alone. Students the tape must refuse are held to the reason it gives, and the key that decides
whether a traced graph is still current (:func:`~metapl.mpl.tangent.module_signature`) to the
changes it must see.

Tiny float64 models, one intra-op thread: the file runs in a few seconds on a CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.fx as fx
import torch.nn.functional as F
from mpl_helpers import cloned_buffers, rel_err
from torch import Tensor, nn
from torch.func import functional_call

from metapl.mpl.tangent import TangentTape, TapeUnsupportedError, module_signature

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64
TOL = 1e-12


# ----------------------------------------------------------------------------- helpers


def forward_ad_jvp(model: nn.Module, theta: dict, w: dict, args: tuple, seed: int) -> Tensor:
    """d logits along ``w`` (a tangent for some of the parameters, by name) at ``theta`` by
    forward AD, with the RNG seeded as for the recorded pass."""
    torch.manual_seed(seed)
    with fwad.dual_level():
        weights = {n: fwad.make_dual(t, w[n]) if n in w else t for n, t in theta.items()}
        out = functional_call(model, {**cloned_buffers(model), **weights}, args)
        return fwad.unpack_dual(out).tangent


def tape_and_forward_ad(
    model: nn.Module, *args: Tensor, only: set[str] | None = None, seed: int = 7, grad: bool = True
):
    """The tape's J and forward AD's J of ``model`` on ``args`` along a random tangent of the
    parameters named in ``only`` (all by default). The live parameters move after the record (as
    ``optimizer.step()`` moves them): the tape must read theta_t. ``grad``: record with autograd
    on (the update pass) or under ``no_grad``. Returns ``(tape, record, j_tape, j_ref)``."""
    params = dict(model.named_parameters())
    tape = TangentTape(model, params.values())
    theta = {n: p.detach().clone() for n, p in params.items()}
    buffers = cloned_buffers(model)  # as the record pass starts (it updates running statistics)
    torch.manual_seed(seed)
    with torch.set_grad_enabled(grad):
        record = tape.record(args)
    g = torch.Generator().manual_seed(5)
    w = {
        n: torch.randn(p.shape, generator=g, dtype=DT).to(p.dtype)
        for n, p in params.items()
        if only is None or n in only
    }
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
        j_tape = tape.tangent(
            record,
            {id(p): theta[n] for n, p in params.items()},
            {id(params[n]): t for n, t in w.items()},
        )
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    j_ref = forward_ad_jvp(model, theta, w, args, seed)
    return tape, record, j_tape, j_ref


def assert_tape_is_forward_ad(j_tape: Tensor | None, j_ref: Tensor) -> None:
    assert j_tape is not None
    assert j_tape.dtype == j_ref.dtype and j_tape.shape == j_ref.shape
    assert j_ref.norm() > 1e-6  # not two zeros agreeing
    assert rel_err(j_tape, j_ref) <= TOL, rel_err(j_tape, j_ref)


def _x(*shape: int, seed: int = 2) -> Tensor:
    return torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _model(cls: type[nn.Module], *a) -> nn.Module:
    torch.manual_seed(0)
    return cls(*a).to(DT).train()


# ----------------------------------------------------------------------------- method spellings


class MethodSpellings(nn.Module):
    """Tensor methods and an ``nn.Sigmoid`` module where the registry models call functions:
    ``.sigmoid()``, ``.mul``, ``.div`` / ``.true_divide`` / ``.divide`` (by a constant and by a
    tensor with a tangent), ``.neg()``, ``.matmul`` / ``.mm`` / ``.bmm``."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(4, 6)
        self.lin2 = nn.Linear(4, 6)
        self.gate = nn.Sigmoid()
        self.w = nn.Parameter(torch.randn(6, 5) / 3)
        self.v = nn.Parameter(torch.randn(2, 5, 5) / 3)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.lin1(x), self.lin2(x)  # both carry tangents
        h = a.sigmoid().mul(b) + self.gate(b)
        h = h.div(b * b + 1.0) + a.true_divide(2.0) + a.divide(a * a + 2.0)
        h = h.neg()
        h = h.matmul(self.w) + h.mm(self.w)  # (N, 5)
        h = h.view(2, -1, 5).bmm(self.v).flatten(0, 1)
        return self.fc(h)


def test_method_spellings_use_their_hand_written_rules_and_are_forward_ad():
    """Each method spelling (and the Sigmoid module) has the same hand-written rule as its
    function spelling: no node falls back to the generic rule, and J is forward AD's. The mul and
    div rules are exercised with a tangent on both operands (the product and quotient rules)."""
    model = _model(MethodSpellings)
    tape, _, j_tape, j_ref = tape_and_forward_ad(model, _x(6, 4))
    assert tape.describe()["generic"] == 0, tape.describe()["generic_ops"]
    spelled = {s.node.target for s in tape._steps if s.node.op == "call_method"}
    assert {
        "sigmoid",
        "mul",
        "div",
        "true_divide",
        "divide",
        "neg",
        "matmul",
        "mm",
        "bmm",
    } <= spelled
    assert any(s.node.target == "gate" for s in tape._steps)
    assert_tape_is_forward_ad(j_tape, j_ref)


# ----------------------------------------------------------------------------- generic fallbacks


class KeywordAliases(nn.Module):
    """Calls that bind no rule's argument stub: torch's numpy-style keyword aliases (``x=`` for
    ``input`` of relu, sigmoid, gelu and a convolution, ``axis=`` for ``dim``), a keyword-only
    ``input=``, a ``torch.cat`` of a tuple node
    (a chunk), a method without a rule (``.tanh()``), a method returning a plain int
    (``.ndimension()``) and reductions returning named tuples (``torch.max(h, dim)``)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.k = nn.Parameter(torch.randn(2, 1, 3) / 3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        h = torch.relu(x=h) + torch.sigmoid(x=h) + F.gelu(x=h)
        h = h + F.conv1d(x=h.unsqueeze(1), weight=self.k, padding=1).sum(1)
        h = torch.cat([h, h.tanh()], axis=1)  # (N, 12)
        h = torch.cat(h.chunk(2, 1), 1)  # the chunk's tuple node as a whole
        h = torch.flatten(input=h.view(-1, 2, 6), start_dim=1)  # no positional argument
        g = h.view(-1, 2, 6)
        m = g.mean(dim=h.ndimension() - 1)  # (N, 6): the dim from an int node
        top = torch.max(g, dim=1).values + torch.max(g, 1)[0]  # (N, 6)
        picked = g[torch.nonzero(g, as_tuple=True)]  # integer indices: a tuple without tangents
        return self.fc(m + top) + picked.sum()


GENERIC_ALIASES = [
    "conv1d()",
    "relu()",
    "sigmoid()",
    "gelu()",
    "cat()",
    ".tanh()",
    "flatten()",
    ".ndimension()",
    ".mean()",
    "max()",
    "getattr()",
    "nonzero()",
]


def test_spellings_no_rule_binds_go_to_the_generic_rule_exactly():
    """Where a call does not bind the rule's stub (a keyword alias, no positional input, a tuple
    node where a list is expected) or has no rule at all, the node is differentiated alone by
    forward AD (the generic rule) instead of being refused or mis-read: those nodes are listed as
    generic, and J is forward AD's. Covers tuple-valued nodes both ways: a tuple tangent made dual
    (the chunk into ``torch.cat``) and a tuple output's tangents (``torch.max``), and an int
    output (``.ndimension()``) that carries none."""
    model = _model(KeywordAliases)
    tape, record, j_tape, j_ref = tape_and_forward_ad(model, _x(5, 4))
    generic = tape.describe()["generic_ops"]
    for op in GENERIC_ALIASES:
        assert op in generic, (op, generic)
    assert generic.count("cat()") == 2
    assert_tape_is_forward_ad(j_tape, j_ref)
    # a tuple output: a tuple of tangents (None for the indices), or None where none has one
    outputs = _rule_outputs(tape, record, dict(model.named_parameters()), None)
    maxima = [v for n, v in outputs.items() if n.startswith("max")]
    assert len(maxima) == 2
    for values, indices in maxima:
        assert isinstance(values, Tensor) and indices is None
    assert outputs["nonzero"] is None


class ComputedArguments(nn.Module):
    """Arguments a rule needs as constants but the graph computes: a convolution's padding from
    its weight's shape, a leaky slope, a BatchNorm eps, an add's alpha and a cat's dim from the
    input's shape; and a parameter row ``expand_as`` an activation (the shape argument itself
    carries a tangent)."""

    def __init__(self):
        super().__init__()
        self.cw = nn.Parameter(torch.randn(4, 2, 3, 3) / 3)
        self.cb = nn.Parameter(torch.randn(4) / 3)
        self.g = nn.Parameter(torch.rand(4) + 0.5)
        self.b = nn.Parameter(torch.randn(4) / 3)
        self.row = nn.Parameter(torch.randn(1, 4))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.conv2d(x, self.cw, self.cb, padding=self.cw.shape[-1] // 2)
        h = F.leaky_relu(h, 0.05 * h.shape[1])
        h = F.batch_norm(h, None, None, self.g, self.b, True, 0.1, 1e-5 * h.shape[1])
        p = h.mean(dim=(2, 3))  # (N, 4)
        p = torch.add(p, p * p, alpha=1.0 / p.shape[0]) + self.row.expand_as(p)
        return self.fc(torch.cat([p, p.sigmoid()], dim=p.dim() - 1))


def test_arguments_computed_in_the_graph_go_to_the_generic_rule_exactly():
    """A rule reads its non-tensor arguments once, at build time: where the graph computes one
    (an fx node), the conv, leaky ReLU, functional BatchNorm, add, cat and ``expand_as`` rules
    decline and the node gets the generic rule, which reads the value the record saw. J is
    forward AD's."""
    model = _model(ComputedArguments)
    tape, _, j_tape, j_ref = tape_and_forward_ad(model, _x(3, 2, 5, 5))
    generic = tape.describe()["generic_ops"]
    for op in ("conv2d()", "leaky_relu()", "batch_norm()", "add()", "cat()", ".expand_as()"):
        assert op in generic, (op, generic)
    assert_tape_is_forward_ad(j_tape, j_ref)


# A user function fx keeps as a call (fx.wrap), whose signature (functools.wraps: the wrapped
# function's) does not bind the call.
def _scaled(fn):
    @functools.wraps(fn)
    def wrapper(x, scale=1.0):
        return fn(x) * scale

    return wrapper


@_scaled
def scaled_tanh(x):
    return torch.tanh(x)


fx.wrap("scaled_tanh")


def clamp_act(x, inplace=False):
    """A user activation with an in-place option, kept as a call by fx.wrap."""
    return x.clamp_(-1.0, 1.0) if inplace else x.clamp(-1.0, 1.0)


fx.wrap("clamp_act")


class WrappedCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(scaled_tanh(self.lin(x), 2.0))


def test_a_call_its_reported_signature_cannot_bind_is_not_refused():
    """The in-place check binds a Python function's call to its signature to find
    ``inplace=True``; a signature that cannot bind the call (a decorator's ``functools.wraps``
    reports the wrapped function's) means "no in-place argument", not an error: the tape serves
    the model, the call gets the generic rule, and J is forward AD's."""
    model = _model(WrappedCall)
    tape, _, j_tape, j_ref = tape_and_forward_ad(model, _x(5, 4))
    assert tape.describe()["generic_ops"] == ["scaled_tanh()"]
    assert_tape_is_forward_ad(j_tape, j_ref)


class TypeName(nn.Module):
    """``h.type()`` (the type's name, a string) fed to ``h.type(name)`` (a conversion)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        return self.fc(h.sigmoid().type(h.type()))


def test_a_type_name_carries_no_tangent():
    """``x.type()`` without arguments is a string, not a tensor: it carries no tangent, so the
    conversion ``h.type(name)`` keeps its linear rule (its argument is a constant of the record)
    instead of going generic. J is forward AD's."""
    model = _model(TypeName)
    tape, _, j_tape, j_ref = tape_and_forward_ad(model, _x(5, 4))
    (name,) = [n for n in tape._gm.graph.nodes if n.target == "type" and len(n.args) == 1]
    assert name not in tape._active
    assert tape.describe()["generic"] == 0, tape.describe()["generic_ops"]
    assert_tape_is_forward_ad(j_tape, j_ref)


# ----------------------------------------------------------------------------- partial tangents


class PartialNet(nn.Module):
    """A branch (``lin1``) through a unary rule, the generic rule, a quotient and a cat, then a
    head (``fc``): a tangent on the head alone leaves every node of the branch without one."""

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(4, 5)
        self.fc = nn.Linear(10, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = self.lin1(x)
        s = torch.sigmoid(a)
        t = torch.tanh(a)  # generic
        d = s / (t + 2.0)
        return self.fc(torch.cat([s, d], 1))


@pytest.mark.parametrize("only", [{"fc.weight", "fc.bias"}, {"lin1.weight"}, None])
def test_a_tangent_on_some_parameters_leaves_the_others_branches_without_one(only):
    """A parameter without a tangent contributes nothing (the step passes tangents only for the
    parameters it has them for): a unary, generic, add, quotient or cat node whose inputs have no
    tangent gives None (not zeros, which would cost a pass each; not an error), and J is forward
    AD's with the same partial tangent."""
    model = _model(PartialNet)
    tape, record, j_tape, j_ref = tape_and_forward_ad(model, _x(6, 4), only=only)
    assert tape.describe()["generic_ops"] == ["tanh()"]
    assert_tape_is_forward_ad(j_tape, j_ref)
    branch = ("sigmoid", "tanh", "add", "truediv", "cat")
    outputs = _rule_outputs(tape, record, dict(model.named_parameters()), only)
    if only == {"fc.weight", "fc.bias"}:
        assert all(outputs[n] is None for n in branch), outputs
    else:
        assert all(isinstance(outputs[n], Tensor) for n in branch)


def _rule_outputs(tape: TangentTape, record, params: dict, only) -> dict:
    """Each step's tangent (by node name) in a tangent pass along ones on ``only``'s parameters
    (all by default)."""
    outputs: dict = {}
    for step in tape._steps:
        step.rule = functools.partial(_noting, step.rule, step.node.name, outputs)
    tangents = {id(p): torch.ones_like(p) for n, p in params.items() if only is None or n in only}
    with torch.no_grad():
        tape.tangent(record, {}, tangents)
    return outputs


def _noting(rule, name: str, outputs: dict, *args):
    outputs[name] = rule(*args)
    return outputs[name]


# ----------------------------------------------------------------------------- dtypes


class MixedDtypes(nn.Module):
    """A float32 scale on a float32 copy of the input, added to the float64 input: the sum is
    float64, but only the float32 operand has a tangent."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.5))
        self.fc = nn.Linear(4, 3).to(DT)

    def forward(self, x: Tensor) -> Tensor:
        h = x.float() * self.s  # float32
        return self.fc(h + x)  # float64


def test_a_tangent_takes_its_outputs_dtype():
    """The add rule passes the one operand's tangent through (float32) where the output is
    float64 (type promotion with the other operand): the tangent pass converts it to the output's
    dtype, so the next layer (a float64 linear, which would refuse a float32 input) gets float64.
    J is forward AD's (float64 logits)."""
    torch.manual_seed(0)
    model = MixedDtypes().train()
    assert model.s.dtype == torch.float32
    _, _, j_tape, j_ref = tape_and_forward_ad(model, _x(5, 4), only={"s"})
    assert j_tape is not None and j_tape.dtype == DT
    assert_tape_is_forward_ad(j_tape, j_ref)


# ----------------------------------------------------------------------------- BatchNorm statistics


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.silu(self.bn(self.conv(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
def test_a_record_without_autograd_keeps_no_batch_statistics_and_the_tangent_computes_them(grad):
    """The tangent pass reads a BatchNorm's batch statistics from the autograd node of the record
    (what its backward saved). A record without one (under ``no_grad``; also cuDNN's kernel, whose
    node is another type) keeps None, and the tangent computes the statistics from the saved
    input instead: J is forward AD's either way."""
    with torch.no_grad():
        model = _model(ConvBN)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.normal_()
    tape, record, j_tape, j_ref = tape_and_forward_ad(model, _x(3, 2, 5, 5), grad=grad)
    saved = dict(zip(tape._saved_keys, record.saved))
    ((key, stats),) = [
        (k, v) for k, v in saved.items() if isinstance(k, tuple) and k[0] == "bn_stats"
    ]
    if grad:
        mean, rstd = stats
        assert mean.shape == rstd.shape == (4,)
    else:
        assert stats is None
    assert_tape_is_forward_ad(j_tape, j_ref)


# ----------------------------------------------------------------------------- refusals


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("buf", torch.zeros(3, 4))


class WritesOut(_Base):
    def forward(self, x):
        return torch.add(self.lin(x), 1.0, out=self.buf)


class ReturnsTuple(_Base):
    def forward(self, x):
        h = self.lin(x)
        return h, h.sum()


class DropoutByAlias(_Base):
    def forward(self, x):
        return torch.dropout(x=self.lin(x), p=0.3, train=True)


class UserInPlacePositional(_Base):
    def forward(self, x):
        return clamp_act(self.lin(x), True)


class InPlaceModule(_Base):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.lin(x))


class RandomModule(_Base):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.act = layer

    def forward(self, x):
        return self.act(self.lin(x))


def _parametrized() -> nn.Module:
    class Symmetric(nn.Module):
        def forward(self, w):
            return w + w.t()

    model = nn.Sequential(nn.Linear(4, 4))
    nn.utils.parametrize.register_parametrization(model[0], "weight", Symmetric())
    return model


def _hooked(register: str) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4))
    getattr(model[0], register)(lambda *args: None)
    return model


REFUSED = {
    "out": (WritesOut, r"^add\(\) writes into out=$"),
    "tuple_output": (ReturnsTuple, r"^its forward must return one tensor \(the logits\)$"),
    # (torch's numpy-style alias x= binds no stub: refused, whatever the words)
    "dropout_by_alias": (DropoutByAlias, r"^dropout\(\) "),
    "user_function_inplace_positional": (UserInPlacePositional, r"^clamp_act\(\) works in place$"),
    "inplace_module": (InPlaceModule, r"^act \(ReLU\) works in place \(inplace=True\)$"),
    "rrelu_module": (
        lambda: RandomModule(nn.RReLU()),
        r"^act \(RReLU\) is random and not dropout$",
    ),
    "alpha_dropout_module": (
        lambda: RandomModule(nn.AlphaDropout(0.2)),
        r"^act \(AlphaDropout\) is random and not dropout$",
    ),
    "parametrization": (_parametrized, r"^ParametrizedLinear has parametrizations$"),
    "forward_hook": (lambda: _hooked("register_forward_hook"), r"^Linear has forward hooks$"),
    "backward_pre_hook": (
        lambda: _hooked("register_full_backward_pre_hook"),
        r"^Linear has backward pre hooks$",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_students_the_tape_cannot_serve_are_refused_with_the_reason(case):
    """Building a tape for a student it cannot serve raises TapeUnsupportedError with the reason
    the step reports (its fallback reason, or the ConfigError under ``jvp="tape"``): writes into
    ``out=``, a forward that returns more than the logits, a dropout call whose arguments bind
    no stub (the mask could not be recorded), an in-place flag given positionally to a user
    function fx keeps as a call or set on a module, random modules other than dropout,
    parametrizations, and hooks (fx runs no hook of an inner module)."""
    make, why = REFUSED[case]
    model = make().to(DT)
    with pytest.raises(TapeUnsupportedError, match=why):
        TangentTape(model, model.parameters())


class DropoutWithParameter(nn.Module):
    """A Dropout module that holds a parameter (its forward ignores it), on the input."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.drop.temperature = nn.Parameter(torch.ones(()))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(x))


def test_a_dropout_whose_input_has_no_tangent_is_not_recorded_and_a_redraw_is_refused():
    """A dropout node is recorded (its mask kept) only where its input carries a tangent; one
    that is on the tangent's path only through a parameter of its own is left as a plain call and
    goes generic. In eval mode it draws nothing and J is forward AD's; in train mode the generic
    rule would draw a new mask, and the tangent pass refuses (the step falls back to forward AD)
    with the RNG stream left as it was."""
    model = _model(DropoutWithParameter).eval()
    tape, _, j_tape, j_ref = tape_and_forward_ad(model, _x(5, 4))
    assert tape.describe()["generic_ops"] == ["drop (Dropout)"] and not tape._dropouts
    assert_tape_is_forward_ad(j_tape, j_ref)

    model.train()
    tape = TangentTape(model, model.parameters())
    assert not tape._dropouts
    record = tape.record(_x(5, 4))
    tangents = {id(p): torch.ones_like(p) for p in model.parameters()}
    before = torch.get_rng_state()
    with (
        torch.no_grad(),
        pytest.raises(
            TapeUnsupportedError, match=r"draws random numbers \(one of: drop \(Dropout\)\)"
        ),
    ):
        tape.tangent(record, {}, tangents)
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------- the graph's key


@dataclass
class Scale:
    """A callable config object: a dataclass (``eq=True``) is unhashable."""

    k: float

    def __call__(self, h: Tensor) -> Tensor:
        return h * self.k


class HoldsCallable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = Scale(2.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale(self.lin(x))


def _held_entry(model: nn.Module, name: str) -> tuple:
    key, why = module_signature(model)
    assert why is None and key is not None
    (entry,) = [e for e in key[0][2] if e[0] == name]  # the root module's held values
    return entry


def test_an_unhashable_callable_is_keyed_by_identity_and_its_scalars():
    """fx bakes a held callable into the graph (here ``h * 2.0``). An unhashable one (a
    dataclass) cannot be a key itself: the key holds its id, with its own scalars. Replacing it by
    an equal object, or changing its scalar in place, gives another key (a new graph); the tape
    itself serves it (J is forward AD's)."""
    model = _model(HoldsCallable)
    with pytest.raises(TypeError):
        hash(model.scale)
    entry = _held_entry(model, "scale")
    assert entry == ("scale", id(model.scale), (("k", 2.0),))
    key = module_signature(model)[0]
    old = model.scale
    model.scale = Scale(2.0)  # equal, but another object (the old one still alive)
    assert old == model.scale and module_signature(model)[0] != key
    key = module_signature(model)[0]
    model.scale.k = 3.0
    assert module_signature(model)[0] != key
    _, _, j_tape, j_ref = tape_and_forward_ad(model, _x(5, 4))
    assert_tape_is_forward_ad(j_tape, j_ref)


class Scaler:
    """A plain object whose method a module holds as its activation."""

    def __init__(self, k: float):
        self.k = k

    def apply(self, h: Tensor) -> Tensor:
        return h * self.k


class HoldsBoundMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.act = Scaler(2.0).apply

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.lin(x))


def test_a_held_bound_methods_object_state_is_in_the_key():
    """fx bakes what a held bound method reads of its object (``h * self.k``) into the graph, as
    it bakes a callable object's own scalars. The key held the method alone (equal while its
    object is the same), so a schedule changing ``k`` kept the old graph: its logits were the old
    k's. The key must change with ``k``, and a tape traced after the change computes the module's
    logits."""
    model = _model(HoldsBoundMethod)
    x = _x(5, 4)
    key = module_signature(model)[0]
    stale = TangentTape(model, model.parameters())
    model.act.__self__.k = 3.0
    assert module_signature(model)[0] != key
    with torch.no_grad():
        assert rel_err(stale.record(x).logits, model(x)) > 0.1  # what reusing the old graph gave
        fresh = TangentTape(model, model.parameters())
        assert rel_err(fresh.record(x).logits, model(x)) == 0.0
