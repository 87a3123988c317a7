"""The "+MPL" rows of Table 1: the baseline's algorithm trains the teacher, plus the MPL signal;
the student learns the teacher's soft targets on unlabeled images (and, only with
``student_labeled_weight`` > 0, a CE on the labeled batch)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metapl.methods.base import Batch, pick_view
from metapl.methods.uda import UDALoss
from metapl.mpl import MetaPseudoLabels, TeacherLogits


class MPLMethod:
    """Supervised+MPL (weak views), RandAugment+MPL (strong views), UDA+MPL (teacher also gets
    UDA on weak/strong unlabeled views; the student learns the teacher's targets on the strong
    view) and ReducedMPL (the teacher maps the large teacher's distributions; Section 3.2)."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        teacher_optimizer: torch.optim.Optimizer,
        student_optimizer: torch.optim.Optimizer,
        *,
        labeled_view: str = "labeled_weak",
        unlabeled_view: str = "unlabeled_weak",
        uda: UDALoss | None = None,
        teacher_sees_distributions: bool = False,
        **mpl_options,
    ):
        self.models = {"teacher": teacher, "student": student}
        self.optimizers = {"teacher": teacher_optimizer, "student": student_optimizer}
        self.labeled_view, self.unlabeled_view = labeled_view, unlabeled_view
        self.uda = uda
        # ReducedMPL: the teacher reads the large teacher's distributions, not the images.
        self.teacher_sees_distributions = teacher_sees_distributions
        views = {labeled_view, unlabeled_view} | ({"unlabeled_weak"} if uda else set())
        self.views = tuple(sorted(views - {"labeled_weak"}))
        extra = self._uda_teacher_loss if uda is not None else None
        self.mpl = MetaPseudoLabels(
            teacher,
            student,
            teacher_optimizer,
            student_optimizer,
            teacher_extra_loss=extra,
            **mpl_options,
        )

    def _uda_teacher_loss(self, logits: TeacherLogits) -> Tensor:
        # extra[0] is the weak view; the unlabeled (student's) view is the strong one.
        assert self.uda is not None  # the step's extra loss only when there is a UDA term
        return self.uda(logits.extra[0], logits.unlabeled, logits.step)

    def step(self, batch: Batch) -> dict[str, Tensor]:
        extras = (pick_view(batch, "unlabeled_weak"),) if self.uda is not None else ()
        teacher_inputs = {}
        if self.teacher_sees_distributions:
            teacher_inputs = {
                "teacher_x_labeled": batch.t_labeled,
                "teacher_x_unlabeled": batch.t_unlabeled,
            }
        return self.mpl.step(
            pick_view(batch, self.labeled_view),
            batch.y_labeled,
            pick_view(batch, self.unlabeled_view),
            teacher_extra_inputs=extras,
            **teacher_inputs,
        )

    def state_dict(self) -> dict:
        return {"mpl": self.mpl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.mpl.load_state_dict(state["mpl"])
