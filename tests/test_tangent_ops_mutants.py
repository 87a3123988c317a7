"""The tangent tape's rules (:mod:`metapl.mpl.tangent_ops`) where hand-made mutants survived the
rest of the suite, each held to forward AD (``torch.autograd.forward_ad``) in float64:

- ``F.conv2d`` called without stride, padding, dilation and groups: its rule reads them from
  its signature stub, which must carry torch's defaults (fx records ``F.gelu`` the same way;
  ``F.leaky_relu`` and ``F.batch_norm`` it records with every argument filled in);
- subtraction written as ``Tensor.sub`` (its own table entry; ``torch.sub`` and ``-`` are held
  elsewhere).
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


class DefaultArguments(nn.Module):
    """Options left out of the calls, so that only the stubs' defaults give them."""

    def __init__(self, width: int = 4, classes: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def param(*shape, shift=0.0):
            return nn.Parameter(shift + 0.5 * torch.randn(*shape, generator=g))

        self.w_conv, self.b_conv = param(width, 3, 3, 3), param(width)
        self.bn_w, self.bn_b = param(width, shift=1.0), param(width)
        # running variances near 0, where eps weighs most
        self.register_buffer("rm", 0.3 * torch.randn(width, generator=g))
        self.register_buffer("rv", 1e-3 + 1e-3 * torch.rand(width, generator=g))
        self.w_fc, self.b_fc = param(classes, width), param(classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.conv2d(x, self.w_conv, self.b_conv)
        h = F.batch_norm(h, None, None, self.bn_w, self.bn_b, True)
        r = F.batch_norm(h, self.rm, self.rv, self.bn_w, self.bn_b)
        a = torch.sub(F.gelu(h), F.leaky_relu(r))
        return F.linear(a.sub(F.leaky_relu(h)).mean(dim=(2, 3)), self.w_fc, self.b_fc)


def test_rules_read_torchs_defaults_and_tensor_sub():
    model = DefaultArguments().to(DT).train()
    x = torch.randn(5, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    tape, record, logits, _, j_tape, j_ref = tape_vs_native(model, x)
    assert tape.describe()["generic"] == 0, tape.describe()  # every node by its own rule
    assert rel_err(record.logits.detach(), logits.detach()) <= 1e-12
    assert j_ref.norm() > 1e-6
    assert rel_err(j_tape, j_ref) <= 1e-10, rel_err(j_tape, j_ref)
