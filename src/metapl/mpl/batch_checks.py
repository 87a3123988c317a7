"""The per-step checks of a step's batches and of the logits the models give on them.

Each mistake here used to pass silently or fail only after the student had moved (the teacher's
update then never came). So :meth:`metapl.mpl.MetaPseudoLabels.step` runs them before anything
moves, in this order: the shapes of the labels and batches (:func:`check_shapes`), the teacher's
views of the batches (:func:`teacher_view`), the values, with one host sync for all of them
(:func:`check_values`), and once the teacher's forward has run, its logits (:func:`check_rows`)
and the labels' range against its classes (:func:`check_label_range`). :func:`as_logits`,
:func:`check_rows` and :func:`check_same_classes` check what either model returns wherever it is
called, and :func:`check_learns` that the logits of a training pass can carry a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metapl.errors import ConfigError, DataError
from metapl.mpl.inputs import Input, ModelInput, check_not_inference, model_input


def as_logits(out, who: str) -> Tensor:
    """``out``, a model's output, if it is a tensor (of logits); else a ConfigError."""
    if not isinstance(out, Tensor):
        raise ConfigError(
            f"the {who} must return a tensor of logits [..., num_classes], got a "
            f"{type(out).__name__}; wrap it in an nn.Module whose forward returns "
            f"{_logits_of(out)}"
        )
    if not out.is_floating_point():  # integer logits failed in the teacher's CE after the
        raise ConfigError(  # student had stepped; complex ones in torch's softmax
            f"the {who} must return floating-point logits [..., num_classes], got a tensor of "
            f"{out.dtype}"
        )
    return out


def check_learns(logits: Tensor, who: str) -> None:
    """The ``who``'s logits of a training pass depend on a parameter that takes a gradient.

    A model whose every layer its forward uses is frozen (its trained parameters, if any, unused)
    cannot learn. Without this check its step failed inside torch's backward ("element 0 of
    tensors does not require grad"), for a teacher after the student had already moved."""
    if not logits.requires_grad:
        raise ConfigError(
            f"the {who}'s logits depend on no parameter that requires a gradient (the layers its "
            f"forward uses are frozen, and its trained parameters, if any, are unused), so the "
            f"{who} cannot learn: unfreeze what it should train, or pass a {who} whose forward "
            "uses its trained parameters"
        )


def _logits_of(out) -> str:
    """How to pick the logits out of ``out``, for the error's example: the wrapper it names has
    to fit what the model returns (a tuple has no ['logits'])."""
    if isinstance(out, dict):  # also Hugging Face's ModelOutput, an OrderedDict
        return "model(x)['logits']" if "logits" in out else "the logits from model(x)'s dict"
    if isinstance(out, tuple | list):
        return "model(x)[0] (or whichever element holds the logits)"
    if isinstance(getattr(out, "logits", None), Tensor):
        return "model(x).logits"
    return "the logits from model(x)"


def check_same_classes(student_logits: Tensor, targets: Tensor) -> None:
    """The student's logits on x_u pair with the teacher's targets, row by row and class by
    class."""
    if student_logits.shape[-1] != targets.shape[-1]:
        raise ConfigError(
            f"the teacher has {targets.shape[-1]} classes and the student "
            f"{student_logits.shape[-1]}: both must predict the same classes"
        )
    if student_logits.shape != targets.shape:  # [batch] against [batch, C] broadcast, then failed
        raise ConfigError(
            f"the student's logits on x_unlabeled have shape {tuple(student_logits.shape)}, the "
            f"teacher's {tuple(targets.shape)}: both must give one row of class logits per example"
        )


def check_shapes(x_l: ModelInput, y_l: Tensor, x_u: ModelInput, batch_dim: int) -> None:
    """Shape and dtype mistakes that would otherwise pass silently (no host sync)."""
    if not isinstance(y_l, Tensor):
        raise DataError(f"y_labeled must be a tensor, got {type(y_l).__name__}")
    # any integer dtype (the step takes them as int64); int8 was refused as "not integer"
    if y_l.is_floating_point() or y_l.is_complex() or y_l.dtype == torch.bool:
        raise DataError(f"y_labeled must be integer class indices, got dtype {y_l.dtype}")
    check_not_inference("y_labeled", y_l)
    bd = batch_dim
    if x_l.batch_shape != tuple(y_l.shape):
        raise DataError(
            f"x_labeled's examples {x_l.batch_shape} and y_labeled {tuple(y_l.shape)} "
            "disagree: y_labeled must hold one class index per example (shape "
            f"x_labeled.shape[:{bd + 1}])"
        )
    for what, x in (("x_labeled", x_l), ("x_unlabeled", x_u)):
        if x.size == 0:
            raise DataError(f"{what} has no examples (shape[:{bd + 1}] {x.batch_shape})")


def _device_of(model: nn.Module) -> torch.device | None:
    """The device of all the model's parameters, or None (none, or spread over several)."""
    devices = {p.device for p in model.parameters()}
    return devices.pop() if len(devices) == 1 else None


