"""Supervised baselines of Table 1: plain, label smoothing, RandAugment (strong labeled view)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metapl.losses import batch_mean, hard_cross_entropy, upcast
from metapl.methods.base import Batch, StatelessStep, autocast, optimize, pick_view


class SupervisedMethod(StatelessStep):
    """CE on the labeled batch; ``labeled_view="labeled_strong"`` makes it the RandAugment row."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        label_smoothing: float = 0.0,
        labeled_view: str = "labeled_weak",
        autocast_dtype: torch.dtype | None = None,
        grad_sync=None,
        max_grad_norm: float | None = None,
    ):
        self.models = {"student": model}
        self.optimizers = {"student": optimizer}
        self.label_smoothing = label_smoothing
        self.labeled_view = labeled_view
        self.views = () if labeled_view == "labeled_weak" else (labeled_view,)
        self.autocast_dtype = autocast_dtype
        self.grad_sync = grad_sync  # data parallelism: averages gradients across processes
        self.max_grad_norm = max_grad_norm  # clip_grad_norm_ before the step (None: off)

    def step(self, batch: Batch) -> dict[str, Tensor]:
        model, opt = self.models["student"], self.optimizers["student"]
        x = pick_view(batch, self.labeled_view)
        with autocast(x.device, self.autocast_dtype):
            logits = model(x)
        loss = batch_mean(hard_cross_entropy(upcast(logits), batch.y_labeled, self.label_smoothing))
        optimize(loss, model, opt, self.grad_sync, self.max_grad_norm)
        return {"student_loss": loss.detach()}
