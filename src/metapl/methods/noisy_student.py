"""NoisyStudent (Xie et al., 2019b), the baseline of Table 2: the student learns the large teacher's
distributions on unlabeled images directly, under noise (dropout, stochastic depth in the model,
RandAugment on its input), together with the labeled data. The only difference from ReducedMPL is
that here the targets do not adapt to the student."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metapl.losses import batch_mean, hard_cross_entropy, soft_cross_entropy, upcast
from metapl.methods.base import Batch, StatelessStep, autocast, optimize, pick_view


class NoisyStudentMethod(StatelessStep):
    views = ("unlabeled_strong",)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        label_smoothing: float = 0.0,
        autocast_dtype: torch.dtype | None = None,
        grad_sync=None,
        max_grad_norm: float | None = None,
    ):
        self.models = {"student": model}
        self.optimizers = {"student": optimizer}
        self.label_smoothing = label_smoothing
        self.autocast_dtype = autocast_dtype
        self.grad_sync = grad_sync  # data parallelism: averages gradients across processes
        self.max_grad_norm = max_grad_norm  # clip_grad_norm_ before the step (None: off)

    def step(self, batch: Batch) -> dict[str, Tensor]:
        model, opt = self.models["student"], self.optimizers["student"]
        parts = [batch.x_labeled, pick_view(batch, "unlabeled_strong")]
        targets = batch.t_unlabeled
        if targets is None:
            raise ValueError(
                "NoisyStudent needs the large teacher's distributions of the unlabeled images "
                "(t_unlabeled), which the batch does not have"
            )
        with autocast(batch.x_labeled.device, self.autocast_dtype):
            logits = model(torch.cat(parts))
        labeled, unlabeled = torch.split(logits, [len(p) for p in parts])
        supervised = batch_mean(
            hard_cross_entropy(upcast(labeled), batch.y_labeled, self.label_smoothing)
        )
        distill = batch_mean(soft_cross_entropy(upcast(unlabeled), targets))
        loss = supervised + distill
        optimize(loss, model, opt, self.grad_sync, self.max_grad_norm)
        return {
            "student_loss": loss.detach(),
            "student_supervised": supervised.detach(),
            "student_distill": distill.detach(),
        }
