"""`metapl predict`: class and probability per image with a trained run's student (placeholder, being written)."""

from __future__ import annotations

import argparse

HELP = "class and probability per image with a trained run's student"
DESCRIPTION = HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `metapl predict`."""


def run(args: argparse.Namespace) -> None:
    from metapl.errors import ConfigError

    raise ConfigError("metapl predict is not implemented yet")
