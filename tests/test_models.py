"""Models: registry, sizes, shapes, BatchNorm settings, the forward-mode JVP the exact MPL step
runs through the student (checked against finite differences), channels_last + bf16 autocast, and
the weight-decay parameter groups."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch import nn
from torch.func import functional_call

from metapl.errors import ConfigError
from metapl.models import create_model, list_models, param_groups_for_weight_decay

# name -> (num_classes, example input shape, extra kwargs) for the models cheap enough on a CPU.
SMALL = {
    "wrn28_2": (10, (2, 3, 32, 32), {}),
    "digits_cnn": (10, (6, 1, 8, 8), {}),
    "small_cnn": (5, (3, 3, 8, 8), {}),
    "mlp": (3, (5, 4), {"in_features": 4, "hidden": 16, "depth": 3}),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_models():
    assert {"wrn28_2", "wrn28_8", "resnet50", "digits_cnn", "mlp"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_is_config_error_listing_known():
    with pytest.raises(ConfigError, match="wrn28_2") as err:
        create_model("wrn_28_2", 10)
    assert "resnet50" in str(err.value) and "digits_cnn" in str(err.value)


def test_unknown_option_is_config_error():
    with pytest.raises(ConfigError, match="dropout"):
        create_model("digits_cnn", 10, drop_out=0.1)
    with pytest.raises(ConfigError, match="^num_classes must be >= 1, got 0"):
        create_model("mlp", 0)


@pytest.mark.parametrize(
    "name, num_classes, lo, hi",
    [("wrn28_2", 10, 1.4e6, 1.6e6), ("resnet50", 1000, 25e6, 26e6), ("wrn28_8", 10, 23e6, 24e6)],
)
def test_parameter_counts(name, num_classes, lo, hi):
    assert lo <= n_params(create_model(name, num_classes)) <= hi


def test_wrn28_2_exact_count():
    # The WRN-28-2 of MixMatch/FixMatch/UDA for 10 classes.
    assert n_params(create_model("wrn28_2", 10)) == 1_467_610


@pytest.mark.parametrize("name", sorted(SMALL))
def test_output_shape_and_bn_momentum(name):
    num_classes, shape, kw = SMALL[name]
    model = create_model(name, num_classes, **kw)
    assert model(torch.randn(shape)).shape == (shape[0], num_classes)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.momentum == pytest.approx(0.01)  # TF decay 0.99


def test_mlp_maps_the_last_axis():
    model = create_model("mlp", 3, in_features=2)
    assert model(torch.randn(4, 7, 2)).shape == (4, 7, 3)


def test_resnet50_forward_64px():
    model = create_model("resnet50", 1000, dropout=0.1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_dropout_is_active_in_train_only(name):
    num_classes, shape, kw = SMALL[name]
    model = create_model(name, num_classes, dropout=0.5, **kw)
    x = torch.randn(shape)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def _jvp_and_finite_difference(model: nn.Module, x: torch.Tensor, seed: int = 0):
    """The JVP of the logits along a random direction in parameter space, by forward-mode AD
    through ``functional_call`` (as the exact MPL step does) and by central differences. Every pass
    reseeds the RNG (same dropout mask) and runs on copies of the buffers (train-mode BN)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    tangents = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}

    def f(weights):
        torch.manual_seed(seed)
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        return functional_call(model, {**buffers, **weights}, (x,))

    with fwad.dual_level():
        duals = {n: fwad.make_dual(p, tangents[n]) for n, p in params.items()}
        jvp = fwad.unpack_dual(f(duals)).tangent
    eps = 1e-6
    plus = f({n: p + eps * tangents[n] for n, p in params.items()})
    minus = f({n: p - eps * tangents[n] for n, p in params.items()})
    return jvp, (plus - minus) / (2 * eps)


# Central differences across a (leaky) ReLU kink are off by O(step), and WRN-28-2 has ~10^6
# activations, so some always sit within a step of their kink: its FD check uses slope 1 (no kinks;
# convolutions, shortcuts and batch-statistics BatchNorm unchanged). The adjoint test below checks
# the JVP of the real activations exactly.
SMOOTH = {"wrn28_2": {"leaky_slope": 1.0}}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_mode_jvp_matches_finite_differences(name):
    num_classes, shape, kw = SMALL[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes, dropout=0.0, **kw, **SMOOTH.get(name, {}))
    model = model.double().train()
    x = torch.randn(shape, dtype=torch.float64)
    jvp, fd = _jvp_and_finite_difference(model, x)
    assert jvp is not None and jvp.shape == (shape[0], num_classes)
    torch.testing.assert_close(jvp, fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_mode_jvp_is_adjoint_of_backward(name):
    """<u, J t> (forward mode) == <J^T u, t> (reverse mode), with the real activations."""
    num_classes, shape, kw = SMALL[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes, dropout=0.0, **kw).double().train()
    x = torch.randn(shape, dtype=torch.float64)
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with fwad.dual_level():
        duals = {n: fwad.make_dual(p.detach(), tangents[n]) for n, p in params.items()}
        jvp = fwad.unpack_dual(functional_call(model, {**buffers, **duals}, (x,))).tangent
    u = torch.randn_like(jvp)
    out = functional_call(model, {**buffers, **params}, (x,))
    grads = torch.autograd.grad((out * u).sum(), list(params.values()))
    vjp_t = sum((g * tangents[n]).sum() for g, n in zip(grads, params))
    torch.testing.assert_close((u * jvp).sum(), vjp_t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["digits_cnn", "mlp"])
def test_forward_mode_jvp_with_replayed_dropout(name):
    num_classes, shape, kw = SMALL[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes, dropout=0.3, **kw).double().train()
    x = torch.randn(shape, dtype=torch.float64)
    jvp, fd = _jvp_and_finite_difference(model, x)
    torch.testing.assert_close(jvp, fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["wrn28_2", "digits_cnn"])
def test_channels_last_and_bf16_autocast(name):
    num_classes, shape, kw = SMALL[name]
    model = create_model(name, num_classes, dropout=0.2, **kw).to(memory_format=torch.channels_last)
    x = torch.rand(shape).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (shape[0], num_classes) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mlp_bf16_autocast():
    model = create_model("mlp", 3, in_features=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(5, 4))
    assert out.shape == (5, 3) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_param_groups_decay_only_conv_and_linear_weights(name):
    num_classes, _, kw = SMALL[name]
    model = create_model(name, num_classes, **kw)
    decay, no_decay = param_groups_for_weight_decay(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert {id(p) for p in decay["params"]} == kernels
    assert all(p.dim() > 1 for p in decay["params"])
    others = {id(p) for p in model.parameters()} - kernels
    assert {id(p) for p in no_decay["params"]} == others
    for m in model.modules():  # BN scale/shift and every bias are undecayed
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert id(m.weight) in others and id(m.bias) in others
        if getattr(m, "bias", None) is not None:
            assert id(m.bias) in others
    torch.optim.SGD(param_groups_for_weight_decay(model, 5e-4), lr=0.1, momentum=0.9)


def test_param_groups_skip_frozen_parameters():
    model = create_model("mlp", 2)
    model.fc.weight.requires_grad_(False)
    groups = param_groups_for_weight_decay(model, 1e-4)
    assert all(p is not model.fc.weight for g in groups for p in g["params"])
