"""labeled_cuda_graph: the exact step's labeled pass (v at theta_{t+1}) replayed from a CUDA graph.

On the CPU the graph is a stand-in (:func:`recording_capture`) that replays by running the captured
pass again on the inputs it was captured with: what is tested there is the bookkeeping around it,
which batch reaches the replay, when a pass is captured, when again, and that a step with it is
the step without it. On a GPU the real capture is held to the eager step.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from mpl_helpers import make_problem
from torch import nn

from metapl.errors import ConfigError
from metapl.mpl import step as step_module
from metapl.mpl.inputs import model_input
from metapl.mpl.labeled_graph import (
    MAX_GRAPHS,
    CapturedPass,
    LabeledGraph,
    pass_key,
)
from metapl.mpl.step import MetaPseudoLabels


class _ReplayByRunning:
    """A stand-in for a CUDA graph: a replay runs the captured pass again on the captured inputs
    and writes into the captured outputs, as a graph's kernels would."""

    def __init__(self, run, x, y, result):
        self.run, self.x, self.y, self.result = run, x, y, result
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        loss, v = self.run(self.x, self.y)
        with torch.no_grad():
            self.result[0].copy_(loss)
            for out, g in zip(self.result[1], v):
                if out is not None:
                    out.copy_(g)


def recording_capture(captured: list):
    def capture(run, x_l, y_l, pool):
        inputs = [leaf.clone() for leaf in x_l.leaves]
        labels = y_l.clone()
        own = x_l.with_leaves(inputs, x_l.batch_shape)
        loss, v = run(own, labels)
        result = (loss.detach().clone(), [None if g is None else g.clone() for g in v])
        graph = _ReplayByRunning(run, own, labels, result)
        captured.append(graph)
        return CapturedPass(graph, inputs, labels, result)  # type: ignore[arg-type]

    return capture


def _pass(calls: list):
    def run(x, y):
        calls.append(x.leaves[0].clone())
        w = torch.ones(3, requires_grad=True)
        loss = (x.leaves[0] * w).sum(-1) + y
        return loss.detach(), [torch.autograd.grad(loss.sum(), w)[0]]

    return run


def _batch(value: float, n: int = 2):
    return model_input("x_labeled", torch.full((n, 3), value), 0), torch.zeros(n)


def test_the_first_step_of_a_key_runs_eagerly_the_second_captures_the_later_ones_replay():
    graphs: list = []
    labeled = LabeledGraph(recording_capture(graphs))
    calls: list = []
    run = _pass(calls)
    paths, losses = [], []
    for step in range(4):
        x, y = _batch(float(step))
        loss, v = labeled(run, "key", x, y)
        paths.append(labeled.last_path)
        losses.append(loss.clone())
        # the replay saw this step's batch, not the one it was captured with
        assert torch.equal(v[0], x.leaves[0].sum(0))
    assert paths == ["eager", "graph", "graph", "graph"]
    assert len(graphs) == 1 and graphs[0].replays == 3
    assert [float(loss[0]) for loss in losses] == [0.0, 3.0, 6.0, 9.0]


def test_a_new_key_runs_eagerly_then_is_captured_and_the_old_graph_is_kept():
    graphs: list = []
    labeled = LabeledGraph(recording_capture(graphs))
    run = _pass([])
    for key in ["a", "a", "b", "b", "a"]:
        labeled(run, key, *_batch(1.0))
    assert len(graphs) == 2  # "a" captured once, "b" once; the last "a" replayed
    assert [g.replays for g in graphs] == [2, 1]


def test_a_pass_that_cannot_be_captured_runs_eagerly_with_one_warning():
    tries = []

    def failing(run, x, y, pool):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    labeled = LabeledGraph(failing)
    calls: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            labeled(_pass(calls), "key", *_batch(float(step)))
    assert len(tries) == 1  # not tried again
    assert len(calls) == 4 and labeled.last_path == "eager"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "could not be captured (operation not permitted" in messages[0]
    assert "more" not in messages[0]


def test_no_more_than_max_graphs_are_captured():
    graphs: list = []
    labeled = LabeledGraph(recording_capture(graphs))
    run = _pass([])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for key in range(MAX_GRAPHS + 2):
            labeled(run, key, *_batch(1.0))
            labeled(run, key, *_batch(1.0))
    assert len(graphs) == MAX_GRAPHS
    assert labeled.last_path == "eager"
    assert len(caught) == 1 and f"{MAX_GRAPHS} graphs" in str(caught[0].message)


