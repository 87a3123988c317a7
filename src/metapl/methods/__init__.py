"""Training methods of Table 1, each a small class with ``step(batch) -> metrics``.

Models and optimizers are built outside (:func:`metapl.methods.build.build_method`) and handed in,
so every method can be tested with a toy model and no dataset.
"""

from metapl.methods.base import Batch, Method
from metapl.methods.mpl import MPLMethod
from metapl.methods.supervised import SupervisedMethod
from metapl.methods.uda import UDALoss, UDAMethod

__all__ = ["Batch", "MPLMethod", "Method", "SupervisedMethod", "UDALoss", "UDAMethod"]
