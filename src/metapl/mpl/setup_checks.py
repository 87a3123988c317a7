"""What the teacher, the student and their two optimizers must be to make MPL steps.

:func:`check_models_and_optimizers` runs when :class:`metapl.mpl.MetaPseudoLabels` is built: an
update rule the exact estimators know, two sets of weights, each optimizer over its own model's
parameters, a ``step()`` without a closure. The parameter checks (:func:`check_owned`,
:func:`check_unshared`) run again when the student's optimizer gains parameters
(``add_param_group``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metapl.errors import ConfigError
from metapl.mpl.update_rules import optimizer_params, rule_for


def is_real(value: object) -> bool:
    """A real number: a Python or numpy scalar, or a one-element real tensor; not a bool
    (``temperature=True`` ran as 1, and a flag in a weight's place is a mistake)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_temperature(temperature: float) -> None:
    """The targets' temperature, for the step and its double-backward oracle alike: a finite
    number > 0 (inf gives uniform targets, whatever the teacher says)."""
    if not (is_real(temperature) and 0 < temperature < math.inf):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_grad_sync(grad_sync: object, estimator: str) -> None:
    """``grad_sync`` is None or has what the step calls: ``mean_(tensors)`` and an integer
    ``world_size`` (a wrong object failed inside the first step, as an AttributeError)."""
    if grad_sync is None:
        return
    if estimator == "double_backward":
        raise ConfigError(
            "estimator='double_backward' runs in one process only (an all-reduce is not "
            "differentiable); use estimator='exact', which gives the same gradient"
        )
    world_size = getattr(grad_sync, "world_size", None)
    if not callable(getattr(grad_sync, "mean_", None)) or not (
        isinstance(world_size, int) and not isinstance(world_size, bool) and world_size >= 1
    ):
        raise ConfigError(
            "grad_sync must have a method mean_(tensors), averaging them in place across "
            "processes, and an integer world_size >= 1 (metapl.distributed.GradientAverager); "
            f"got {type(grad_sync).__name__}"
        )


def check_models_and_optimizers(
    teacher: nn.Module,
    student: nn.Module,
    teacher_optimizer: torch.optim.Optimizer,
    student_optimizer: torch.optim.Optimizer,
    estimator: str,
    grad_sync: object,
) -> None:
    """At construction, in this order: a student optimizer whose update rule the exact estimators
    know, one process for double backward, two models with their own trained parameters, each
    optimizer over its own model, and plain ``step()`` calls."""
    for name, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, nn.Module):  # an AttributeError from deep inside, before
            raise ConfigError(f"the {name} must be an nn.Module, got {type(model).__name__}")
    for name, optimizer in (
        ("teacher_optimizer", teacher_optimizer),
        ("student_optimizer", student_optimizer),
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"{name} must be a torch.optim.Optimizer over the {name.split('_')[0]}'s "
                f"parameters, got {type(optimizer).__name__}"
            )
    if estimator in ("exact", "double_backward"):
        rule_for(student_optimizer)  # fail now, not at the first step
    if teacher is student:
        raise ConfigError("teacher and student must be two modules (two sets of weights)")
    wrapper = functional_call_refusal(student)
    if wrapper is not None:
        raise ConfigError(
            f"the student is {wrapper}, which torch.func.functional_call refuses: every "
            "estimator runs passes of the student through it (on copies of its buffers, at "
            f"theta_{{t+1}}); {STATELESS_HELP[wrapper]}"
        )
    check_unshared(teacher, student, (teacher_optimizer, student_optimizer))
    for name, model, optimizer in (
        ("student", student, student_optimizer),
        ("teacher", teacher, teacher_optimizer),
    ):
        check_owned(name, model, [p for _, p in optimizer_params(optimizer)])
    if estimator == "first_order" and needs_closure(student_optimizer):
        raise ConfigError(
            f"{type(student_optimizer).__name__}.step() needs a closure (it re-evaluates the "
            "loss); MPL takes one plain step of the student's optimizer: use SGD, Adam, ..."
        )
    if needs_closure(teacher_optimizer):  # its step() failed after the student's
        raise ConfigError(
            f"teacher_optimizer: {type(teacher_optimizer).__name__}.step() needs a closure (it "
            "re-evaluates the loss); MPL takes one plain step of the teacher's optimizer"
        )


# What to do instead, per wrapper functional_call refuses (for the student's error message).
STATELESS_HELP = {
    "an nn.DataParallel": "pass the module it wraps (student.module), or see docs/multi-gpu.md "
    "for data parallelism (grad_sync)",
    "a torch.jit.ScriptModule": "pass the module unscripted (a scripted submodule is fine)",
}


def functional_call_refusal(student: nn.Module) -> str | None:
    """What the student is if torch's ``functional_call`` refuses it at its root, or None. The
    first step failed with torch's RuntimeError ("The stateless API can't be used with
    nn.DataParallel module", "... with Jitted modules"), with every estimator; torch checks the
    root module only, so such a submodule is fine."""
    if isinstance(student, nn.DataParallel):
        return "an nn.DataParallel"
    if isinstance(student, torch.jit.ScriptModule):
        return "a torch.jit.ScriptModule"
    return None


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """LBFGS and the like: ``step(closure)`` re-evaluates the loss, which one MPL step cannot."""
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


def check_unshared(
    teacher: nn.Module, student: nn.Module, optimizers: Sequence[torch.optim.Optimizer]
) -> None:
    """No parameter of both models may be trained by an optimizer. The student's optimizer would
    move the teacher's weight, or the teacher's would move the student's function: the step's
    gradient sees neither (the double-backward step was 20x off the real objective, the
    teacher's backward failed after the student moved). A frozen parameter (``requires_grad``
    off: no gradient, so no optimizer moves it) may be shared and held: a frozen backbone of
    both, with each optimizer made from its model's ``parameters()``. The step checks again when
    a flag changes."""
    shared = {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
    trained = {id(p) for opt in optimizers for _, p in optimizer_params(opt) if p.requires_grad}
    if shared & trained:
        name = next(n for n, p in student.named_parameters() if id(p) in shared & trained)
        raise ConfigError(
            f"the teacher and the student share the parameter {name!r}, which an optimizer "
            "trains: MPL needs two sets of weights; give each model its own copy (a frozen "
            "shared parameter, requires_grad off, is fine)"
        )


def check_listed_once(student: nn.Module, params: list[Tensor]) -> None:
    """Each parameter the student's optimizer updates is listed once. torch takes a parameter
    listed twice in a group with a warning only, and its step() then updates it twice (the
    gradient applied twice, momentum and moments moved twice). The exact estimators and the
    oracle read one update per parameter: the student moved as its optimizer moves it, but the
    teacher's gradient was silently wrong (9x off finite differences along a direction with
    SGD, 46% with Adam)."""
    seen: set[int] = set()
    for p in params:
        if id(p) in seen:
            name = next((n for n, q in student.named_parameters() if q is p), "?")
            raise ConfigError(
                f"student_optimizer lists the parameter {name!r} twice, so its step() updates it "
                "twice, which the exact teacher gradient does not model: list each parameter "
                "once, or use estimator='first_order'"
            )
        seen.add(id(p))


def check_owned(name: str, model: nn.Module, params: list[Tensor]) -> None:
    """``params``, what ``{name}_optimizer`` updates, belong to ``model``."""
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for p in params):
        raise ConfigError(f"{name}_optimizer must optimize the {name}'s own parameters")
