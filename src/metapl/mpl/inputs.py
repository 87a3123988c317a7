"""Batches that are not one tensor: token ids and an attention mask, say.

The step hands each batch to the models as the caller gave it: a tensor ``x`` as ``model(x)``, a
tuple or list of tensors as ``model(*x)``, a dict of str -> tensor as ``model(**x)``. Every tensor
(a *leaf*) holds the same examples along ``batch_dim``. The step differentiates the models'
parameters, never their inputs, so integer leaves (token ids) need nothing special: no tangent
reaches them in any pass.

One level only: a leaf that is itself a container (a tuple inside a dict) is a
:class:`~metapl.errors.DataError`. It would reach the model as one argument whose tensors the step
could neither check nor concatenate; flattening it into the tuple or dict costs the caller one line.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metapl.errors import DataError

Input = Tensor | Sequence[Tensor] | Mapping[str, Tensor]

_KINDS = "a tensor, a tuple or list of tensors, or a dict of str -> tensor"


@dataclass(frozen=True)
class ModelInput:
    """One batch as a model takes it: ``model(*args, **kwargs)``, checked once by
    :func:`model_input`. ``names`` label the leaves (``args`` then ``kwargs``) in messages;
    ``batch_shape`` is every leaf's ``shape[:batch_dim + 1]``, the number of examples last."""

    args: tuple[Tensor, ...]
    kwargs: dict[str, Tensor]
    names: tuple[str, ...]
    batch_shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """The number of examples (per ensemble member, with ``batch_dim`` > 0)."""
        return self.batch_shape[-1]

    @property
    def leaves(self) -> tuple[Tensor, ...]:
        return (*self.args, *self.kwargs.values())

    @property
    def structure(self) -> tuple[int, tuple[str, ...]]:
        """How the model is called, whatever the values: a traced graph is checked per call
        structure, since fx traced every argument of the forward, also one left at its default."""
        return len(self.args), tuple(self.kwargs)

    def call(self, model: Callable) -> object:
        return model(*self.args, **self.kwargs)

    def functional_call(self, module: nn.Module, state: dict[str, Tensor]) -> object:
        """``module`` run with ``state`` (parameter and buffer name -> tensor) in place of its own."""
        return restoring_functional_call(module, state, self.args, self.kwargs)

    def with_leaves(self, leaves: Sequence[Tensor], batch_shape: tuple[int, ...]) -> ModelInput:
        """The same call structure holding ``leaves`` (in :attr:`leaves` order)."""
        n = len(self.args)
        return ModelInput(
            tuple(leaves[:n]), dict(zip(self.kwargs, leaves[n:])), self.names, batch_shape
        )


# Per root module: its submodules registered under more than one name (computed once).
_ALIASED: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, ...]] = weakref.WeakKeyDictionary()


def restoring_functional_call(
    module: nn.Module, state: dict[str, Tensor], args: tuple, kwargs: dict
) -> Any:
    """``torch.func.functional_call``, and afterwards the module's own parameters and buffers
    back in every submodule, also where torch leaves them out.

    Why: a submodule registered under two names (``nn.ModuleList([block, block])``, ALBERT-style
    sharing) kept the state's plain tensors after the call (torch 2.13): the student's forward
    no longer used the parameters its optimizer updates, so the shared block stopped training
    and the teacher's gradient was 13% off. Which submodules are aliased is found once per
    module (a module's structure is fixed by then); the others cost nothing.
    """
    aliased = _ALIASED.get(module)
    if aliased is None:
        seen: dict[int, int] = {}
        for _, sub in module.named_modules(remove_duplicate=False):
            seen[id(sub)] = seen.get(id(sub), 0) + 1
        aliased = tuple(m for m in module.modules() if seen[id(m)] > 1)
        _ALIASED[module] = aliased
    if not aliased:
        return functional_call(module, state, args, kwargs)
    own: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (d, dict(d)) for m in aliased for d in (m._parameters, m._buffers)
    ]
    try:
        return functional_call(module, state, args, kwargs)
    finally:
        for current, saved in own:
            current.update(saved)


@contextlib.contextmanager
def holding(module: nn.Module, state: dict[str, Tensor]) -> Iterator[None]:
    """``module`` with ``state``'s tensors (parameter and buffer name -> tensor) in place of its
    own while the block runs (a backward, say), its own back afterwards.

    Why: ``torch.utils.checkpoint`` (non-reentrant) recomputes its layers in the backward, with
    the module's attributes of that moment. After a functional call those are the module's own
    parameters and buffers, not the ones the pass ran with: the double-backward step's labeled
    pass at theta_{t+1} was recomputed at the student's own parameters (the oracle's gradient
    0.5% off), and a pass on copies of the buffers updated the real running statistics in its
    backward. Each tensor is swapped in the submodule that owns it, so a submodule registered
    under two names is swapped once.
    """
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    owners: dict[str, nn.Module] = {}  # (a BatchNorm's buffers share one owner: one lookup)
    try:
        for name, tensor in state.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = owners.get(owner_name)
            if owner is None:
                owner = owners[owner_name] = module.get_submodule(owner_name)
            # (a plain tensor in _parameters, as torch's own functional_call puts there)
            table: dict[str, Any] = (
                owner._parameters if leaf in owner._parameters else owner._buffers
            )
            swapped.append((table, leaf, table[leaf]))
            table[leaf] = tensor
        yield
    finally:
        for table, leaf, own in reversed(swapped):
            table[leaf] = own


def check_not_inference(name: str, tensor: Tensor) -> None:
    """A DataError for a tensor made under ``torch.inference_mode()``: autograd cannot save it
    for a backward, and the step failed inside a model's forward with torch's "Inference tensors
    cannot be saved for backward"."""
    if tensor.is_inference():
        raise DataError(
            f"{name} was made under torch.inference_mode(), and autograd cannot save such a "
            f"tensor for the step's backward: make the batch outside inference mode (or pass "
            f"{name}.clone() taken outside it)"
        )


