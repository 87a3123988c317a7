"""Checks and save points of the MPL step where hand-made mutants survived the rest of the suite
(:mod:`metapl.mpl.batch_checks`, :mod:`metapl.mpl.replay`, :mod:`metapl.mpl.setup_checks`, and
:mod:`metapl.distributed`'s averager); each item is what a surviving mutant broke unseen:

- :func:`~metapl.mpl.batch_checks.check_shapes` refuses complex and boolean labels, not only
  floating ones (a bool tensor silently trained on classes 0 and 1);
- :func:`~metapl.mpl.batch_checks.teacher_view` compares every batch dimension, the members'
  with ``batch_dim=1`` included, not only the first;
- :func:`~metapl.mpl.batch_checks.check_finite_for_student_checks` names Inf inputs as it names
  NaN ones;
- the labels' out-of-range error reports their whole range, lowest label included;
- :func:`~metapl.mpl.replay.restore_buffers` leaves alone a buffer that the forward replaced
  with one of another shape, so that the step's own refusal comes out (not torch's copy error);
- :func:`~metapl.mpl.setup_checks.is_real` takes a tensor of one real element only, and the
  oracle's :func:`~metapl.mpl.setup_checks.check_temperature` a number only (both gave torch's
  or Python's raw error);
- :func:`~metapl.mpl.setup_checks.check_grad_sync` wants a callable ``mean_`` and an integer
  ``world_size`` of at least 1, a bool not being one;
- :func:`~metapl.mpl.setup_checks.check_unshared` names the shared parameter an optimizer
  trains, not a frozen one the models also share; a wrong optimizer's error names the model it
  should be over;
- :func:`~metapl.mpl.setup_checks.needs_closure` refuses a ``step(closure)`` without a default
  only: an optimizer whose ``step()`` takes no closure at all is a plain step;
- :class:`metapl.distributed.GradientAverager` says that it needs a process group (torch's own
  error from ``get_world_size`` did not), and averages over the group it is given;
- :class:`metapl.distributed.DataParallel`'s rank 1 is not the main rank, its ``wait_for_main``
  is a barrier on a group without the default timeout, its ``mean_metrics`` of no metrics is
  no metrics (no all-reduce of an empty stack), and
  :func:`metapl.distributed.torchrun_process_group` waits for the peers (a barrier) on a normal
  exit, not after an error;
- :func:`~metapl.mpl.replay.tf32_disabled` gives each of torch's two TF32 flags back its own
  value (torch's defaults differ: matmul off, cuDNN on).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from mpl_helpers import MLP, make_problem
from torch import Tensor, nn

from metapl import MetaPseudoLabels
from metapl.distributed import DataParallel, GradientAverager, torchrun_process_group
from metapl.errors import ConfigError, DataError
from metapl.mpl import double_backward_teacher_gradient
from metapl.mpl.replay import tf32_disabled

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64


def _mpl(teacher: nn.Module, student: nn.Module, **kwargs) -> MetaPseudoLabels:
    return MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.1),
        **kwargs,
    )


def _linear_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Linear(4, 3).double(), nn.Linear(4, 3).double()


def _batches(n_l: int = 6, n_u: int = 8, lead: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(1)
    x_l = torch.randn(*lead, n_l, 4, generator=g, dtype=DT)
    y_l = torch.randint(0, 3, (*lead, n_l), generator=g)
    x_u = torch.randn(*lead, n_u, 4, generator=g, dtype=DT)
    return x_l, y_l, x_u


def _weights(*models: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for m in models for p in m.parameters()]


@pytest.mark.parametrize(
    "labels",
    [lambda y: y.to(torch.complex64), lambda y: y > 0],
    ids=["complex", "bool"],
)
def test_complex_or_boolean_labels_are_refused_as_not_class_indices(labels):
    """Complex labels failed in torch's ``min`` with a raw RuntimeError, and boolean ones trained
    silently on classes 0 and 1 if the check tested floating dtypes only."""
    teacher, student = _linear_pair()
    x_l, y_l, x_u = _batches()
    mpl = _mpl(teacher, student)
    before = _weights(teacher, student)
    with pytest.raises(DataError, match="y_labeled must be integer class indices"):
        mpl.step(x_l, labels(y_l), x_u)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(teacher, student)))


@pytest.mark.parametrize("what", ["teacher_x_labeled", "teacher_x_unlabeled"])
def test_a_teacher_view_with_other_examples_per_member_is_refused_with_batch_dim_1(what):
    """With ``batch_dim=1`` an example is indexed by [member, row]: a teacher's view of as many
    members but one row more must be refused like one of another batch size (comparing the
    first dimension alone let it through, to a raw error in a loss or a ConfigError blaming the
    student's logits)."""
    teacher, student = _linear_pair()  # nn.Linear maps [E, N, 4] to [E, N, 3]
    x_l, y_l, x_u = _batches(lead=(2,))
    x = x_l if what == "teacher_x_labeled" else x_u
    view = torch.cat([x, x[:, :1]], dim=1)  # [2, N + 1, 4]
    mpl = _mpl(teacher, student, batch_dim=1)
    with pytest.raises(DataError, match=f"^{what}'s examples \\(2, {x.shape[1] + 1}\\) and"):
        mpl.step(x_l, y_l, x_u, **{what: view})


def test_labels_beyond_the_classes_are_reported_with_their_whole_range():
    """The message gives the lowest label as well as the highest (the range check_values
    found), so that a user sees e.g. 1-based labels at a glance."""
    teacher, student = _linear_pair()
    x_l, y_l, x_u = _batches()
    y_l = torch.tensor([1, 2, 3, 3, 2, 1])  # 1-based: 1..3 for 3 classes
    with pytest.raises(
        DataError, match=r"found 1\.\.3, the model has 3 classes \(expected 0\.\.2\)"
    ):
        _mpl(teacher, student).step(x_l, y_l, x_u)


def test_an_inf_batch_on_the_first_exact_step_without_value_checks_is_named_as_such():
    """As a NaN (tests/test_step_api.py): with check_inputs=False an Inf in x_unlabeled reached the
    first exact step's comparison of two student forwards, which blamed the student ("draws
    random numbers elsewhere"), if the check looked for NaN alone."""
    teacher, student, x_l, y_l, x_u = make_problem("mlp")
    inf_u = x_u.clone()
    inf_u[0, 0] = math.inf
    mpl = _mpl(teacher, student, check_inputs=False)
    before = _weights(teacher, student)
    with pytest.raises(DataError, match="x_unlabeled holds NaN or Inf values: the first exact"):
        mpl.step(x_l, y_l, inf_u)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(teacher, student)))


