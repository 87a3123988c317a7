"""Hyper-parameter tuning as in Appendix C.1, with Optuna (``metapl tune``).

- :mod:`~metapl.tuning.space`: the student's and the teacher's search spaces, and trial configs;
- :mod:`~metapl.tuning.storage`: the SQLite / PostgreSQL storage that processes share;
- :mod:`~metapl.tuning.studies`: joining a shared study, handing stage 1's best to stage 2;
- :mod:`~metapl.tuning.retry`: resuming a trial that Ctrl-C or ``kill -9`` stopped;
- :mod:`~metapl.tuning.runner`: the objective, the stages, and ``OUT/best.toml``;
- :mod:`~metapl.tuning.bestfile`: the TOML writer.

Optuna is imported only when a study runs, so ``metapl --help`` does not pay for it.
"""

from metapl.tuning.runner import TuneOptions, tune

__all__ = ["TuneOptions", "tune"]
