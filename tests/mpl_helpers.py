"""Shared pieces of the MPL core tests: tiny models, the student optimizers under test, and an
independent finite-difference evaluation of the teacher's MPL objective R(theta_{t+1}(Psi)).

Everything here is written against torch alone, so that the tests do not check metapl against
itself.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

# ----------------------------------------------------------------------------- optimizers

OptimizerFactory = Callable[[object], torch.optim.Optimizer]

# Student optimizers whose Appendix-B factor metapl claims to know. RMSprop's and Adam's eps are
# larger than the defaults so that g / (|g| + eps) is smooth at the scale of a finite difference.
STUDENT_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.3),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9),
    "sgd_dampening": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.8, dampening=0.3),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "sgd_weight_decay": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.5, weight_decay=0.05),
    "sgd_maximize": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.02, maximize=True
    ),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-3),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(
        p, lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9
    ),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(
        p, lr=0.01, alpha=0.9, eps=1e-3, centered=True
    ),
    "rmsprop_weight_decay": lambda p: torch.optim.RMSprop(
        p, lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.05
    ),
    "rmsprop_all_maximize": lambda p: torch.optim.RMSprop(
        p,
        lr=0.01,
        alpha=0.9,
        eps=1e-3,
        momentum=0.5,
        centered=True,
        weight_decay=0.05,
        maximize=True,
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-3),
    "adam_l2": lambda p: torch.optim.Adam(
        p, lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05
    ),
    "adam_amsgrad": lambda p: torch.optim.Adam(
        p, lr=0.01, betas=(0.8, 0.95), eps=1e-3, amsgrad=True
    ),
    "adam_decoupled": lambda p: torch.optim.Adam(
        p, lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, decoupled_weight_decay=True
    ),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
    "adam_maximize": lambda p: torch.optim.Adam(
        p, lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05, maximize=True
    ),
    "adamw_amsgrad_maximize": lambda p: torch.optim.AdamW(
        p, lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, amsgrad=True, maximize=True
    ),
    # PyTorch's other implementations of the same steps (the GPU levers of issue 5): the factors
    # are properties of the update rule, so they must hold for the foreach and fused kernels too.
    "sgd_nesterov_foreach": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.02, foreach=True
    ),
    "sgd_nesterov_fused": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.02, fused=True
    ),
    "rmsprop_momentum_foreach": lambda p: torch.optim.RMSprop(
        p, lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9, foreach=True
    ),
    "adam_fused": lambda p: torch.optim.Adam(
        p, lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05, fused=True
    ),
    "adamw_amsgrad_fused": lambda p: torch.optim.AdamW(
        p, lr=0.01, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, amsgrad=True, fused=True
    ),
    # per-group hyperparameters: the factor must come from each parameter's own group
    "sgd_param_groups": lambda p: _two_groups(
        torch.optim.SGD, p, {"lr": 0.3}, {"momentum": 0.9, "nesterov": True}, lr=0.1
    ),
    "adam_param_groups": lambda p: _two_groups(
        torch.optim.Adam, p, {"lr": 0.03, "weight_decay": 0.05}, {}, lr=0.01, eps=1e-3
    ),
}


def _two_groups(cls, params, first: dict, second: dict, **defaults) -> torch.optim.Optimizer:
    """``cls`` over two parameter groups: the first two parameters, and the rest."""
    params = list(params)
    return cls([{"params": params[:2], **first}, {"params": params[2:], **second}], **defaults)


def over_student_optimizers():
    """pytest parametrization over :data:`STUDENT_OPTIMIZERS` (argument ``opt_name``)."""
    return pytest.mark.parametrize("opt_name", list(STUDENT_OPTIMIZERS))


def fresh_optimizer_like(
    factory: OptimizerFactory, params, optimizer: torch.optim.Optimizer
) -> torch.optim.Optimizer:
    """A new optimizer over ``params`` with an independent copy of ``optimizer``'s state."""
    fresh = factory(params)
    # load_state_dict may keep the very tensors of the state dict: copy them first.
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return fresh


# ----------------------------------------------------------------------------- models

# Where make_problem puts models and data: the CPU by default; METAPL_TEST_DEVICE=cuda runs the
# oracle tests (test_exact_gradient.py, test_double_backward_step.py) on a GPU, in float64.
TEST_DEVICE = torch.device(os.environ.get("METAPL_TEST_DEVICE", "cpu"))

N_FEATURES, N_HIDDEN, N_CLASSES = 5, 8, 3


