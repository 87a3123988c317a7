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

:func:`check_optimizer` finds, before a step, what would make either model's ``optimizer.step()``
raise in the middle of it (``capturable`` on the CPU, ``differentiable``, a state that does not fit).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import cast

import torch
from torch import Tensor

from metapl.errors import ConfigError, UnsupportedOptimizerError

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
        step: float | Tensor = 1.0
        if "step" in state:
            count = state["step"]
            # capturable and fused Adam keep it on the GPU: float() of it was a host sync per
            # parameter, every step. Capturable Adam computes its bias corrections in the count's
            # dtype (float32); the fused CUDA kernel in double (pow of the double betas), as the
            # CPU's do: in float32 the exact gradient of a float64 student was 1e-8 off on an H200.
            on_device = isinstance(count, Tensor) and count.device.type != "cpu"
            if on_device and group.get("fused"):
                step = count.to(torch.float64) + 1.0
            else:
                step = count + 1.0 if on_device else float(count) + 1.0
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
    # No graph is recorded here, so the rules read the tensors themselves (a detach of each
    # parameter and gradient was two dispatches per parameter of a host-bound GPU step). no_grad
    # does not drop forward-mode tangents as detach did: not for dual tensors.
    with torch.no_grad():
        for p, g in zip(params, grads):
            group = group_of.get(id(p))
            if g is None or group is None:
                factors.append(0.0)
                continue
            factors.append(rule.factor(group, optimizer.state.get(p, {}), p, g))
    return factors


def times_factors(factors: Sequence[Factor], v: Sequence[Tensor | None]) -> list[Tensor | None]:
    """``w_i = f_i * v_i`` (dU/dg^T v, the factors diagonal), None where ``v_i`` is None or
    ``f_i`` the number 0. Two foreach multiplications, by numbers and by tensors: one per
    parameter were a hundred kernel launches of a host-bound GPU step."""
    w: list[Tensor | None] = [None] * len(v)
    by_number: list[tuple[int, Tensor, Factor]] = []
    by_tensor: list[tuple[int, Tensor, Factor]] = []
    for i, (f, vi) in enumerate(zip(factors, v)):
        if vi is not None and (isinstance(f, Tensor) or f != 0.0):
            (by_tensor if isinstance(f, Tensor) else by_number).append((i, vi, f))
    for group in (by_number, by_tensor):
        if group:
            scales = cast("list", [f for _, _, f in group])  # numbers or tensors, not mixed
            products = torch._foreach_mul([vi for _, vi, _ in group], scales)
            for (i, _, _), product in zip(group, products):
                w[i] = product
    return w


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


# ------------------------------------------------------------------ what optimizer.step() refuses
#
# Each of these made torch raise inside an MPL step: the student's optimizer.step() after its
# forward and backward (its state initialised, its running statistics moved), the teacher's after
# the student had stepped. The step checks them first (ConfigError), with the models as they were.

# The state torch's step() reads for each parameter that has state (torch/optim/{rmsprop,adam}.py
# ``_init_group``): a key missing was a KeyError there. SGD reads its momentum buffer with get().
_STATE_KEYS = {
    torch.optim.RMSprop: lambda g: (
        ("step", "square_avg")
        + (("momentum_buffer",) if g["momentum"] > 0 else ())
        + (("grad_avg",) if g["centered"] else ())
    ),
    torch.optim.Adam: lambda g: (
        ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if g["amsgrad"] else ())
    ),
}
_STATE_KEYS[torch.optim.AdamW] = _STATE_KEYS[torch.optim.Adam]
# The classes whose per-parameter state is checked (exact types: a subclass may keep another).
# Any other optimizer -- a teacher's Adagrad, Adafactor or NAdam, a user's subclass -- gets the
# checks that hold for every class (differentiable, capturable, requires_grad, a closure, the
# param groups' hyperparameters, sparse gradients) but none of its state. That is deliberate: the
# teacher's optimizer only consumes the .grad the step leaves (the exact gradient does not depend
# on its rule, unlike the student's), and metapl cannot know another class's state layout
# (Adafactor's factored moments, NAdam's scalar mu_product), so a generic shape check would refuse
# valid states. A state of its own that does not fit fails in torch's step() with torch's message.
# (An unknown *student* optimizer is refused for the exact estimators: rule_for.)
_KNOWN_STATE = (torch.optim.SGD, *_STATE_KEYS)
# Optimizers whose step() raises on a sparse gradient ("Adam does not support sparse gradients").
_DENSE_ONLY = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)
# The flags of a param group that change which state its step() reads, or where it may live.
_STATE_FLAGS = ("capturable", "amsgrad", "momentum", "centered")


