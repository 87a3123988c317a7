"""UDA (Xie et al., 2019): consistency between a weak and a strong view of unlabeled images."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metapl.errors import ConfigError, DataError
from metapl.losses import batch_mean, hard_cross_entropy, upcast
from metapl.methods.base import Batch, StatelessStep, autocast, optimize, pick_view


@dataclass
class UDALoss:
    """factor(step) * mean_i mask_i * KL(sharpen(p_weak_i) || p_strong_i).

    The target is the weak view's prediction at ``temperature`` (Table 3: 0.8 sharpens on CIFAR-10,
    1.25 softens on SVHN), without gradient; ``mask`` keeps images whose weak-view confidence is at
    least ``threshold``; the factor ramps linearly over ``warmup_steps``.
    """

    factor: float = 1.0
    temperature: float = 0.8
    threshold: float = 0.8
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        # (TrainConfig checks its uda_* keys; built by hand, a temperature of 0 gave a NaN loss
        # and a threshold above 1 masked every example, without a word)
        if not 0.0 <= self.factor < math.inf:
            raise ConfigError(f"UDALoss factor must be a finite number >= 0, got {self.factor}")
        if not 0.0 < self.temperature < math.inf:
            raise ConfigError(
                f"UDALoss temperature must be a finite number > 0, got {self.temperature}"
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"UDALoss threshold must be in [0, 1], got {self.threshold}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
            raise ConfigError(f"UDALoss warmup_steps must be an integer, got {self.warmup_steps!r}")

    def weight(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.factor
        return self.factor * min(1.0, (step + 1) / self.warmup_steps)

    def __call__(self, logits_weak: Tensor, logits_strong: Tensor, step: int) -> Tensor:
        if logits_weak.shape != logits_strong.shape:  # torch's broadcasting error, before
            raise DataError(
                f"UDA pairs the weak and the strong view example by example, but their logits "
                f"have shapes {tuple(logits_weak.shape)} and {tuple(logits_strong.shape)}: give "
                "both views the same examples"
            )
        with torch.no_grad():
            weak = upcast(logits_weak)
            mask = (F.softmax(weak, -1).amax(-1) >= self.threshold).to(weak.dtype)
            target = F.softmax(weak / self.temperature, -1)
        log_p = F.log_softmax(upcast(logits_strong), -1)
        kl = (target * (torch.log(target.clamp_min(1e-12)) - log_p)).sum(-1)
        return self.weight(step) * batch_mean(kl * mask)


class UDAMethod(StatelessStep):
    """One model: supervised CE on the labeled batch + UDA consistency, in one forward pass."""

    views = ("unlabeled_weak", "unlabeled_strong")

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        uda: UDALoss,
        *,
        label_smoothing: float = 0.0,
        autocast_dtype: torch.dtype | None = None,
        grad_sync=None,
        max_grad_norm: float | None = None,
    ):
        self.models = {"student": model}
        self.optimizers = {"student": optimizer}
        self.uda = uda
        self.label_smoothing = label_smoothing
        self.autocast_dtype = autocast_dtype
        self.grad_sync = grad_sync  # data parallelism: averages gradients across processes
        self.max_grad_norm = max_grad_norm  # clip_grad_norm_ before the step (None: off)

    def step(self, batch: Batch) -> dict[str, Tensor]:
        model, opt = self.models["student"], self.optimizers["student"]
        parts = [
            batch.x_labeled,
            pick_view(batch, "unlabeled_weak"),
            pick_view(batch, "unlabeled_strong"),
        ]
        with autocast(batch.x_labeled.device, self.autocast_dtype):
            logits = model(torch.cat(parts))
        labeled, weak, strong = torch.split(logits, [len(p) for p in parts])
        supervised = batch_mean(
            hard_cross_entropy(upcast(labeled), batch.y_labeled, self.label_smoothing)
        )
        consistency = self.uda(weak, strong, batch.step)
        loss = supervised + consistency
        optimize(loss, model, opt, self.grad_sync, self.max_grad_norm)
        return {
            "student_loss": loss.detach(),
            "student_supervised": supervised.detach(),
            "uda_consistency": consistency.detach(),
        }