class MLP(nn.Module):
    """Linear (no bias: BatchNorm follows) -> BatchNorm1d -> ReLU -> Dropout -> Linear."""

    def __init__(self, d_in: int = N_FEATURES, hidden: int = N_HIDDEN, classes: int = N_CLASSES):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.relu(self.bn(self.fc1(x)))))


class ConvNet(nn.Module):
    """Conv (no bias) -> BatchNorm2d -> ReLU -> Dropout -> global mean pool -> Linear."""

    def __init__(self, channels: int = 3, width: int = 4, classes: int = N_CLASSES, p: float = 0.3):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(F.relu(self.bn(self.conv(x))))
        return self.fc(h.mean(dim=(2, 3)))


def randomize_bn(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm affine parameters (the defaults 1 and 0 hide mistakes)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=generator))


def make_problem(kind: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    """(teacher, student, x_l, y_l, x_u) for ``kind`` in {"mlp", "conv"}; both models in train mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        teacher, student = MLP(), MLP()
        x_l = torch.randn(6, N_FEATURES, generator=g)
        x_u = torch.randn(8, N_FEATURES, generator=g)
    elif kind == "conv":
        teacher, student = ConvNet(), ConvNet()
        x_l = torch.randn(2, 3, 6, 6, generator=g)
        x_u = torch.randn(3, 3, 6, 6, generator=g)
    else:
        raise ValueError(kind)
    randomize_bn(teacher, g)
    randomize_bn(student, g)
    y_l = torch.randint(0, N_CLASSES, (x_l.shape[0],), generator=g)
    dev = TEST_DEVICE
    teacher, student = teacher.to(dev, dtype).train(), student.to(dev, dtype).train()
    return teacher, student, x_l.to(dev, dtype), y_l.to(dev), x_u.to(dev, dtype)


def token_batches() -> tuple[Tensor, Tensor, Tensor]:
    """(x_l, y_l, x_u): 6 and 8 sequences of 7 token ids below 20, 3 classes."""
    g = torch.Generator().manual_seed(1)
    x_l, x_u = torch.randint(0, 20, (6, 7), generator=g), torch.randint(0, 20, (8, 7), generator=g)
    return x_l, torch.randint(0, 3, (6,), generator=g), x_u


def flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.cpu(), b.cpu()  # finite differences are collected on the CPU
    return float((a - b).norm() / b.norm())


def central_differences(objective, directions: list[dict[str, Tensor]], eps: float) -> Tensor:
    """(objective(+eps d) - objective(-eps d)) / 2 eps for each direction d: the derivative of a
    float-valued objective of a shift (name -> tensor) along each d, in float64."""
    return torch.tensor(
        [
            (
                objective({n: eps * v for n, v in d.items()})
                - objective({n: -eps * v for n, v in d.items()})
            )
            / (2 * eps)
            for d in directions
        ],
        dtype=torch.float64,
    )


def cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)).squeeze())


def cloned_buffers(module: nn.Module) -> dict[str, Tensor]:
    return {n: b.detach().clone() for n, b in module.named_buffers()}


# Inputs as MetaPseudoLabels.step takes them: a tensor, a tuple or list of tensors, a dict of
# tensors (examples along dimension 0 here).
Inputs = Tensor | tuple | list | dict


def run_on(model: nn.Module, x: Inputs, state: dict[str, Tensor] | None = None) -> Tensor:
    """``model(x)``, ``model(*x)`` or ``model(**x)``; with ``state`` (name -> tensor) in place of
    the model's own parameters and buffers."""
    if isinstance(x, Tensor):
        args, kwargs = (x,), {}
    elif isinstance(x, dict):
        args, kwargs = (), x
    else:
        args, kwargs = tuple(x), {}
    if state is None:
        return model(*args, **kwargs)
    return functional_call(model, state, args, kwargs)


def _leaves(x: Inputs) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    return list(x.values()) if isinstance(x, dict) else list(x)


def teacher_targets(
    teacher: nn.Module, state: dict[str, Tensor], x_l: Inputs, x_u: Inputs, temperature: float
) -> Tensor:
    """softmax(teacher(x_u) / T) as the step computes it: one forward on x_l and x_u
    concatenated tensor by tensor when their shapes agree but for the examples, else one each."""
    n_l = _leaves(x_l)[0].shape[0]
    pairs = list(zip(_leaves(x_l), _leaves(x_u)))
    if all(a.shape[1:] == b.shape[1:] for a, b in pairs):
        cat = [torch.cat([a, b]) for a, b in pairs]
        if isinstance(x_l, Tensor):
            joint: Inputs = cat[0]
        elif isinstance(x_l, dict):
            joint = dict(zip(x_l, cat))
        else:
            joint = cat
        logits_u = run_on(teacher, joint, state)[n_l:]
    else:
        run_on(teacher, x_l, state)  # draws its dropout mask first, as the step's forward does
        logits_u = run_on(teacher, x_u, state)
    return F.softmax(logits_u / temperature, dim=-1)


def student_after_real_step(
    teacher: nn.Module,
    teacher_params: dict[str, Tensor],
    student: nn.Module,
    student_optimizer: torch.optim.Optimizer,
    factory: OptimizerFactory,
    x_l: Inputs,
    y_l: Tensor,
    x_u: Inputs,
    *,
    seed: int,
    temperature: float = 1.0,
    student_labeled_weight: float = 0.0,
    student_max_grad_norm: float | None = None,
) -> nn.Module:
    """A copy of the student after one REAL step of a copy of its optimizer on the teacher's soft
    targets (the teacher's parameters set to ``teacher_params``), plus ``student_labeled_weight``
    times its CE on the labeled batch; with ``student_max_grad_norm``, its gradient clipped by
    ``torch.nn.utils.clip_grad_norm_`` before the step. Random numbers are drawn in
    MetaPseudoLabels.step's order, from ``seed``."""
    s2 = copy.deepcopy(student)
    trainable = [p for p in s2.parameters() if p.requires_grad]
    opt2 = fresh_optimizer_like(factory, trainable, student_optimizer)
    with torch.no_grad():
        torch.manual_seed(seed)
        state = {**cloned_buffers(teacher), **teacher_params}
        q = teacher_targets(teacher, state, x_l, x_u, temperature)
    opt2.zero_grad()
    loss = -(q * F.log_softmax(run_on(s2, x_u), dim=-1)).sum(-1).mean()
    if student_labeled_weight:
        labeled = F.cross_entropy(run_on(s2, x_l, cloned_buffers(s2)), y_l)
        loss = loss + student_labeled_weight * labeled
    loss.backward()
    if student_max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(trainable, student_max_grad_norm)
    opt2.step()
    return s2


def mpl_objective(*args, **kwargs) -> float:
    """R(theta_{t+1}) as the teacher's parameters are set to ``teacher_params``, by brute force:
    the student's CE on the labeled batch (train mode, copies of its buffers) after
    :func:`student_after_real_step`, which takes the same arguments."""
    given = inspect.signature(student_after_real_step).bind(*args, **kwargs).arguments
    s2 = student_after_real_step(*args, **kwargs)
    x_l, y_l = given["x_l"], given["y_l"]
    with torch.no_grad():
        return float(F.cross_entropy(run_on(s2, x_l, cloned_buffers(s2)), y_l))


class FiniteDifferenceProbe:
    """Central differences of R(theta_{t+1}(Psi)) (:func:`mpl_objective`, the REAL optimizer
    step) at the teacher's current parameters, along ``n`` random directions drawn from ``gen``;
    taken before the step under test moves anything. :meth:`check` then compares the teacher's
    gradient (its ``.grad`` after the step) along the same directions, to a relative 1e-6.

    ``objective_args`` are :func:`mpl_objective`'s after ``teacher_params`` (the student, its
    optimizer, the optimizer's factory, the batches), ``objective_kwargs`` its keywords (seed,
    temperature, student_labeled_weight, student_max_grad_norm)."""

    def __init__(
        self,
        teacher: nn.Module,
        *objective_args,
        gen: torch.Generator,
        n: int = 3,
        eps: float = 1e-6,
        **objective_kwargs,
    ):
        self.teacher = teacher
        t_params = {name: p.detach().clone() for name, p in teacher.named_parameters()}

        def objective(shift: dict[str, Tensor]) -> float:
            params = {name: p + shift[name] for name, p in t_params.items()}
            return mpl_objective(teacher, params, *objective_args, **objective_kwargs)

        self.directions = [
            {
                name: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
                for name, p in t_params.items()
            }
            for _ in range(n)
        ]
        self.fd = central_differences(objective, self.directions, eps)

    def along(self) -> Tensor:
        """The teacher's ``.grad`` along each direction."""
        grad = flat(p.grad for p in self.teacher.parameters())
        return torch.stack([grad @ flat(d.values()) for d in self.directions])

    def check(self, what: object = None) -> None:
        analytic = self.along()
        assert rel_err(analytic, self.fd) <= 1e-6, (what, analytic, self.fd)
