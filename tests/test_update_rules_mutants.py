"""The student's update rules (:mod:`metapl.mpl.update_rules`) where hand-made mutants survived the
rest of the suite, each held to the real ``optimizer.step()`` or to hand arithmetic in float64:

- ``reference_update`` (what the double-backward oracle differentiates) has the factor's derivative
  -lr / eps at an exactly zero first gradient, not only the right value there;
- a complex parameter is refused in any param group, not only in the first;
- :func:`check_optimizer` refuses a state tensor on another device than its parameter.
"""

from __future__ import annotations

import pytest
import torch
from test_update_rules import DT, _gradients, _leaf_params
from torch import nn

from metapl.errors import ConfigError, UnsupportedOptimizerError
from metapl.mpl import reference_update, update_factors
from metapl.mpl.update_rules import check_optimizer

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-3),
        lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-3, centered=True),
        lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-3, momentum=0.5),
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-3),
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-3, amsgrad=True),
    ],
    ids=["rmsprop", "rmsprop_centered", "rmsprop_momentum", "adam", "adam_amsgrad"],
)
def test_reference_update_at_an_exactly_zero_first_gradient_has_the_factors_derivative(factory):
    """At g = 0 with empty state the step is -lr * g / (c|g| + eps): the parameter stays, and the
    derivative autograd takes of reference_update (the double-backward oracle's) is -lr / eps,
    the factor's. The value alone cannot tell: a second moment of 0 whose root was taken as 1
    (sqrt's convention at 0 in the reference step) moved nothing and gave -lr / (1 + eps)."""
    params = _leaf_params()
    opt = factory(params)
    grads = [g.requires_grad_(True) for g in _gradients(0)]
    grads[1] = torch.zeros_like(grads[1]).requires_grad_(True)
    new = reference_update(opt, grads)
    assert torch.equal(new[1].detach(), params[1].detach())
    (slope,) = torch.autograd.grad(new[1].sum(), grads[1])  # dU/dg is diagonal
    expected = torch.full_like(slope, -0.01 / 1e-3)
    torch.testing.assert_close(slope, expected, rtol=1e-12, atol=0)
    factor = update_factors(opt, params, [g.detach() for g in grads])[1]
    torch.testing.assert_close(torch.as_tensor(factor, dtype=DT).expand_as(slope), expected)


def test_a_complex_parameter_in_a_later_param_group_is_refused():
    """Every param group is searched for complex parameters, not the first one alone."""
    real = torch.zeros(2, requires_grad=True)
    cplx = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    opt = torch.optim.SGD([{"params": [real]}, {"params": [cplx]}], lr=0.1)
    grads = [torch.ones(2), torch.ones(2, dtype=torch.complex64)]
    with pytest.raises(UnsupportedOptimizerError, match="complex"):
        update_factors(opt, [real, cplx], grads)
    with pytest.raises(UnsupportedOptimizerError, match="complex"):
        reference_update(opt, grads)


def test_a_state_on_another_device_than_its_parameter_is_refused():
    """check_optimizer compares each state tensor's device with its parameter's, besides shape
    and dtype: a model moved after its optimizer's first steps leaves the state behind, and
    torch's step() then failed in the middle of the MPL step. Without a second device: meta."""
    model = nn.Linear(3, 2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3, dtype=DT)).sum().backward()
    opt.step()
    checked = check_optimizer("student", opt, model)
    state = opt.state[model.weight]
    state["momentum_buffer"] = state["momentum_buffer"].to("meta")
    match = r"state of 'weight' has 'momentum_buffer' of shape \(2, 3\), torch.float64 on meta"
    with pytest.raises(ConfigError, match=match):
        check_optimizer("student", opt, model, checked)