def _dtype_must_match(cls: type, group: dict) -> bool:
    """Whether step() fails on a state tensor of another dtype than its parameter's (a model cast
    after its optimizer's first step): lerp_ (Adam, centered RMSprop) and the fused kernels
    refuse one; SGD's and plain RMSprop's in-place updates take it (load_state_dict casts)."""
    if group.get("fused"):
        return True
    if cls is torch.optim.RMSprop:
        return bool(group["centered"])
    return cls in (torch.optim.Adam, torch.optim.AdamW)


def _capturable_devices() -> list[str]:
    try:
        from torch.optim.optimizer import _get_capturable_supported_devices

        return list(_get_capturable_supported_devices())
    except ImportError:  # a torch without the helper: the devices of torch 2.13
        return ["cuda", "xpu", "hpu"]


def check_optimizer(
    who: str, optimizer: torch.optim.Optimizer, model: torch.nn.Module, checked: object = None
) -> object:
    """Refuse (ConfigError) an optimizer whose ``step()`` would fail inside an MPL step; ``who``
    is "student" or "teacher", ``model`` the module it trains.

    Returns a signature of the optimizer's state and groups: pass it back as ``checked`` and the
    per-parameter checks (state, devices) run again only when it changes (a ``load_state_dict``
    replaces the state, a flag switched on, parameters added, cast or moved, a state tensor put
    in or deleted by hand: :func:`_state_objects`). What can change between any two steps
    (``differentiable``, ``requires_grad``) is checked every call: no host sync, some tens of
    microseconds for hundreds of parameters.
    """
    if optimizer.defaults.get("differentiable", False):
        # step() runs with autograd on, and its in-place update of a leaf fails
        raise ConfigError(
            f"{who}_optimizer has differentiable=True: its step() then fails on the {who}'s "
            "parameters (an in-place update of a leaf that requires grad), and MPL does not "
            f"differentiate through it: construct the {type(optimizer).__name__} with "
            "differentiable=False"
        )
    if not any(p.requires_grad for _, p in optimizer_params(optimizer)):
        raise ConfigError(
            f"none of the parameters in {who}_optimizer requires grad: the {who} has nothing "
            "to learn"
        )
    signature = (
        id(optimizer.state),
        len(optimizer.state),
        tuple(
            (len(g["params"]), *(bool(g.get(k)) for k in _STATE_FLAGS))
            + ((g["params"][0].device, g["params"][0].dtype) if g["params"] else ())
            for g in optimizer.param_groups
        ),
    )
    objects = _state_objects(optimizer)
    if not (isinstance(checked, tuple) and checked[0] == signature and _same(checked[1], objects)):
        _check_groups(who, optimizer)
        _check_parameters(who, optimizer, model)
    return signature, objects


def _state_objects(optimizer: torch.optim.Optimizer) -> list[object]:
    """The values of every per-parameter state (for the classes whose state is checked), to be
    compared by identity: torch's steps update them in place (SGD's momentum buffer, Adam's and
    RMSprop's moments and step count), so another object means the state was changed by hand
    between two steps: ``optimizer.state[p]["exp_avg"] = ...``, a key deleted or added, a state
    dict replaced (len(optimizer.state) unchanged). Such a state was not checked again, and its
    step() failed in the middle of the MPL step. One pass over references, no tensor read."""
    if type(optimizer) not in _KNOWN_STATE:
        return []
    return list(chain.from_iterable(map(dict.values, optimizer.state.values())))


def _same(checked: list[object], objects: list[object]) -> bool:
    return len(checked) == len(objects) and all(map(operator.is_, checked, objects))


def _check_groups(who: str, optimizer: torch.optim.Optimizer) -> None:
    """Every group holds every hyperparameter of the optimizer's class (add_param_group fills them
    in): a group without one took another class's from load_state_dict, and step() or the
    Appendix-B factor raised a KeyError."""
    name = type(optimizer).__name__
    for i, group in enumerate(optimizer.param_groups):
        missing = [k for k in optimizer.defaults if k not in group]
        if missing:
            raise ConfigError(
                f"{who}_optimizer's param group {i} has no {', '.join(map(repr, missing))}, which "
                f"{name}.step() reads: its state_dict was saved by another optimizer class; load "
                f"a state_dict saved by {name}"
            )