class _ReplacesBuffer(nn.Module):
    """A teacher whose forward replaces its buffer with one of another shape (a cache that
    grows): the saved copy no longer fits it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("cache", torch.zeros(2))

    def forward(self, x: Tensor) -> Tensor:
        self.cache = torch.ones(self.cache.numel() + 1)
        return self.fc(x)


def test_a_refused_step_leaves_a_buffer_the_forward_replaced_with_another_shape():
    """The step's refusal (labels beyond the teacher's classes, known after its forward) gives
    back the buffers it saved, but one the forward replaced with a buffer of another shape
    cannot take the old copy: it is left as the forward set it, and the refusal comes out
    (copying the old one into it raised torch's size-mismatch error instead, or broadcast it)."""
    torch.manual_seed(0)
    teacher, student = _ReplacesBuffer().double(), nn.Linear(4, 3).double()
    x_l, y_l, x_u = _batches()
    y_l[0] = 5
    with pytest.raises(DataError, match=r"y_labeled out of range: found 0\.\.5"):
        _mpl(teacher, student).step(x_l, y_l, x_u)
    assert torch.equal(teacher.cache, torch.ones(3, dtype=teacher.cache.dtype))


@pytest.mark.parametrize("matmul, cudnn", [(False, True), (True, False)], ids=str)
def test_tf32_disabled_gives_each_flag_back_its_own_value(matmul, cudnn):
    """torch's defaults differ (matmul TF32 off, cuDNN TF32 on): restoring them swapped after an
    exact step would turn TF32 matmuls on for the rest of the program and cuDNN's off. Only flips
    flags, so it runs without a GPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        with tf32_disabled(torch.device("cuda")):
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 == matmul
        assert torch.backends.cudnn.allow_tf32 == cudnn
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


NUMBERS = ["temperature", "supervised_weight", "label_smoothing", "mpl_weight"]


@pytest.mark.parametrize("name", NUMBERS + ["student_labeled_weight"])
@pytest.mark.parametrize(
    "value",
    [
        lambda: torch.tensor([0.5, 0.5]),
        lambda: torch.tensor(0.5 + 0j),
        lambda: torch.tensor(True),
    ],
    ids=["two elements", "complex", "bool"],
)
def test_a_tensor_that_is_not_one_real_number_is_not_a_number(name, value):
    """A one-element real tensor is a number (a learning-rate schedule's output, say); two
    elements, or a complex one, are not: they failed in a comparison with torch's "Boolean value
    of Tensor with more than one value is ambiguous" or "not supported for complex", or passed
    to the teacher's loss."""
    teacher, student = _linear_pair()
    with pytest.raises(ConfigError, match=f"^{name} must be a number, got tensor"):
        _mpl(teacher, student, **{name: value()})


@pytest.mark.parametrize("name", NUMBERS + ["student_labeled_weight"])
def test_a_bool_is_not_a_number(name):
    """``temperature=True`` ran as temperature 1 (bool is an int in Python), without a word."""
    teacher, student = _linear_pair()
    with pytest.raises(ConfigError, match=f"^{name} must be a number, got True"):
        _mpl(teacher, student, **{name: True})


def test_a_one_element_tensor_is_a_number():
    """Taken as its value: the step moves both models as the same floats do."""
    after = []
    given = (torch.tensor([0.7]), torch.tensor(0.5))  # (float32: 0.7 is 0.69999998807...)
    for temperature, weight in (given, (given[0].item(), given[1].item())):
        teacher, student = _linear_pair()
        metrics = _mpl(teacher, student, temperature=temperature, mpl_weight=weight).step(
            *_batches()
        )
        after.append((_weights(teacher, student), metrics["teacher_loss"]))
    (tensors, loss_t), (floats, loss_f) = after
    assert all(torch.equal(a, b) for a, b in zip(tensors, floats)) and torch.equal(loss_t, loss_f)
    teacher, student = _linear_pair()
    other = _mpl(teacher, student, temperature=1.5, mpl_weight=0.5).step(*_batches())
    assert not torch.equal(other["teacher_loss"], loss_f)  # the temperature does matter here


def test_the_oracle_refuses_a_temperature_that_is_not_a_number():
    """double_backward_teacher_gradient checks its temperature as the step does: a string
    failed in Python's comparison ("'<' not supported between 'int' and 'str'")."""
    teacher, student = _linear_pair()
    x_l, y_l, x_u = _batches()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="temperature must be a finite number > 0, got '2'"):
        double_backward_teacher_gradient(teacher, student, opt, x_l, y_l, x_u, temperature="2")


class _Sync:
    """A grad_sync with the given ``mean_`` and ``world_size``."""

    def __init__(self, mean_, world_size):
        self.mean_, self.world_size = mean_, world_size


@pytest.mark.parametrize(
    "mean_, world_size",
    [("mean", 2), (lambda tensors: None, 0), (lambda tensors: None, True)],
    ids=["mean_ not callable", "world_size 0", "world_size True"],
)
def test_a_grad_sync_without_a_callable_mean_or_a_world_size_of_at_least_1_is_refused(
    mean_, world_size
):
    """A string failed only inside the first step ("'str' object is not callable"), a world size
    0 silently zeroed the first-order step's MPL term (its sum over every process's examples), and
    True passed for the integer 1."""
    teacher, student = _linear_pair()
    with pytest.raises(ConfigError, match="^grad_sync must have a method mean_"):
        _mpl(teacher, student, grad_sync=_Sync(mean_, world_size))


def test_a_grad_sync_with_a_callable_mean_and_world_size_1_is_taken():
    """Taken and used: the step averages its gradients through ``mean_`` and moves the models."""
    teacher, student = _linear_pair()
    before = _weights(teacher, student)
    calls = []
    _mpl(teacher, student, grad_sync=_Sync(calls.append, 1)).step(*_batches())
    assert calls and all(isinstance(t, Tensor) for tensors in calls for t in tensors)
    assert not any(torch.equal(a, b) for a, b in zip(before, _weights(teacher, student)))


class _StepWithoutClosure(torch.optim.SGD):
    """A user's optimizer whose ``step`` takes no closure parameter at all."""

    def step(self):
        return super().step()


@pytest.mark.parametrize("estimator", ["exact", "first_order"])
def test_an_optimizer_whose_step_takes_no_closure_is_a_plain_step(estimator):
    """Only a closure without a default (LBFGS's) makes an optimizer unusable for MPL; taking
    no closure parameter at all must not count as needing one."""
    teacher, student = _linear_pair()
    x_l, y_l, x_u = _batches()
    before = _weights(teacher)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        _StepWithoutClosure(teacher.parameters(), lr=0.1),
        _StepWithoutClosure(student.parameters(), lr=0.1)
        if estimator == "first_order"
        else torch.optim.SGD(student.parameters(), lr=0.1),
        estimator=estimator,
    )
    mpl.step(x_l, y_l, x_u)
    assert not any(torch.equal(a, b) for a, b in zip(before, _weights(teacher)))