def check_devices(teacher: nn.Module, student: nn.Module) -> None:
    """The two models on one device: the student learns from the teacher's targets, and torch's
    "Expected all tensors to be on the same device" came from the loss between them. A model
    whose parameters are spread over devices (model parallel) is left to its own forward; the
    batches are checked where the student is tried on them (``check_student_takes``: a student
    may move its input itself)."""
    t_dev, s_dev = _device_of(teacher), _device_of(student)
    if t_dev is not None and s_dev is not None and t_dev != s_dev:
        raise ConfigError(
            f"the teacher is on {t_dev} and the student on {s_dev}: the student learns from the "
            f"teacher's targets, so both must be on one device (teacher.to({str(s_dev)!r}))"
        )


def check_baseline_shape(baseline: Tensor, x_l: ModelInput) -> None:
    """The first-order baseline holds one value per ensemble member of this batch (``()``
    without an ensemble): one loaded from another run's state (:meth:`load_state_dict`) was
    broadcast against the reward, every member's advantage from the wrong baseline, or failed
    after the student had stepped."""
    members = x_l.batch_shape[:-1]
    if tuple(baseline.shape) != members:
        raise ConfigError(
            f"the first-order baseline has shape {tuple(baseline.shape)}, this batch's reward "
            f"{members} (one per ensemble member): was the state_dict loaded from another run? "
            "Load a matching one, or load_state_dict({'step_count': n, 'baseline': None}) to "
            "start the baseline again"
        )


def teacher_view(what: str, teacher_x: Input | None, x: ModelInput, batch_dim: int) -> ModelInput:
    """What the teacher sees of the batch ``x``: ``teacher_x``, or ``x`` itself when None.
    It must hold the same examples as the student's: its logits pair with y_labeled and the
    student's logits example by example (a batch of another size failed inside a loss, for
    teacher_x_labeled after the student had moved)."""
    if teacher_x is None:
        return x
    view = model_input(what, teacher_x, batch_dim)
    if view.batch_shape != x.batch_shape:
        n = batch_dim + 1
        student_what = what.removeprefix("teacher_")
        raise DataError(
            f"{what}'s examples {view.batch_shape} and {student_what}'s {x.batch_shape} "
            f"disagree: the teacher's view must hold the same examples (shape[:{n}] equal)"
        )
    return view


def check_values(y_l: Tensor, batches: Sequence[ModelInput]) -> tuple[int, int]:
    """Finite inputs and non-negative labels, with one host sync for all of it, before the
    teacher's forward (which would put a NaN into its BatchNorm statistics). Only floating
    tensors can hold NaN or Inf (token ids are integers); a batch given twice (the teacher's
    view is the student's batch when not given) is checked once. Returns the labels' range, for
    :func:`check_label_range` once the teacher's logits tell the number of classes."""
    unique = list({id(x): x for x in batches}.values())
    floating = [
        (name, leaf)
        for x in unique
        for name, leaf in zip(x.names, x.leaves)
        if leaf.is_floating_point()
    ]
    found = [y_l.min(), y_l.max(), *(torch.isfinite(t).all().long() for _, t in floating)]
    low, high, *finite = torch.stack([t.to(y_l.device) for t in found]).tolist()
    for (what, _), ok in zip(floating, finite):
        if not ok:
            raise DataError(f"{what} holds NaN or Inf values")
    if low < 0:
        raise DataError(f"y_labeled out of range: found {low}..{high}, class indices start at 0")
    return low, high


def check_finite_for_student_checks(x: ModelInput) -> None:
    """The first exact step compares two of the student's forwards on ``x`` (and its derivatives):
    on NaN or Inf inputs, which ``check_inputs=False`` lets through, the comparison fails and
    blamed the student ("it draws random numbers elsewhere"). One host sync, on that step only."""
    for name, leaf in zip(x.names, x.leaves):
        if leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            raise DataError(
                f"{name} holds NaN or Inf values: the first exact step checks the student on "
                "it, which needs finite values (check_inputs=False does not skip that check)"
            )


def check_rows(logits: Tensor, x: ModelInput, who: str, what: str, batch_dim: int) -> Tensor:
    """``logits``, the ``who``'s output on ``x``, if it holds one row of class logits per example
    of ``x`` ([..., batch, C]); else a ConfigError naming the expected and the actual shape. A
    model that returns [batch] (a squeezed binary output), [batch, C, 1], [C] or two rows per
    example would have the softmax taken over the wrong dimension, or its joint output split
    wrongly (torch's raw ``split`` error, with the teacher's running statistics moved)."""
    n = batch_dim + 1
    if logits.dim() != n + 1 or tuple(logits.shape[:n]) != x.batch_shape:
        raise ConfigError(
            f"the {who}'s logits on {what} have shape {tuple(logits.shape)}; expected "
            f"{x.batch_shape} + (num_classes,): one row of class logits per example, classes in "
            "the last dimension"
        )
    return logits


def check_label_range(low: int, high: int, num_classes: int) -> None:
    """The labels' range from :func:`check_values` against the teacher's classes (known once its
    forward has run: the step gives back what that forward moved, see
    :class:`metapl.mpl.replay.RestorePoint`)."""
    if high >= num_classes:
        raise DataError(
            f"y_labeled out of range: found {low}..{high}, the model has {num_classes} classes "
            f"(expected 0..{num_classes - 1})"
        )
