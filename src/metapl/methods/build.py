"""From a :class:`TrainConfig` to a method with its models and optimizers (the only place that
knows how a config row of Table 1 maps to code)."""

from __future__ import annotations

import torch
from torch import nn

from metapl.methods.mpl import MPLMethod
from metapl.methods.noisy_student import NoisyStudentMethod
from metapl.methods.supervised import SupervisedMethod
from metapl.methods.uda import UDALoss, UDAMethod
from metapl.models import create_model, param_groups_for_weight_decay
from metapl.train.config import TrainConfig


def _model(cfg: TrainConfig, num_classes: int, dropout: float, device: torch.device) -> nn.Module:
    model = create_model(cfg.model, num_classes, dropout=dropout).to(device)
    if cfg.channels_last(device):
        # Module.to takes memory_format; torch's stub overloads of it do not
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def make_optimizer(
    kind: str, model: nn.Module, lr: float, weight_decay: float, cfg: TrainConfig
) -> torch.optim.Optimizer:
    """Weight decay (L2) on conv/linear weights only, never on BatchNorm or biases.

    sgd: Nesterov momentum (App. C.1). rmsprop: EfficientNet's recipe, decay 0.9, momentum 0.9,
    eps 1e-3 (App. C.2; PyTorch adds eps outside the square root, TensorFlow inside). adam: the
    reduced teacher's betas 0.9/0.999 and eps 1e-7 (App. C.2).
    """
    groups = param_groups_for_weight_decay(model, weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if kind == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=1e-3, momentum=0.9)
    return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-7)


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    return torch.bfloat16 if cfg.precision == "bf16" else None


def uda_loss(cfg: TrainConfig) -> UDALoss:
    return UDALoss(cfg.uda_factor, cfg.uda_temperature, cfg.uda_threshold, cfg.uda_warmup_steps)


def build_method(cfg: TrainConfig, num_classes: int, device: torch.device, grad_sync=None):
    """The method of ``cfg.method``. Models are seeded by the global RNG (the engine seeds it).

    ``grad_sync`` (data parallelism, :class:`metapl.distributed.GradientAverager`): every optimizer
    step of the method then reads gradients averaged across processes."""
    amp = autocast_dtype(cfg)
    student_clip = cfg.student_grad_clip or None  # 0 = off
    student = _model(cfg, num_classes, cfg.student_dropout, device)
    student_opt = make_optimizer(
        cfg.student_optimizer, student, cfg.student_lr, cfg.weight_decay, cfg
    )
    if cfg.method in ("supervised", "label_smoothing", "randaugment"):
        return SupervisedMethod(
            student,
            student_opt,
            label_smoothing=cfg.label_smoothing,
            labeled_view="labeled_strong" if cfg.method == "randaugment" else "labeled_weak",
            autocast_dtype=amp,
            grad_sync=grad_sync,
            max_grad_norm=student_clip,
        )
    if cfg.method == "uda":
        return UDAMethod(
            student,
            student_opt,
            uda_loss(cfg),
            label_smoothing=cfg.label_smoothing,
            autocast_dtype=amp,
            grad_sync=grad_sync,
            max_grad_norm=student_clip,
        )
    if cfg.method == "noisy_student":
        return NoisyStudentMethod(
            student,
            student_opt,
            label_smoothing=cfg.label_smoothing,
            autocast_dtype=amp,
            grad_sync=grad_sync,
            max_grad_norm=student_clip,
        )
    if cfg.method == "reduced_mpl":
        teacher = create_model(
            "reduced_teacher", num_classes, dropout=cfg.teacher_dropout, hidden=cfg.teacher_hidden
        ).to(device)
    else:
        teacher = _model(cfg, num_classes, cfg.teacher_dropout, device)
    teacher_wd = cfg.weight_decay if cfg.teacher_weight_decay < 0 else cfg.teacher_weight_decay
    views = {
        "supervised_mpl": ("labeled_weak", "unlabeled_weak"),
        "randaugment_mpl": ("labeled_strong", "unlabeled_strong"),
        "uda_mpl": ("labeled_weak", "unlabeled_strong"),
        "reduced_mpl": ("labeled_weak", "unlabeled_strong"),
    }[cfg.method]
    return MPLMethod(
        teacher,
        student,
        make_optimizer(cfg.teacher_optimizer, teacher, cfg.teacher_lr, teacher_wd, cfg),
        student_opt,
        labeled_view=views[0],
        unlabeled_view=views[1],
        uda=uda_loss(cfg) if cfg.method == "uda_mpl" else None,
        teacher_sees_distributions=cfg.method == "reduced_mpl",
        temperature=cfg.mpl_temperature,
        mpl_weight=cfg.mpl_weight,
        student_labeled_weight=cfg.student_labeled_weight,
        label_smoothing=cfg.label_smoothing,
        estimator=cfg.mpl_estimator,
        # the library's baseline_decay (None = no baseline); --set refuses it with another
        # estimator, and a preset file's value is dropped there, as mpl_jvp's
        baseline_decay=(
            cfg.mpl_baseline_decay
            if cfg.mpl_estimator == "first_order" and cfg.mpl_baseline_decay >= 0
            else None
        ),
        # the config refuses mpl_jvp given with another estimator; its default "auto" is dropped
        jvp=cfg.mpl_jvp if cfg.mpl_estimator == "exact" else "forward_ad",
        labeled_cuda_graph=cfg.mpl_labeled_cuda_graph and cfg.mpl_estimator == "exact",
        autocast_dtype=amp,
        check_inputs=False,  # labels were checked when the dataset was read
        grad_sync=grad_sync,  # g, v and the teacher's gradient (metapl.distributed)
        student_max_grad_norm=student_clip,
        teacher_max_grad_norm=cfg.teacher_grad_clip or None,
    )