def _key_parts():
    _, student, x_l, y_l, _ = make_problem("conv")
    params = list(student.parameters())
    x = model_input("x_labeled", x_l, 0)
    return student, params, x, y_l


@pytest.mark.parametrize(
    "change",
    ["batch_shape", "memory_format", "label_dtype", "frozen", "eval", "moved", "autocast"],
)
def test_the_key_changes_with_what_a_graph_baked_in(change):
    student, params, x, y_l = _key_parts()
    before = pass_key(student, params, x, y_l, None)
    assert pass_key(student, params, x, y_l, None) == before  # the same step, the same key
    dtype = None
    if change == "batch_shape":
        x = model_input("x_labeled", torch.cat([x.leaves[0], x.leaves[0]]), 0)
    elif change == "memory_format":
        x = model_input("x_labeled", x.leaves[0].to(memory_format=torch.channels_last), 0)
    elif change == "label_dtype":
        y_l = y_l.int()
    elif change == "frozen":
        params[0].requires_grad_(False)
    elif change == "eval":
        student.drop.eval()
    elif change == "moved":  # a parameter's storage replaced (model.to, .data = ...)
        params[0].data = params[0].data.clone()
    elif change == "autocast":
        dtype = torch.bfloat16
    assert pass_key(student, params, x, y_l, dtype) != before


def _mpl(teacher, student, **options) -> MetaPseudoLabels:
    return MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.05),
        torch.optim.SGD(student.parameters(), lr=0.3, momentum=0.9, nesterov=True),
        **options,
    )


def test_the_steps_with_the_labeled_pass_replayed_are_the_steps_without(monkeypatch):
    """Three exact steps on new batches each, the labeled pass replayed by the stand-in from the
    second on: the same models as three eager steps (a replay that read the captured batch, or
    the buffers' values at the capture, would differ)."""
    teacher, student, x_l, y_l, x_u = make_problem("conv")
    for m in (teacher, student):  # the stand-in's replay draws its own dropout masks
        m.drop.p = 0.0
    graphs: list = []
    monkeypatch.setattr(step_module, "check_cuda_student", lambda student: None)
    steps = {
        "eager": _mpl(copy.deepcopy(teacher), copy.deepcopy(student)),
        "graph": _mpl(copy.deepcopy(teacher), copy.deepcopy(student), labeled_cuda_graph=True),
    }
    steps["graph"]._labeled_graph = LabeledGraph(recording_capture(graphs))
    paths = []
    for i in range(3):
        xs = (x_l + 0.1 * i, y_l, x_u - 0.2 * i)
        for name in ("eager", "graph"):
            steps[name].step(*xs)
        paths.append(steps["graph"].last_labeled_path)
    assert paths == ["eager", "graph", "graph"] and len(graphs) == 1
    assert steps["eager"].last_labeled_path is None
    _assert_same_models(steps["eager"], steps["graph"], rtol=1e-12, atol=1e-12)


def test_labeled_cuda_graph_is_refused_with_another_estimator_and_on_a_cpu_student():
    teacher, student, x_l, y_l, x_u = make_problem("conv")
    with pytest.raises(ConfigError, match="labeled_cuda_graph applies to estimator='exact'"):
        _mpl(teacher, student, labeled_cuda_graph=True, estimator="first_order")
    with pytest.raises(ConfigError, match="labeled_cuda_graph must be True or False"):
        _mpl(teacher, student, labeled_cuda_graph="yes")
    if student.conv.weight.is_cuda:
        return
    mpl = _mpl(teacher, student, labeled_cuda_graph=True)
    running = teacher.bn.running_mean.clone()
    with pytest.raises(ConfigError, match="needs the student on a CUDA device"):
        mpl.step(x_l, y_l, x_u)
    assert torch.equal(teacher.bn.running_mean, running)  # refused before the teacher's forward


