"""The options of :class:`~metapl.mpl.step.MetaPseudoLabels` and their checks.

Checked at construction and again at a step after one was set on the object (``mpl.temperature =
0`` gave NaN parameters, ``mpl.estimator = "exakt"`` ran the first-order step, silently): the step
compares each attribute named in :data:`OPTIONS` with the value it last checked.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metapl.errors import ConfigError
from metapl.mpl.clipping import check_max_norm
from metapl.mpl.setup_checks import check_grad_sync, check_temperature, is_real
from metapl.mpl.tangent import JVP_MODES

ESTIMATORS = ("exact", "first_order", "double_backward")

# The options :func:`check_options` checks, in its order (each an attribute of the object).
OPTIONS = (
    "estimator",
    "jvp",
    "temperature",
    "supervised_weight",
    "label_smoothing",
    "mpl_weight",
    "student_labeled_weight",
    "baseline_decay",
    "check_inputs",
    "allow_tf32",
    "allow_student_hooks",
    "teacher_extra_loss",
    "grad_sync",
    "autocast_dtype",
    "batch_dim",
    "student_max_grad_norm",
    "teacher_max_grad_norm",
    "labeled_cuda_graph",
)


def check_options(teacher: nn.Module, student: nn.Module, options: dict) -> None:
    """The options of :class:`MetaPseudoLabels` (by keyword, as its constructor takes them), at
    construction and again at a step after one was set on the object: ``mpl.temperature = 0``
    gave NaN parameters, ``mpl.estimator = "exakt"`` ran the first-order step, silently."""
    (
        estimator,
        jvp,
        temperature,
        supervised_weight,
        label_smoothing,
        mpl_weight,
        student_labeled_weight,
        baseline_decay,
        check_inputs,
        allow_tf32,
        allow_student_hooks,
        teacher_extra_loss,
        grad_sync,
        autocast_dtype,
        batch_dim,
        student_max_grad_norm,
        teacher_max_grad_norm,
        labeled_cuda_graph,
    ) = (options[name] for name in OPTIONS)
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    check_jvp(jvp, estimator)
    # not a number (a string from a config file, None): the comparisons below raised
    # Python's "'<' not supported between instances of 'int' and 'str'"
    given = {
        "temperature": temperature,
        "supervised_weight": supervised_weight,
        "label_smoothing": label_smoothing,
        "mpl_weight": mpl_weight,
        "student_labeled_weight": student_labeled_weight,
    }
    if baseline_decay is not None:
        given["baseline_decay"] = baseline_decay
    for name, value in given.items():
        if not is_real(value):
            raise ConfigError(f"{name} must be a number, got {value!r}")
    flags = {
        "check_inputs": check_inputs,
        "allow_tf32": allow_tf32,
        "allow_student_hooks": allow_student_hooks,
        "labeled_cuda_graph": labeled_cuda_graph,
    }
    for name, flag in flags.items():  # allow_student_hooks="false" was true, silently
        if not isinstance(flag, bool):
            raise ConfigError(f"{name} must be True or False, got {flag!r}")
    check_temperature(temperature)
    if labeled_cuda_graph and estimator != "exact":  # read by nothing else
        raise ConfigError(
            f"labeled_cuda_graph applies to estimator='exact' only (its labeled pass at "
            f"theta_{{t+1}}); estimator {estimator!r} has none to capture: leave it False"
        )
    if baseline_decay is not None and not 0.0 <= baseline_decay < 1.0:
        raise ConfigError(f"baseline_decay must be in [0, 1) or None, got {baseline_decay}")
    if baseline_decay is not None and estimator != "first_order":  # read by nothing else
        raise ConfigError(
            f"baseline_decay applies to estimator='first_order' only; estimator {estimator!r} "
            "has no baseline: leave it None"
        )
    if teacher_extra_loss is not None and not callable(teacher_extra_loss):
        # failed at the first step as "'int' object is not callable"
        raise ConfigError(
            "teacher_extra_loss must be a function of the teacher's logits (TeacherLogits) "
            f"returning a scalar tensor, or None; got {type(teacher_extra_loss).__name__}"
        )
    check_grad_sync(grad_sync, estimator)
    # A NaN or Inf weight gave a NaN teacher loss at the first step; a negative one trains the
    # teacher away from its labels or from what helps the student, without a word.
    weights = {
        "supervised_weight": supervised_weight,
        "mpl_weight": mpl_weight,
        "student_labeled_weight": student_labeled_weight,
    }
    for name, weight in weights.items():
        if not 0.0 <= weight < math.inf:
            raise ConfigError(f"{name} must be a finite number >= 0, got {weight}")
    if autocast_dtype not in (None, torch.bfloat16, torch.float16):
        raise ConfigError(
            f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype!r}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    # -1 (numpy's "last axis") made every batch "disagree" with its labels' shape ()
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
        raise ConfigError(
            f"batch_dim must be an integer >= 0 (the dimension of the examples; the ones "
            f"before it index ensemble members), got {batch_dim!r}"
        )
    check_max_norm("student_max_grad_norm", student_max_grad_norm, student, batch_dim)
    check_max_norm("teacher_max_grad_norm", teacher_max_grad_norm, teacher, batch_dim)


def check_jvp(jvp: object, estimator: str) -> None:
    """``jvp`` is one of :data:`JVP_MODES`, and the default with another estimator than the
    exact one (which alone reads it); else a ConfigError."""
    if jvp not in JVP_MODES:
        raise ConfigError(f"jvp must be one of {JVP_MODES}, got {jvp!r}")
    if jvp != "forward_ad" and estimator != "exact":  # read by nothing else
        raise ConfigError(
            f"jvp applies to estimator='exact' only; estimator {estimator!r} computes no "
            "JVP: leave jvp at its default"
        )
