"""J's two paths (:mod:`metapl.mpl.jvp`) where hand-made mutants survived the rest of the suite:

- the first-use check of a traced graph's backward draws a random cotangent of the logits: a
  plain sum of them is blind where the logits sum to a constant over the classes (centered
  logits, which softmax does not see), and a graph that traced through another backward trained
  the student there (before forward AD's J told it apart).
"""

from __future__ import annotations

import pytest
import torch
from test_custom_functions import DT, Net, StraightThrough, _state, _steps
from torch import Tensor

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class CenteredNet(Net):
    """Net with logits centered over the classes: their sum is 0 whatever the weights."""

    def forward(self, x: Tensor) -> Tensor:
        z = super().forward(x)
        return z - z.mean(dim=-1, keepdim=True)


def _centered_steps(jvp: str, steps: int = 2):
    torch.manual_seed(1)
    return _steps(None, steps, student=CenteredNet(StraightThrough).to(DT), jvp=jvp)


def test_a_graph_with_another_backward_is_seen_where_the_logits_sum_to_a_constant():
    with pytest.warns(UserWarning, match="backward differs"):
        auto, paths = _centered_steps("auto")
    assert paths == ["forward_ad"] * 2 and "backward differs" in auto.jvp_fallback_reason
    ref, _ = _centered_steps("forward_ad")
    assert torch.equal(_state(auto), _state(ref))  # the student trained by its own backward