def _check_parameters(who: str, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    cls = type(optimizer)
    name_of = {id(p): n for n, p in model.named_parameters()}
    devices = _capturable_devices()
    for group, p in optimizer_params(optimizer):
        name = name_of.get(id(p), "?")
        if group.get("capturable", False) and p.device.type not in devices:
            raise ConfigError(
                f"{who}_optimizer has capturable=True, which torch supports for parameters on "
                f"{', '.join(devices)}, and its parameter {name!r} is on {p.device.type}: "
                "construct it with capturable=False"
            )
        state = optimizer.state.get(p)
        if not state or cls not in _KNOWN_STATE:
            continue
        what = f"{who}_optimizer's state of {name!r}"
        needed = _STATE_KEYS[cls](group) if cls in _STATE_KEYS else ()
        lacking = [k for k in needed if k not in state]
        if lacking:
            raise ConfigError(
                f"{what} lacks {', '.join(map(repr, lacking))}, which {cls.__name__}.step() reads "
                f"with its options (it has {', '.join(map(repr, state)) or 'nothing'}): a state "
                "saved with other options or by another optimizer class; load a matching "
                "state_dict, or switch amsgrad / momentum / centered on before the first step"
            )
        strict = _dtype_must_match(cls, group)
        for key, value in state.items():
            if key == "step" or not isinstance(value, Tensor):
                continue
            dtype = p.dtype if strict else value.dtype
            if (value.shape, value.dtype, value.device) != (p.shape, dtype, p.device):
                raise ConfigError(
                    f"{what} has {key!r} of shape {tuple(value.shape)}, {value.dtype} on "
                    f"{value.device}; the parameter is {tuple(p.shape)}, {p.dtype} on {p.device}: "
                    "a state saved for other parameters (another model, another order) or set "
                    "by hand; load the state_dict of an optimizer over these parameters in this "
                    "order"
                )
    _check_sparse_gradients(who, optimizer, model, name_of)


def sparse_embeddings(model: torch.nn.Module) -> dict[int, str]:
    """id(weight) -> module name of the embeddings with sparse=True (sparse gradients)."""
    return {
        id(m.weight): name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag) and m.sparse
    }


def _check_sparse_gradients(
    who: str, optimizer: torch.optim.Optimizer, model: torch.nn.Module, name_of: dict[int, str]
) -> None:
    """What ``optimizer.step()`` refuses of sparse gradients (embeddings with sparse=True), and of
    dense ones (SparseAdam)."""
    cls = type(optimizer)
    sparse = sparse_embeddings(model)
    if cls is torch.optim.SparseAdam:
        dense = next((p for _, p in optimizer_params(optimizer) if id(p) not in sparse), None)
        if dense is not None:
            raise ConfigError(
                f"{who}_optimizer is a SparseAdam, which takes sparse gradients only, and the "
                f"{who}'s parameter {name_of.get(id(dense), '?')!r} gets a dense one: give "
                "SparseAdam only the weights of embeddings with sparse=True, or use Adam"
            )
    if sparse and isinstance(optimizer, _DENSE_ONLY):
        raise ConfigError(
            f"the {who}'s module {next(iter(sparse.values()))!r} has sparse=True, and "
            f"{cls.__name__} does not take sparse gradients: use sparse=False, or SGD / Adagrad "
            f"for the {who}"
        )
    # Weight decay adds the (dense) parameter to the sparse gradient: SGD's step() raised
    # "add(sparse, dense) is not supported", Adagrad's "weight_decay option is not compatible with
    # sparse gradients" (the student's after its backward, the teacher's after the student's
    # step), as did double_backward's differentiable copy of SGD's step.
    if cls not in (torch.optim.SGD, torch.optim.Adagrad):
        return
    decayed = next(
        (
            sparse[id(p)]
            for g, p in optimizer_params(optimizer)
            if id(p) in sparse and g["weight_decay"]
        ),
        None,
    )
    if decayed is not None:
        raise ConfigError(
            f"the {who}'s module {decayed!r} has sparse=True, and {cls.__name__}'s weight_decay "
            "does not take sparse gradients: give its weight a param group with weight_decay=0, "
            "or use sparse=False"
        )
