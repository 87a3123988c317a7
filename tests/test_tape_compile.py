"""``MetaPseudoLabels.compile_student_tape``: the exact step's update pass on the tangent tape as
torch.compile code (issue 5's "torch.compile where it holds": the student module of an exact step
cannot be compiled, the tape's graph can).

What must hold: the steps are the eager tape's up to rounding, dropout included (the compiled pass
draws eager PyTorch's random numbers, so J's first-use check against forward AD holds and the tape
is kept); the record pass really runs the compiled code; the teacher's gradient is still the exact
one (double backward's); the modes map to torch.compile's without CUDA graphs. A compile of the
tiny CNN takes seconds, so the runs are few and short.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from metapl.errors import ConfigError, MetaplWarning
from metapl.models.small import DigitsCNN
from metapl.mpl import MetaPseudoLabels
from metapl.mpl import tangent as tangent_module
from metapl.mpl.tangent import TangentTape


def _models():
    torch.manual_seed(0)
    teacher = DigitsCNN(10, width=8, dropout=0.3, in_chans=3)
    student = DigitsCNN(10, width=8, dropout=0.3, in_chans=3)
    return teacher, student


def _step(teacher, student, estimator: str = "exact", compiled: bool = False):
    t, s = copy.deepcopy(teacher), copy.deepcopy(student)
    mpl = MetaPseudoLabels(
        t,
        s,
        torch.optim.SGD(t.parameters(), lr=0.1),
        torch.optim.SGD(s.parameters(), lr=0.1, momentum=0.9, nesterov=True),
        estimator=estimator,
        jvp="tape" if estimator == "exact" else "forward_ad",
    )
    if compiled:
        mpl.compile_student_tape()
    return mpl


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(4, 3, 8, 8, generator=g),
            torch.randint(0, 10, (4,), generator=g),
            torch.randn(12, 3, 8, 8, generator=g),
        )
        for _ in range(n)
    ]


def _weights(mpl: MetaPseudoLabels) -> list[torch.Tensor]:
    """Both models' parameters and buffers (BatchNorm's running statistics, its step count)."""
    return [
        t.detach().clone().double()
        for m in (mpl.teacher, mpl.student)
        for t in [*m.parameters(), *m.buffers()]
    ]


def _counting_records(mpl: MetaPseudoLabels) -> list[int]:
    """Counts the calls of the compiled record pass of ``mpl``'s tape (traced at construction:
    ``jvp="tape"``)."""
    (tape,) = [t for t in mpl._tapes.values() if isinstance(t, TangentTape)]
    assert tape.compiled
    calls: list[int] = []
    real = tape._compiled
    tape._compiled = lambda *a, **k: calls.append(1) or real(*a, **k)
    return calls


def test_a_compiled_tape_steps_as_the_eager_tape_and_double_backward_with_dropout():
    """From the first step on, the update pass runs the compiled code: the first use of a
    compiled tape is checked beside the pass (the module and the eager graph on copies), so that
    a resumed run's first step is the uninterrupted run's (an eager tape's first step is the
    module's own pass)."""
    teacher, student = _models()
    batches = _batches(3)
    runs, records = {}, []
    for name, estimator, compiled in [
        ("eager", "exact", False),
        ("compiled", "exact", True),
        ("double_backward", "double_backward", False),
    ]:
        mpl = _step(teacher, student, estimator, compiled)
        if compiled:
            records = _counting_records(mpl)
        torch.manual_seed(5)  # the same dropout masks for every run
        with warnings.catch_warnings():
            warnings.simplefilter("error", MetaplWarning)  # a fallback to forward AD warns
            for batch in batches:
                mpl.step(*batch)
                if estimator == "exact":
                    assert mpl.last_jvp_path == "tape", mpl.jvp_fallback_reason
        runs[name] = _weights(mpl)
    assert len(records) == len(batches)
    start = _weights(_step(teacher, student))
    for name in ("compiled", "double_backward"):
        for got, want, first in zip(runs[name], runs["eager"], start):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            # (and the comparison can fail: three steps moved every weight)
            assert float((want - first).abs().max()) > 1e-6


def _replace_compiled(mpl: MetaPseudoLabels, fn) -> TangentTape:
    (tape,) = [t for t in mpl._tapes.values() if isinstance(t, TangentTape)]
    real = tape._compiled
    tape._compiled = lambda *a, **k: fn(real, *a, **k)
    return tape


def _scaled_logits(real, *args, **kwargs):
    logits, saved, metas = real(*args, **kwargs)
    return logits * 3, saved, metas


def _inductor_fails(real, *args, **kwargs):
    raise RuntimeError("BackendCompilerFailed: inductor raised\nmore detail")


@pytest.mark.parametrize(
    "fault, why",
    [
        (_scaled_logits, "its logits differ from the module's (relative error"),
        (_inductor_fails, "it fails (RuntimeError: BackendCompilerFailed: inductor raised)"),
    ],
)
def test_a_compiled_pass_that_fails_or_differs_at_its_first_use_runs_eagerly(fault, why):
    """The compiled code itself is held to the module's logits at its first use (before its
    backward): one that differs, or fails to compile, is set aside with a warning, what its
    forward moved is given back, and the eager graph trains as it would have alone."""
    teacher, student = _models()
    batches = _batches(2)
    runs = {}
    for name in ("eager", "faulty"):
        mpl = _step(teacher, student, compiled=name == "faulty")
        tape = _replace_compiled(mpl, fault) if name == "faulty" else None
        torch.manual_seed(5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MetaplWarning)
            for batch in batches:
                mpl.step(*batch)
                assert mpl.last_jvp_path == "tape", mpl.jvp_fallback_reason
        said = [str(w.message) for w in caught if issubclass(w.category, MetaplWarning)]
        if tape is not None:
            (message,) = said
            assert message.startswith("metapl: the student's compiled update pass is not used: ")
            assert why in message and message.endswith("; it runs eagerly")
            assert not tape.compiled  # the later steps run the eager graph
        else:
            assert said == []
        runs[name] = _weights(mpl)
    for got, want in zip(runs["faulty"], runs["eager"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "mode, options",
    [
        ("default", {"fallback_random": True}),
        # CUDA graphs would overwrite the activations the tape keeps: never in the tape's mode
        ("reduce-overhead", {"fallback_random": True}),
        ("max-autotune", {"max_autotune": True, "fallback_random": True}),
    ],
)
def test_the_tapes_compile_mode_is_torchs_without_cuda_graphs(monkeypatch, mode, options):
    calls: list[dict] = []

    def compile_(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(tangent_module.torch, "compile", compile_)
    teacher, student = _models()
    mpl = _step(teacher, student)
    mpl.compile_student_tape(mode)
    (call,) = calls  # the tape traced at construction (jvp="tape") compiles now
    assert call["dynamic"] is False
    got = call["options"]
    assert {k: got.get(k) for k in options} == options
    assert not got.get("triton.cudagraphs", False)


@pytest.mark.parametrize(
    "estimator, mode, message",
    [
        ("first_order", "default", "estimator 'first_order' has no tangent tape"),
        ("exact", "fast", "mode must be one of default, reduce-overhead, max-autotune"),
        ("forward_ad", "default", "jvp='forward_ad' computes J without the tangent tape"),
    ],
)
def test_compile_student_tape_refuses_what_it_cannot_do(estimator, mode, message):
    teacher, student = _models()
    if estimator == "forward_ad":  # the exact estimator, J by forward AD
        mpl = _step(teacher, student)
        mpl.jvp = "forward_ad"
    else:
        mpl = _step(teacher, student, estimator)
    with pytest.raises(ConfigError, match=message):
        mpl.compile_student_tape(mode)
