"""`metapl tune`: hyper-parameter search on the tuning split (Appendix C.1), with Optuna (placeholder, being written)."""

from __future__ import annotations

import argparse

HELP = "hyper-parameter search on the tuning split (Appendix C.1), with Optuna"
DESCRIPTION = HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `metapl tune`."""


def run(args: argparse.Namespace) -> None:
    from metapl.errors import ConfigError

    raise ConfigError("metapl tune is not implemented yet")