def _eager_and_graphed(teacher, student, batches) -> tuple[dict, list[str]]:
    """The same exact steps from copies of the models and the same seeds, eagerly and with
    labeled_cuda_graph; the steps (by name) and the graphed run's warnings. The two runs' models
    are compared by :func:`_assert_same_models`."""
    runs = {
        "eager": _mpl(copy.deepcopy(teacher), copy.deepcopy(student)),
        "graph": _mpl(copy.deepcopy(teacher), copy.deepcopy(student), labeled_cuda_graph=True),
    }
    messages: list[str] = []
    for name, mpl in runs.items():
        torch.manual_seed(2)
        torch.cuda.manual_seed(2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for batch in batches:
                mpl.step(*batch)
        if name == "graph":
            messages = [str(w.message) for w in caught if "labeled_cuda_graph" in str(w.message)]
    return runs, messages


def _assert_same_models(a: MetaPseudoLabels, b: MetaPseudoLabels, rtol: float, atol: float):
    for x, y in zip(
        [*a.teacher.state_dict().values(), *a.student.state_dict().values()],
        [*b.teacher.state_dict().values(), *b.student.state_dict().values()],
    ):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def _cuda_batches(n_labeled: int, n_unlabeled: int, shape: tuple, classes: int, steps: int):
    gen = torch.Generator(device="cuda").manual_seed(1)
    return [
        (
            torch.randn(n_labeled, *shape, device="cuda", generator=gen),
            torch.randint(0, classes, (n_labeled,), device="cuda", generator=gen),
            torch.randn(n_unlabeled, *shape, device="cuda", generator=gen),
        )
        for _ in range(steps)
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_on_a_gpu_the_replayed_labeled_pass_gives_the_eager_steps(dropout):
    """The real capture: five exact steps in float32 (TF32 off) with the graph equal the eager
    steps. With dropout the replay draws from the CUDA generator's state at the replay, as the
    eager pass does, so the masks are the same too."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.drop = nn.Dropout(dropout)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))))

    torch.manual_seed(0)
    batches = _cuda_batches(16, 32, (3, 8, 8), 5, steps=5)
    runs, messages = _eager_and_graphed(Net().cuda(), Net().cuda(), batches)
    assert runs["graph"].last_labeled_path == "graph" and not messages
    _assert_same_models(runs["eager"], runs["graph"], rtol=1e-5, atol=1e-6)


def test_the_config_key_is_refused_where_nothing_reads_it_and_reaches_the_step():
    from metapl.methods.build import build_method
    from metapl.train.config import TrainConfig, apply_overrides

    base = {"dataset": "digits", "model": "digits_cnn", "method": "supervised_mpl"}
    key = "mpl_labeled_cuda_graph"
    refusals = {
        "mpl_labeled_cuda_graph applies to mpl_estimator=exact": {"mpl_estimator": "first_order"},
        "mpl_labeled_cuda_graph needs device=cuda": {"device": "cpu"},
        "applies to the \\+MPL methods only": {"method": "supervised"},
    }
    for message, values in refusals.items():
        cfg = apply_overrides(TrainConfig(), {**base, **values, key: True}).validate()
        with pytest.raises(ConfigError, match=message):
            cfg.check_keys_apply([key])
    for flag in (True, False):
        cfg = apply_overrides(TrainConfig(), {**base, key: str(flag).lower()}).validate()
        assert cfg.check_keys_apply([key]).mpl_labeled_cuda_graph is flag
        method = build_method(cfg, 10, torch.device("cpu"))
        assert method.mpl.labeled_cuda_graph is flag


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_on_a_gpu_a_student_that_cannot_be_captured_trains_eagerly_as_without_the_graph():
    """A host sync in the student's forward fails the capture. The steps go on eagerly, dropout
    included: a failed capture left the CUDA generator marked as capturing (torch 2.11), and every
    later dropout failed, unless the step gives the generator a clean state back."""

    class Syncing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 16)
            self.drop = nn.Dropout(0.3)
            self.fc2 = nn.Linear(16, 4)

        def forward(self, x):
            if float(x.abs().max()) > 1e6:  # a host sync: not capturable
                x = x.clamp(-1e6, 1e6)
            return self.fc2(self.drop(torch.relu(self.fc1(x))))

    torch.manual_seed(0)
    batches = _cuda_batches(8, 16, (6,), 4, steps=4)
    runs, messages = _eager_and_graphed(Syncing().cuda(), Syncing().cuda(), batches)
    assert len(messages) == 1 and "could not be captured" in messages[0]
    assert runs["graph"].last_labeled_path == "eager"
    _assert_same_models(runs["eager"], runs["graph"], rtol=1e-5, atol=1e-6)
