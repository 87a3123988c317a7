"""metapl: Meta Pseudo Labels (Pham et al.) with the exact teacher gradient, in PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from metapl.errors import MetaplError

if TYPE_CHECKING:
    from metapl.mpl import MetaPseudoLabels, TeacherLogits

__version__ = "0.1.0"
__all__ = ["MetaPseudoLabels", "MetaplError", "TeacherLogits", "__version__"]


def __dir__() -> list[str]:
    """The lazy names too, for tab completion (IPython, Jupyter)."""
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    """The library's classes load torch on first use, not at `import metapl`: the command line
    then answers `--help` and option mistakes at once (importing torch takes seconds), and a
    Ctrl-C while it starts is caught by its one-line handler instead of a traceback."""
    if name in ("MetaPseudoLabels", "TeacherLogits"):
        from metapl import mpl

        return getattr(mpl, name)
    raise AttributeError(f"module 'metapl' has no attribute {name!r}")
