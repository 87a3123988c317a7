"""Checks that a run's models can work here, made before anything of the run is written.

A model that cannot take the dataset's images (another channel count, too small an image, a model
that is not for images), or ``compile=true`` on a machine where torch.compile cannot work, failed
at the first step with a traceback; these turn each into a one-line :class:`ConfigError` first.
`metapl train` checks its run, `metapl digits` and `metapl reduced` every run before any trains,
`metapl bench` its models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from metapl.errors import ConfigError, first_line
from metapl.methods.build import build_method
from metapl.train.config import TrainConfig
from metapl.train.data import model_input

if TYPE_CHECKING:
    from metapl.train.run import Run


def check_compile_works(device: torch.device) -> None:
    """``compile=true`` needs a working torch.compile backend here (on a CPU a C++ compiler, on a
    GPU triton): a :class:`ConfigError` before anything is written, instead of a traceback at the
    first step. Compiles one tiny function (a second or two)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device))
    except Exception as exc:  # whatever the backend raises: the message says what failed
        raise ConfigError(
            f"compile=true: torch.compile does not work on this machine ({first_line(exc)}); "
            "install what it names, or run without --set compile=true"
        ) from None
    finally:
        torch.compiler.reset()


def check_models_fit(run: Run, option: str = "--set model=NAME") -> None:
    """One forward pass of each model that sees images, on two labeled images, in eval mode and
    without gradients (no randomness drawn, no BatchNorm statistics moved). A model that cannot take
    this dataset's images (another channel count, too small an image, a model that is not for
    images) is a :class:`ConfigError` here, before anything is written, instead of a traceback at
    the first step. ``option``: how the user chooses the model, for the message."""
    images = np.asarray(run.split.x_labeled[:2])
    _check_models_take(run.method.models, run.cfg, images, run.device, option)


def check_config_models(cfg: TrainConfig, num_classes: int, option: str) -> None:
    """:func:`check_models_fit` for a run that has not started: its models, built on the CPU, on
    two blank images of the shape its dataset delivers (:func:`input_spec`). ``metapl digits`` and
    ``metapl reduced`` check every run so, before any of them trains (a model that did not fit
    failed only when its run started: in ``reduced``, after every large teacher had trained)."""
    from metapl.train.run_model import input_spec

    spec = input_spec(cfg)
    images = np.zeros((2, spec.resolution, spec.resolution, spec.channels), np.uint8)
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):  # the models' initialization draws from torch's RNG
        method = build_method(cfg, num_classes, cpu)
    _check_models_take(method.models, cfg, images, cpu, option)


def _check_models_take(models: dict, cfg: TrainConfig, images, device, option: str) -> None:
    x = model_input(images, device, channels_last=cfg.channels_last(device))
    for name, model in models.items():
        if name == "teacher" and cfg.method == "reduced_mpl":
            continue  # the reduced teacher reads the large teacher's distributions, not images
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(x)
        except (RuntimeError, ValueError, TypeError) as exc:
            detail = first_line(exc)
            _, h, w, c = images.shape
            raise ConfigError(
                f"model {cfg.model} cannot take this data's images ({c} channel"
                f"{'s' if c != 1 else ''}, {h}x{w}): {detail}; choose a model for them with "
                f"{option}"
            ) from None
        finally:
            model.train(was_training)
