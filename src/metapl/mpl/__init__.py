"""The MPL step: exact (one forward-mode JVP), first-order, update-rule factors, the oracle."""

from metapl.mpl.options import ESTIMATORS
from metapl.mpl.reference import double_backward_teacher_gradient
from metapl.mpl.step import MetaPseudoLabels, TeacherLogits
from metapl.mpl.tangent import JVP_MODES, TangentTape
from metapl.mpl.update_rules import SUPPORTED_OPTIMIZERS, reference_update, update_factors

__all__ = [
    "ESTIMATORS",
    "JVP_MODES",
    "MetaPseudoLabels",
    "SUPPORTED_OPTIMIZERS",
    "TangentTape",
    "TeacherLogits",
    "double_backward_teacher_gradient",
    "reference_update",
    "update_factors",
]
