"""The student's update rule U(theta, g), seen from the teacher (Appendix B).

The teacher's exact MPL gradient needs the transpose-Jacobian of the student's update with respect to
the gradient the teacher's targets produced: w = (dU/dg)^T v. For every optimizer here dU/dg is
diagonal, so it is one *factor* per parameter element, read off the optimizer's state *before* its
step. Each rule also carries a differentiable, non-mutating copy of the same step, used by the
double-backward oracle and checked against the real ``optimizer.step()`` in the tests.

The factors follow PyTorch's own update code (torch/optim/{sgd,rmsprop,adam}.py), including the
first-step special cases (SGD's momentum buffer starts as the gradient itself; RMSprop's and Adam's
moments start at zero), L2 weight decay inside the gradient, AdamW's decoupled decay, Nesterov,
dampening, centered RMSprop, AMSGrad and ``maximize``. An optimizer we do not know is an error: a
silently wrong factor would give a silently wrong teacher.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from metapl.errors import UnsupportedOptimizerError

Factor = Tensor | float


def optimizer_params(optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict, Tensor]]:
    """Yield (param_group, param) for every parameter the optimizer updates."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield group, p


def _sqrt(x: Tensor) -> Tensor:
    """sqrt with derivative 0 at 0, the convention of the factors (where a second moment is 0 the
    gradient is 0 too). Plain sqrt's infinite derivative there made the double-backward step and
    oracle NaN as soon as one gradient element was exactly 0 (a dead ReLU unit)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def _signed(group: dict, grad: Tensor) -> tuple[Tensor, float]:
    """``maximize`` flips the gradient the rule sees, and so the sign of dU/dg."""
    if group.get("maximize", False):
        return -grad, -1.0
    return grad, 1.0


class SGDRule:
    """torch.optim.SGD: plain, momentum (with dampening) and Nesterov; L2 weight decay."""

    def factor(self, group: dict, state: dict, param: Tensor, grad: Tensor) -> Factor:
        _, sign = _signed(group, grad)
        lr, mu, damp = float(group["lr"]), group["momentum"], group["dampening"]
        if mu == 0:
            return -lr * sign
        # The buffer is created as a copy of the first gradient: dampening does not apply then.
        first = state.get("momentum_buffer") is None
        into_buffer = 1.0 if first else 1.0 - damp
        if group["nesterov"]:
            return -lr * (1.0 + mu * into_buffer) * sign
        return -lr * into_buffer * sign

    def reference_step(self, group: dict, state: dict, param: Tensor, grad: Tensor) -> Tensor:
        grad, _ = _signed(group, grad)
        lr, mu, damp = float(group["lr"]), group["momentum"], group["dampening"]
        if group["weight_decay"] != 0:
            grad = grad + group["weight_decay"] * param
        if mu != 0:
            old = state.get("momentum_buffer")
            buf = grad if old is None else mu * old + (1.0 - damp) * grad
            grad = grad + mu * buf if group["nesterov"] else buf
        return param - lr * grad


class RMSpropRule:
    """torch.optim.RMSprop, plain or centered, with or without momentum (Eq. 8 of Appendix B)."""

    def _normalized_and_derivative(
        self, group: dict, state: dict, param: Tensor, grad: Tensor
    ) -> tuple[Tensor, Tensor]:
        """grad / avg and its elementwise derivative with respect to grad."""
        alpha, eps = group["alpha"], group["eps"]
        if group["weight_decay"] != 0:
            grad = grad + group["weight_decay"] * param
        square_avg = state.get("square_avg")
        square_avg = torch.zeros_like(param) if square_avg is None else square_avg
        square_avg = alpha * square_avg + (1.0 - alpha) * grad * grad
        if group["centered"]:
            grad_avg = state.get("grad_avg")
            grad_avg = torch.zeros_like(param) if grad_avg is None else grad_avg
            grad_avg = alpha * grad_avg + (1.0 - alpha) * grad
            s = (square_avg - grad_avg * grad_avg).sqrt()
            ds_numerator = (1.0 - alpha) * (grad - grad_avg)
        else:
            s = square_avg.sqrt()
            ds_numerator = (1.0 - alpha) * grad
        # ds/dgrad = ds_numerator / s; where s == 0 the gradient is 0 too and the limit is 0.
        ds = torch.where(s > 0, ds_numerator / s.clamp_min(torch.finfo(s.dtype).tiny), 0.0)
        avg = s + eps
        return grad / avg, 1.0 / avg - grad * ds / (avg * avg)

    def factor(self, group: dict, state: dict, param: Tensor, grad: Tensor) -> Factor:
        grad, sign = _signed(group, grad)
        _, derivative = self._normalized_and_derivative(group, state, param, grad)
        return (-float(group["lr"]) * sign) * derivative

    def reference_step(self, group: dict, state: dict, param: Tensor, grad: Tensor) -> Tensor:
        grad, _ = _signed(group, grad)
        alpha, eps, lr = group["alpha"], group["eps"], float(group["lr"])
        if group["weight_decay"] != 0:
            grad = grad + group["weight_decay"] * param
        square_avg = state.get("square_avg", torch.zeros_like(param))
        square_avg = alpha * square_avg + (1.0 - alpha) * grad * grad
        if group["centered"]:
            grad_avg = state.get("grad_avg", torch.zeros_like(param))
            grad_avg = grad_avg + (1.0 - alpha) * (grad - grad_avg)
            avg = _sqrt(square_avg - grad_avg * grad_avg) + eps
        else:
            avg = _sqrt(square_avg) + eps
        if group["momentum"] > 0:
            buf = state.get("momentum_buffer", torch.zeros_like(param))
            return param - lr * (group["momentum"] * buf + grad / avg)
        return param - lr * grad / avg


class AdamRule:
    """torch.optim.Adam and AdamW (decoupled decay), with bias corrections and AMSGrad."""

    def _moments(self, group: dict, state: dict, param: Tensor, grad: Tensor):
        beta1, beta2 = (float(b) for b in group["betas"])
        if group["weight_decay"] != 0 and not group.get("decoupled_weight_decay", False):
            grad = grad + group["weight_decay"] * param
        step = float(state["step"]) + 1.0 if "step" in state else 1.0
        exp_avg = state.get("exp_avg", torch.zeros_like(param))
        exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(param))
        exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)
        exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
        return grad, step, beta1, beta2, exp_avg, exp_avg_sq

    def factor(self, group: dict, state: dict, param: Tensor, grad: Tensor) -> Factor:
        grad, sign = _signed(group, grad)
        grad, step, beta1, beta2, exp_avg, exp_avg_sq = self._moments(group, state, param, grad)
        second = exp_avg_sq
        d_second = 2.0 * (1.0 - beta2) * grad
        if group["amsgrad"]:
            old_max = state.get("max_exp_avg_sq", torch.zeros_like(param))
            grows = exp_avg_sq >= old_max
            second = torch.where(grows, exp_avg_sq, old_max)
            d_second = torch.where(grows, d_second, 0.0)
        bc1 = 1.0 - beta1**step
        bc2_sqrt = (1.0 - beta2**step) ** 0.5
        root = second.sqrt()
        # d sqrt(second)/dgrad = d_second / (2 root); zero where root == 0 (then grad == 0 too).
        d_root = torch.where(root > 0, d_second / (2.0 * root.clamp_min(1e-300)), 0.0)
        denom = root / bc2_sqrt + group["eps"]
        d_denom = d_root / bc2_sqrt
        step_size = float(group["lr"]) / bc1
        d_ratio = (1.0 - beta1) / denom - exp_avg * d_denom / (denom * denom)
        return (-step_size * sign) * d_ratio

    def reference_step(self, group: dict, state: dict, param: Tensor, grad: Tensor) -> Tensor:
        grad, _ = _signed(group, grad)
        lr = float(group["lr"])
        if group["weight_decay"] != 0 and group.get("decoupled_weight_decay", False):
            param = param * (1.0 - lr * group["weight_decay"])
        grad, step, beta1, beta2, exp_avg, exp_avg_sq = self._moments(group, state, param, grad)
        second = exp_avg_sq
        if group["amsgrad"]:
            second = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(param)), second)
        bc1 = 1.0 - beta1**step
        bc2_sqrt = (1.0 - beta2**step) ** 0.5
        denom = _sqrt(second) / bc2_sqrt + group["eps"]
        return param - (lr / bc1) * exp_avg / denom


# Exact types only: a subclass may override step() and make the factor wrong.
_RULES: dict[type, object] = {
    torch.optim.SGD: SGDRule(),
    torch.optim.RMSprop: RMSpropRule(),
    torch.optim.Adam: AdamRule(),
    torch.optim.AdamW: AdamRule(),
}

SUPPORTED_OPTIMIZERS = tuple(cls.__name__ for cls in _RULES)


def rule_for(optimizer: torch.optim.Optimizer):
    """The update rule of ``optimizer``, or a clear error if metapl cannot differentiate it exactly."""
    rule = _RULES.get(type(optimizer))
    if rule is None:
        raise UnsupportedOptimizerError(
            f"the exact teacher gradient needs the student's update rule, and metapl knows it for "
            f"{', '.join(SUPPORTED_OPTIMIZERS)} only, not {type(optimizer).__name__}; use one of "
            f"those for the student, or estimator='first_order'"
        )
    for group in optimizer.param_groups:
        if any(torch.is_complex(p) for p in group["params"]):
            raise UnsupportedOptimizerError("complex-valued student parameters are not supported")
    return rule


def update_factors(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor | None]
) -> list[Factor]:
    """dU/dg for each parameter, from the optimizer's state *before* its step.

    A parameter with no gradient is not moved by the optimizer, so its factor is 0.
    """
    rule = rule_for(optimizer)
    group_of = {id(p): g for g, p in optimizer_params(optimizer)}
    factors: list[Factor] = []
    with torch.no_grad():
        for p, g in zip(params, grads):
            group = group_of.get(id(p))
            if g is None or group is None:
                factors.append(0.0)
                continue
            factors.append(rule.factor(group, optimizer.state.get(p, {}), p.detach(), g.detach()))
    return factors


def reference_update(
    optimizer: torch.optim.Optimizer, grads: Sequence[Tensor | None]
) -> list[Tensor]:
    """theta_{t+1} as a differentiable function of ``grads`` (one per parameter, in the order of
    :func:`optimizer_params`); the optimizer and the parameters are left untouched."""
    rule = rule_for(optimizer)
    new_params = []
    for (group, p), g in zip(optimizer_params(optimizer), grads):
        if g is None:
            new_params.append(p.detach())
            continue
        state = {
            k: v.detach() if isinstance(v, Tensor) else v
            for k, v in optimizer.state.get(p, {}).items()
        }
        new_params.append(rule.reference_step(group, state, p.detach(), g))
    return new_params
