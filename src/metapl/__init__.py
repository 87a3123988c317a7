"""metapl: Meta Pseudo Labels (Pham et al.) with the exact teacher gradient, in PyTorch."""

from metapl.errors import MetaplError
from metapl.mpl import MetaPseudoLabels, TeacherLogits

__version__ = "0.1.0"
__all__ = ["MetaPseudoLabels", "MetaplError", "TeacherLogits", "__version__"]