def test_a_gradient_averager_without_a_process_group_says_what_it_needs(monkeypatch):
    """Before init_process_group, torch's get_world_size raised its own ValueError about the
    default process group; the averager names the call to make first."""
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # whatever another test left up
    with pytest.raises(RuntimeError, match="needs torch.distributed.init_process_group first"):
        GradientAverager()


def _fake_rank(monkeypatch, rank: int) -> None:
    """A process group of two, faked: DataParallel reads only its rank and size."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)


def test_rank_1_of_2_is_not_the_main_rank(monkeypatch):
    """Rank 0 alone writes files, evaluates and shows progress (``is_main``): a second rank that
    counted as main wrote the same run files at the same time."""
    _fake_rank(monkeypatch, 1)
    dp = DataParallel()
    assert (dp.rank, dp.world_size, dp.enabled, dp.is_main) == (1, 2, True, False)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    assert DataParallel().is_main


def test_torchrun_process_group_waits_for_the_peers_on_a_normal_exit_only(tmp_path, monkeypatch):
    """A rank that tears down its connections while a peer still talks to it can abort the peer
    (seen with gloo), so a normal exit passes a barrier before the group is destroyed; after an
    error it must not (the peers may never get there, and the barrier would hang). The group is
    one process through a file store, as in tests/test_distributed.py."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    real_init, real_barrier = dist.init_process_group, dist.barrier
    barriers: list[bool] = []

    def init_alone(backend):
        real_init(backend, init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)

    def barrier(*args, **kwargs):
        barriers.append(dist.is_initialized())
        return real_barrier(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", init_alone)
    monkeypatch.setattr(dist, "barrier", barrier)
    try:
        with torchrun_process_group(torch.device("cpu")):
            assert barriers == []
        assert barriers == [True] and not dist.is_initialized()
        (tmp_path / "init").unlink(missing_ok=True)
        with pytest.raises(ValueError, match="a failing run"):
            with torchrun_process_group(torch.device("cpu")):
                raise ValueError("a failing run")
        assert barriers == [True] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_waiting_for_rank_0_is_a_barrier_without_the_default_timeout(monkeypatch):
    """The other ranks wait at a barrier while rank 0 does long one-off work (precomputing the
    large teacher's distributions): on a group of its own with a long timeout, made once, and
    used at every wait (without the barrier they went on and read files not written yet)."""
    _fake_rank(monkeypatch, 1)
    made, waited = [], []
    monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or f"group{len(made)}")
    monkeypatch.setattr(dist, "barrier", lambda group=None: waited.append(group))
    dp = DataParallel()
    dp.wait_for_main()
    dp.wait_for_main()
    assert waited == ["group1", "group1"]
    assert len(made) == 1 and made[0]["backend"] == "gloo"
    assert made[0]["timeout"].total_seconds() >= 24 * 3600


