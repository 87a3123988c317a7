"""The MPL step: exact (one forward-mode JVP), first-order, update-rule factors, the oracle."""

from metapl.mpl.reference import double_backward_teacher_gradient
from metapl.mpl.step import ESTIMATORS, MetaPseudoLabels, TeacherLogits
from metapl.mpl.update_rules import SUPPORTED_OPTIMIZERS, reference_update, update_factors

__all__ = [
    "ESTIMATORS",
    "MetaPseudoLabels",
    "SUPPORTED_OPTIMIZERS",
    "TeacherLogits",
    "double_backward_teacher_gradient",
    "reference_update",
    "update_factors",
]
