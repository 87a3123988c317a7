"""The exact teacher gradient by double backward: the slow, obvious oracle for the tests.

Builds the whole second-order graph: g = grad_theta L(q_Psi, theta_t) with ``create_graph=True``,
theta_{t+1} = U(theta_t, g) through a differentiable copy of the optimizer's step, and
grad_Psi R(theta_{t+1}). It consumes random numbers in the same order as
:meth:`MetaPseudoLabels.step` (teacher forward, student forward on x_u, with a
``student_labeled_weight`` the student's labeled pass at theta_t, student forward on x_l), so
with the same seed both see the same dropout masks. Inputs may be what the step takes (a tensor,
a tuple or list of tensors, a dict; :mod:`metapl.mpl.inputs`), and the teacher sees them the same
way: one forward on their concatenation when they line up, else one each. Nothing is modified: not
the models' parameters, not their buffers, not the optimizer's state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metapl.losses import batch_mean, hard_cross_entropy, soft_cross_entropy
from metapl.mpl.batch_checks import check_label_range, check_shapes, check_values, teacher_view
from metapl.mpl.inputs import Input, ModelInput, holding, joint_forward, model_input
from metapl.mpl.replay import buffer_copies, differentiable_attention
from metapl.mpl.setup_checks import check_listed_once, check_owned, check_temperature
from metapl.mpl.update_rules import check_optimizer, optimizer_params, reference_update


def double_backward_teacher_gradient(
    teacher: nn.Module,
    student: nn.Module,
    student_optimizer: torch.optim.Optimizer,
    x_labeled: Input,
    y_labeled: Tensor,
    x_unlabeled: Input,
    *,
    temperature: float = 1.0,
    batch_dim: int = 0,
    teacher_x_labeled: Input | None = None,
    teacher_x_unlabeled: Input | None = None,
    student_labeled_weight: float = 0.0,
) -> list[Tensor]:
    """grad_Psi R(theta_{t+1}) for each teacher parameter (the MPL signal alone).

    Its inputs get the step's checks: labels too few, out of range or of a float dtype, an empty
    batch, a negative temperature, an optimizer over other parameters or with a state its step()
    cannot run with gave a gradient without a word, or a raw error (``'list' object has no
    attribute 'long'``, a KeyError)."""
    check_temperature(temperature)
    x_l = model_input("x_labeled", x_labeled, batch_dim)
    x_u = model_input("x_unlabeled", x_unlabeled, batch_dim)
    check_shapes(x_l, y_labeled, x_u, batch_dim)
    t_l = teacher_view("teacher_x_labeled", teacher_x_labeled, x_l, batch_dim)
    t_u = teacher_view("teacher_x_unlabeled", teacher_x_unlabeled, x_u, batch_dim)
    params = [p for _, p in optimizer_params(student_optimizer)]
    check_owned("student", student, params)
    check_listed_once(student, params)  # a parameter listed twice is updated twice by torch
    # A state torch's step() cannot run with (amsgrad switched on after the first step, say): the
    # oracle took the missing state as zeros and gave a gradient without a word.
    check_optimizer("student", student_optimizer, student)
    y_labeled = y_labeled.long()  # class indices of any integer dtype, as the step takes them
    label_range = check_values(y_labeled, (x_l, x_u, t_l, t_u))

    t_params = dict(teacher.named_parameters())
    t_state = {**buffer_copies(teacher), **t_params}
    _, logits_u = joint_forward(
        lambda x, _: _run(teacher, t_state, x), [("labeled", t_l), ("unlabeled", t_u)], batch_dim
    )
    check_label_range(*label_range, logits_u.shape[-1])
    targets = F.softmax(logits_u / temperature, dim=-1)

    name_of = {id(p): n for n, p in student.named_parameters()}
    names = [name_of[id(p)] for p in params]
    # A frozen parameter (requires_grad off, still in the optimizer) gets no gradient, so the real
    # optimizer leaves it where it is.
    theta_t = {n: p.detach().requires_grad_(p.requires_grad) for n, p in zip(names, params)}
    with differentiable_attention():  # as in the step: fused attention has no 2nd derivative
        # The later passes see the buffers as the update pass on x_u left them, as in the step (a
        # forward that updates a buffer it reads, e.g. a step counter, sees it one step further).
        buffers = buffer_copies(student)
        s_u = _run(student, {**buffers, **theta_t}, x_u)

        def after_update() -> dict[str, Tensor]:
            return {n: b.detach().clone() for n, b in buffers.items()}

        loss = batch_mean(soft_cross_entropy(s_u, targets), batch_dim)
        if student_labeled_weight > 0:
            s_l0 = _run(student, {**after_update(), **theta_t}, x_l)
            loss = loss + student_labeled_weight * batch_mean(
                hard_cross_entropy(s_l0, y_labeled), batch_dim
            )
        trainable = [p for p in theta_t.values() if p.requires_grad]
        found = iter(torch.autograd.grad(loss, trainable, create_graph=True, allow_unused=True))
        grads = [next(found) if p.requires_grad else None for p in theta_t.values()]
        theta_next = reference_update(student_optimizer, grads)
        l_state = {**after_update(), **dict(zip(names, theta_next))}
        s_l = _run(student, l_state, x_l)
        risk = batch_mean(hard_cross_entropy(s_l, y_labeled), batch_dim)
    # (holding: a checkpointed student recomputes its layers in this backward, with the tensors
    # it holds then; its labeled pass ran with theta_{t+1})
    with holding(student, l_state):
        out = torch.autograd.grad(risk, list(t_params.values()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(t_params.values(), out)]


def _run(module: nn.Module, state: dict[str, Tensor], x: ModelInput) -> Tensor:
    out = x.functional_call(module, state)
    assert isinstance(out, Tensor), "the oracle takes models that return a tensor of logits"
    return out
