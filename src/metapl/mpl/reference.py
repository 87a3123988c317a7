"""The exact teacher gradient by double backward: the slow, obvious oracle for the tests.

Builds the whole second-order graph: g = grad_theta L(q_Psi, theta_t) with ``create_graph=True``,
theta_{t+1} = U(theta_t, g) through a differentiable copy of the optimizer's step, and
grad_Psi R(theta_{t+1}). It consumes random numbers in the same order as
:meth:`MetaPseudoLabels.step` (teacher forward, student forward on x_u, with a
``student_labeled_weight`` the student's labeled pass at theta_t, student forward on x_l), so
with the same seed both see the same dropout masks. Nothing is modified: not the models' parameters,
not their buffers, not the optimizer's state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metapl.losses import batch_mean, hard_cross_entropy, soft_cross_entropy
from metapl.mpl.replay import buffer_copies
from metapl.mpl.update_rules import optimizer_params, reference_update


def double_backward_teacher_gradient(
    teacher: nn.Module,
    student: nn.Module,
    student_optimizer: torch.optim.Optimizer,
    x_labeled: Tensor,
    y_labeled: Tensor,
    x_unlabeled: Tensor,
    *,
    temperature: float = 1.0,
    batch_dim: int = 0,
    teacher_x_labeled: Tensor | None = None,
    teacher_x_unlabeled: Tensor | None = None,
    student_labeled_weight: float = 0.0,
) -> list[Tensor]:
    """grad_Psi R(theta_{t+1}) for each teacher parameter (the MPL signal alone)."""
    y_labeled = y_labeled.long()  # class indices of any integer dtype, as the step takes them
    t_l = x_labeled if teacher_x_labeled is None else teacher_x_labeled
    t_u = x_unlabeled if teacher_x_unlabeled is None else teacher_x_unlabeled

    t_params = dict(teacher.named_parameters())
    n_l = t_l.shape[batch_dim]
    t_in = torch.cat([t_l, t_u], dim=batch_dim)
    t_logits = functional_call(teacher, {**buffer_copies(teacher), **t_params}, (t_in,))
    logits_u = t_logits.narrow(batch_dim, n_l, t_u.shape[batch_dim])
    targets = F.softmax(logits_u / temperature, dim=-1)

    name_of = {id(p): n for n, p in student.named_parameters()}
    params = [p for _, p in optimizer_params(student_optimizer)]
    names = [name_of[id(p)] for p in params]
    # A frozen parameter (requires_grad off, still in the optimizer) gets no gradient, so the real
    # optimizer leaves it where it is.
    theta_t = {n: p.detach().requires_grad_(p.requires_grad) for n, p in zip(names, params)}
    # The later passes see the buffers as the update pass on x_u left them, as in the step (a
    # forward that updates a buffer it reads, e.g. a step counter, sees it one step further).
    buffers = buffer_copies(student)
    s_u = functional_call(student, {**buffers, **theta_t}, (x_unlabeled,))

    def after_update() -> dict[str, Tensor]:
        return {n: b.detach().clone() for n, b in buffers.items()}

    loss = batch_mean(soft_cross_entropy(s_u, targets), batch_dim)
    if student_labeled_weight > 0:
        s_l0 = functional_call(student, {**after_update(), **theta_t}, (x_labeled,))
        loss = loss + student_labeled_weight * batch_mean(
            hard_cross_entropy(s_l0, y_labeled), batch_dim
        )
    trainable = [p for p in theta_t.values() if p.requires_grad]
    found = iter(torch.autograd.grad(loss, trainable, create_graph=True, allow_unused=True))
    grads = [next(found) if p.requires_grad else None for p in theta_t.values()]
    theta_next = reference_update(student_optimizer, grads)
    s_l = functional_call(student, {**after_update(), **dict(zip(names, theta_next))}, (x_labeled,))
    risk = batch_mean(hard_cross_entropy(s_l, y_labeled), batch_dim)
    out = torch.autograd.grad(risk, list(t_params.values()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(t_params.values(), out)]
