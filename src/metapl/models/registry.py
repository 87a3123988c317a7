"""Models by name, with one constructor signature: ``create_model(name, num_classes, **kwargs)``.

A constructor registers itself with ``@register_model``; its keyword arguments are the model's
options (``dropout``, BatchNorm settings, widths), checked against its signature so that a typo in a
config is a :class:`ConfigError` naming the options that exist, not a ``TypeError`` deep inside.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from metapl.errors import ConfigError

ModelFn = Callable[..., nn.Module]

_MODELS: dict[str, ModelFn] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Register ``fn(num_classes, **kwargs) -> nn.Module`` under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise RuntimeError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` for ``num_classes`` classes."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    fn = _MODELS[name]
    signature = inspect.signature(fn)
    try:
        signature.bind(num_classes, **kwargs)
    except TypeError as e:
        options = [p for p in signature.parameters if p != "num_classes"]
        raise ConfigError(f"model {name!r}: {e}; its options: {', '.join(options)}") from None
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    return fn(num_classes, **kwargs)
