"""`metapl export`: save a trained run's student as TorchScript or ONNX (placeholder, being written)."""

from __future__ import annotations

import argparse

HELP = "save a trained run's student as TorchScript or ONNX"
DESCRIPTION = HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `metapl export`."""


def run(args: argparse.Namespace) -> None:
    from metapl.errors import ConfigError

    raise ConfigError("metapl export is not implemented yet")
