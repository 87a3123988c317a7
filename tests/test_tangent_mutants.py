"""The tangent tape where hand-made mutants survived the rest of the suite, each held to forward AD
(``torch.autograd.forward_ad`` on the module itself) in float64:

- a conversion by ``x.type(dtype)`` (a bug: the tape treated every ``.type`` call as ``x.type()``,
  the type's name, and dropped the tangent).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mpl_helpers import rel_err
from test_tangent_replay import tape_vs_native
from torch import Tensor, nn

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DT = torch.float64


class TypeCast(nn.Module):
    """``x.type(dtype)`` converts like ``x.to(dtype)``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.relu(self.a(x)).type(torch.float64))


def test_a_dtype_conversion_by_type_keeps_its_tangent():
    """``.type`` was a method without a tangent (as ``x.type()``, the name): J lost every path
    through ``h.type(torch.float64)`` (44% off forward AD here; in a step the first-use check
    refused the graph)."""
    torch.manual_seed(0)
    model = TypeCast().to(DT).train()
    x = torch.randn(5, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    tape, record, logits, _, j_tape, j_ref = tape_vs_native(model, x)
    assert tape.describe()["generic"] == 0
    assert j_ref.norm() > 1e-6
    assert rel_err(j_tape, j_ref) <= 1e-10, rel_err(j_tape, j_ref)
