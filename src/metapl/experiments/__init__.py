"""Experiments of the paper, each behind a `metapl` subcommand."""