def test_the_mean_of_no_metrics_is_no_metrics_without_an_all_reduce(monkeypatch):
    """A step that logs nothing: torch.stack of no values raised on every rank of a multi-process
    run."""
    _fake_rank(monkeypatch, 0)

    def all_reduce(*args, **kwargs):
        raise AssertionError("nothing to reduce")

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert DataParallel().mean_metrics({}) == {}


def test_the_shared_parameter_named_is_the_one_an_optimizer_trains():
    """The models share fc1 (frozen: in neither optimizer, which is fine) and fc2 (trained):
    the error must name fc2's weight, the parameter to fix, not fc1's, which comes first."""
    torch.manual_seed(0)
    teacher, student = MLP(), MLP()
    student.fc1, student.fc2 = teacher.fc1, teacher.fc2
    frozen = {id(p) for p in teacher.fc1.parameters()}
    with pytest.raises(ConfigError, match="share the parameter 'fc2.weight', which an optimizer"):
        MetaPseudoLabels(
            teacher,
            student,
            torch.optim.SGD([p for p in teacher.parameters() if id(p) not in frozen], lr=0.1),
            torch.optim.SGD([p for p in student.parameters() if id(p) not in frozen], lr=0.1),
        )


@pytest.mark.parametrize("who", ["teacher", "student"])
def test_an_optimizer_of_the_wrong_type_is_told_whose_parameters_it_should_be_over(who):
    teacher, student = _linear_pair()
    optimizers = {
        "teacher": torch.optim.SGD(teacher.parameters(), lr=0.1),
        "student": torch.optim.SGD(student.parameters(), lr=0.1),
        who: None,
    }
    with pytest.raises(
        ConfigError,
        match=f"^{who}_optimizer must be a torch.optim.Optimizer over the {who}'s parameters, "
        "got NoneType",
    ):
        MetaPseudoLabels(teacher, student, optimizers["teacher"], optimizers["student"])


def test_a_gradient_averager_over_a_subgroup_averages_over_that_group(monkeypatch):
    """GradientAverager(group) all-reduces in its group and divides by that group's size, not the
    whole world's (4 processes faked here, the group of 2 for the average)."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4 if group is None else 2)
    reduced = []

    def all_reduce(tensor, op=None, group=None):
        reduced.append(group)
        tensor.mul_(2)  # the sum over two processes holding the same values

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    averager = GradientAverager(group="half")
    grads = [torch.tensor([1.0, 3.0]), None, torch.tensor([[5.0]])]
    averager.mean_(grads)
    assert averager.world_size == 2 and reduced == ["half"]
    assert grads[0].tolist() == [1.0, 3.0] and grads[1] is None and grads[2].tolist() == [[5.0]]