def model_input(name: str, x: object, batch_dim: int) -> ModelInput:
    """``x`` (a tensor, a tuple or list of tensors, a dict of str -> tensor) as a
    :class:`ModelInput`, or a :class:`DataError` naming the part of ``x`` that is wrong."""
    args: tuple = ()
    kwargs: dict = {}
    names: tuple[str, ...]
    if isinstance(x, Tensor):
        args, names = (x,), (name,)
    elif isinstance(x, tuple | list):
        args, names = tuple(x), tuple(f"{name}[{i}]" for i in range(len(x)))
    elif isinstance(x, Mapping):
        bad = next((k for k in x if not isinstance(k, str)), None)
        if bad is not None:
            raise DataError(f"{name} has the key {bad!r}: a dict input needs str keys (model(**x))")
        kwargs = dict(sorted(x.items()))  # keyword order is no part of the call: one structure
        names = tuple(f"{name}[{k!r}]" for k in kwargs)
    else:
        raise DataError(f"{name} must be {_KINDS}, got {type(x).__name__}")
    if not names:
        raise DataError(f"{name} holds no tensors: the model needs at least one input")
    leaves = (*args, *kwargs.values())
    for leaf_name, leaf in zip(names, leaves):
        if isinstance(leaf, tuple | list | Mapping):
            raise DataError(
                f"{leaf_name} is a {type(leaf).__name__}: nested containers are not supported; "
                f"flatten {name} into one tuple or dict of tensors"
            )
        if not isinstance(leaf, Tensor):
            raise DataError(f"{leaf_name} must be a tensor, got {type(leaf).__name__}")
        check_not_inference(leaf_name, leaf)
        if leaf.layout != torch.strided or leaf.is_nested:
            # the value checks, the joint teacher forward and the student's passes take dense
            # tensors only: torch's NotImplementedError came through from one of them
            layout = "nested" if leaf.is_nested else str(leaf.layout).removeprefix("torch.")
            raise DataError(
                f"{leaf_name} is a {layout} tensor: the step takes dense tensors; pass "
                f"{leaf_name}.to_dense() (or a padded tensor)"
            )
    n = batch_dim + 1
    for leaf_name, leaf in zip(names, leaves):
        if leaf.dim() < n:
            if leaf.dim() == 0 or batch_dim == 0:
                raise DataError(f"{leaf_name} has no examples (shape {tuple(leaf.shape)})")
            # it has examples, along another dimension than batch_dim: "no examples" misled
            raise DataError(
                f"{leaf_name} has shape {tuple(leaf.shape)}, with no dimension {batch_dim} to hold "
                f"its examples (batch_dim={batch_dim}): give it {n} dimensions or more, or set "
                "batch_dim to the dimension of the examples"
            )
    batch_shape = tuple(leaves[0].shape[:n])
    for leaf_name, leaf in zip(names[1:], leaves[1:]):
        if tuple(leaf.shape[:n]) != batch_shape:
            raise DataError(
                f"{leaf_name} has shape[:{n}] {tuple(leaf.shape[:n])}, {names[0]} {batch_shape}: "
                f"every tensor of {name} must hold the same examples along batch_dim {batch_dim}"
            )
    # Detached where it needs it (a view, no copy): the step differentiates parameters, never
    # inputs. A batch computed with gradients on (an augmentation with parameters) failed with
    # torch's "backward through the graph a second time" after the student had moved (exact,
    # first_order: the student's backward freed the graph the teacher's then met), and every
    # estimator sent its losses' gradients into that graph's parameters.
    args = tuple(_data(leaf) for leaf in args)
    kwargs = {key: _data(leaf) for key, leaf in kwargs.items()}
    return ModelInput(args, kwargs, names, batch_shape)


def _data(leaf: Tensor) -> Tensor:
    return leaf.detach() if leaf.requires_grad else leaf


def concatenated(inputs: Sequence[ModelInput], batch_dim: int) -> ModelInput | None:
    """The inputs as one batch, leaf by leaf along ``batch_dim``, or None when they do not line up
    (another call structure, or a leaf whose shape differs elsewhere than along ``batch_dim``)."""
    first = inputs[0]
    if any(x.structure != first.structure for x in inputs):
        return None
    columns = list(zip(*(x.leaves for x in inputs)))
    for column in columns:
        if len({t.shape[:batch_dim] + t.shape[batch_dim + 1 :] for t in column}) != 1:
            return None
    batch_shape = (*first.batch_shape[:-1], sum(x.size for x in inputs))
    return first.with_leaves([torch.cat(c, dim=batch_dim) for c in columns], batch_shape)


def joint_forward(
    forward: Callable[[ModelInput, str], Tensor],
    inputs: Sequence[tuple[str, ModelInput]],
    batch_dim: int,
) -> list[Tensor]:
    """``forward(x, what)`` on each named input: one call on their concatenation when they line up
    (BatchNorm then sees all of them together, as in the paper's implementation), else one call
    each. ``what`` names what ``forward`` runs on, for its messages ("the labeled batch"). The
    joint output must hold one row per example (``forward`` checks it) to be split."""
    joint = concatenated([x for _, x in inputs], batch_dim)
    if joint is None:
        return [forward(x, f"the {name} batch") for name, x in inputs]
    names = [name for name, _ in inputs]
    what = f"the {', '.join(names[:-1])} and {names[-1]} batches (one forward on all of them)"
    out = forward(joint, what)
    return list(torch.split(out, [x.size for _, x in inputs], dim=batch_dim))
