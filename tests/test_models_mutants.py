"""Models, second mutation audit: what test_models.py and test_efficientnet.py left open. Forward
passes against reference computations written with torch.nn.functional from the state dict (eval
mode, random BatchNorm statistics so that epsilon and every affine parameter matter), where the
dropout sits, feature-map sizes, initialization scales, ResNet's zero-init residual, and the weight
decay groups of modules other than the registered models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metapl.models import create_model, param_groups_for_weight_decay, registry

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics (eps then changes the output by ~1e-3 relative) and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return model.eval()


def _bn(sd: dict, prefix: str, h: torch.Tensor, eps: float) -> torch.Tensor:
    return F.batch_norm(
        h,
        sd[prefix + ".running_mean"],
        sd[prefix + ".running_var"],
        sd[prefix + ".weight"],
        sd[prefix + ".bias"],
        False,
        0.0,
        eps,
    )


def _model(name: str, num_classes: int = 10, **kw) -> nn.Module:
    """A float64 model in eval mode with random BN statistics."""
    torch.manual_seed(0)
    return _randomize_bn(create_model(name, num_classes, **kw).double())


# --- WRN-28-2 -----------------------------------------------------------------------------------


def _reference_wrn28(sd: dict, x: torch.Tensor, slope: float = 0.2, eps: float = 1e-3):
    """Pre-activation WRN-28: stem conv; 3 groups x 4 blocks of BN-act-conv3x3(stride)-BN-act-
    conv3x3, the 1x1 shortcut reading the *activated* input, stride 2 on the first block of
    groups 2 and 3; then BN-act, global average pool, linear. Leaky ReLU 0.2, BN eps 1e-3."""
    act = lambda h: F.leaky_relu(h, slope)  # noqa: E731
    h = F.conv2d(x, sd["stem.weight"], padding=1)
    for b in range(12):
        p = f"blocks.{b}."
        stride = 2 if b in (4, 8) else 1
        a = act(_bn(sd, p + "bn1", h, eps))
        out = F.conv2d(a, sd[p + "conv1.weight"], stride=stride, padding=1)
        out = F.conv2d(act(_bn(sd, p + "bn2", out, eps)), sd[p + "conv2.weight"], padding=1)
        shortcut = sd.get(p + "shortcut.weight")
        h = out + (h if shortcut is None else F.conv2d(a, shortcut, stride=stride))
    feats = act(_bn(sd, "bn", h, eps)).mean(dim=(2, 3))
    return F.linear(feats, sd["fc.weight"], sd["fc.bias"]), h


@pytest.mark.parametrize(
    "options, slope, eps", [({}, 0.2, 1e-3), ({"leaky_slope": 0.1, "bn_eps": 1e-5}, 0.1, 1e-5)]
)
def test_wrn28_2_matches_a_reference_forward(options, slope, eps):
    model = _model("wrn28_2", **options)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want, last = _reference_wrn28(model.state_dict(), x, slope, eps)
    assert last.shape == (2, 128, 8, 8)  # 32 -> 32 -> 16 -> 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-9, atol=1e-9)


# --- ResNet-50 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet():
    return _model("resnet50", 10)


def _reference_bottleneck(sd: dict, p: str, x: torch.Tensor, stride: int, eps: float = 1e-5):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1-BN, + (projected) input, ReLU."""
    out = F.relu(_bn(sd, p + "bn1", F.conv2d(x, sd[p + "conv1.weight"]), eps))
    out = F.conv2d(out, sd[p + "conv2.weight"], stride=stride, padding=1)
    out = _bn(
        sd, p + "bn3", F.conv2d(F.relu(_bn(sd, p + "bn2", out, eps)), sd[p + "conv3.weight"]), eps
    )
    if p + "shortcut.0.weight" in sd:
        x = _bn(sd, p + "shortcut.1", F.conv2d(x, sd[p + "shortcut.0.weight"], stride=stride), eps)
    return F.relu(out + x)


def test_resnet50_blocks_stem_and_head_match_references(resnet):
    """The stride sits on the 3x3 conv of a bottleneck (ResNet v1.5), BN eps 1e-5, a ReLU after
    the addition; a 64 px input is 16 px after the stem (conv/2 + max-pool/2) and 2 px after the
    last stage; the head averages the last feature map."""
    sd = resnet.state_dict()
    seen = {}
    hooks = [
        resnet.stem.register_forward_hook(lambda m, i, o: seen.__setitem__("stem", o)),
        resnet.blocks.register_forward_hook(lambda m, i, o: seen.__setitem__("blocks", o)),
        resnet.blocks[3].register_forward_hook(lambda m, i, o: seen.__setitem__("b3", (i[0], o))),
        resnet.blocks[4].register_forward_hook(lambda m, i, o: seen.__setitem__("b4", (i[0], o))),
        resnet.fc.register_forward_hook(lambda m, i, o: seen.__setitem__("fc", i[0])),
    ]
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        resnet(x)
    for h in hooks:
        h.remove()
    assert seen["stem"].shape[-2:] == (16, 16) and seen["blocks"].shape[-2:] == (2, 2)
    for name, stride in (("b3", 2), ("b4", 1)):  # first block of stage 2, and its second one
        inp, out = seen[name]
        want = _reference_bottleneck(sd, f"blocks.{name[1]}.", inp, stride)
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(seen["fc"], seen["blocks"].mean(dim=(2, 3)), rtol=0, atol=1e-12)


def test_resnet50_zero_init_residual_makes_every_block_start_as_the_identity():
    """With the last BN scale of each block at 0 (and shift 0), a block without projection maps
    its (non-negative) input to itself; off by default."""
    torch.manual_seed(0)
    model = create_model("resnet50", 10, zero_init_residual=True).eval()
    x = F.relu(torch.randn(1, 256, 8, 8))
    with torch.no_grad():
        for b in (1, 2):  # the blocks of stage 1 without a projection shortcut
            assert torch.equal(model.blocks[b](x), x)
    assert all(not blk.bn3.weight.any() for blk in model.blocks)
    assert all(blk.bn2.weight.all() for blk in model.blocks)
    assert all(blk.bn3.weight.all() for blk in create_model("resnet50", 10).blocks)


# --- EfficientNet-B0 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def b0():
    return _model("efficientnet_b0", 10)


def _reference_mbconv(sd: dict, p: str, x: torch.Tensor, kernel: int, eps: float = 1e-3):
    """1x1 expand-BN-SiLU, depthwise kxk-BN-SiLU, squeeze-excite (mean pool, 1x1 + SiLU, 1x1 +
    sigmoid gate), 1x1 project-BN, + input (a stride-1 block keeping its width)."""
    h = F.silu(_bn(sd, p + "expand.1", F.conv2d(x, sd[p + "expand.0.weight"]), eps))
    w = sd[p + "depthwise.weight"]
    h = F.conv2d(h, w, padding=kernel // 2, groups=w.shape[0])
    h = F.silu(_bn(sd, p + "bn_depthwise", h, eps))
    s = F.silu(F.conv2d(h.mean(dim=(2, 3), keepdim=True), sd[p + "se.reduce.weight"],
                        sd[p + "se.reduce.bias"]))  # fmt: skip
    h = h * torch.sigmoid(F.conv2d(s, sd[p + "se.expand.weight"], sd[p + "se.expand.bias"]))
    return x + _bn(sd, p + "bn_project", F.conv2d(h, sd[p + "project.weight"]), eps)


def test_efficientnet_b0_block_and_head_match_references(b0):
    sd = b0.state_dict()
    seen = {}
    hooks = [
        b0.blocks[2].register_forward_hook(lambda m, i, o: seen.__setitem__("b2", (i[0], o))),
        b0.blocks[4].register_forward_hook(lambda m, i, o: seen.__setitem__("b4", (i[0], o))),
        b0.blocks.register_forward_hook(lambda m, i, o: seen.__setitem__("blocks", o)),
        b0.fc.register_forward_hook(lambda m, i, o: seen.__setitem__("fc", i[0])),
    ]
    with torch.no_grad():
        b0(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    for h in hooks:
        h.remove()
    for name, kernel in (("b2", 3), ("b4", 5)):
        inp, out = seen[name]
        want = _reference_mbconv(sd, f"blocks.{name[1]}.", inp, kernel)
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    head = F.silu(_bn(sd, "head.1", F.conv2d(seen["blocks"], sd["head.0.weight"]), 1e-3))
    torch.testing.assert_close(seen["fc"], head.mean(dim=(2, 3)), rtol=1e-9, atol=1e-9)


def test_stochastic_depth_drops_only_the_residual_branch(b0):
    """In training, a residual block returns x + branch * mask / keep with one mask entry per
    example drawn by torch.rand (so x itself is never dropped nor rescaled)."""
    block = b0.blocks[2]
    x = torch.randn(64, 24, 4, 4, dtype=torch.float64)
    block.train()
    try:
        rate = block.drop_path_rate
        block.drop_path_rate = 0.0
        branch = block(x) - x  # train-mode BN: the branch depends on the batch only
        block.drop_path_rate = 0.5
        torch.manual_seed(3)
        got = block(x)
        torch.manual_seed(3)
        mask = (torch.rand(64, 1, 1, 1) < 0.5).double()
    finally:
        block.drop_path_rate = rate
        b0.eval()
    torch.testing.assert_close(got, x + branch * mask / 0.5, rtol=1e-9, atol=1e-9)
    assert 0 < mask.sum() < 64


def test_efficientnet_drop_path_option_sets_the_rates():
    model = create_model("efficientnet_b0", 10, drop_path=0.4)
    assert [b.drop_path_rate for b in model.blocks] == pytest.approx(
        [0.4 * i / 16 for i in range(16)]
    )


# --- the small models ---------------------------------------------------------------------------


def test_digits_cnn_matches_a_reference_forward():
    """conv3x3-BN-ReLU (w), conv3x3/2-BN-ReLU (2w: 8x8 -> 4x4), conv3x3-BN-ReLU (4w), mean pool,
    linear; BN eps 1e-5 (PyTorch's default)."""
    model = _model("digits_cnn", 10, width=4)
    sd = model.state_dict()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    h = F.relu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], padding=1), 1e-5))
    h = F.relu(_bn(sd, "bn2", F.conv2d(h, sd["conv2.weight"], stride=2, padding=1), 1e-5))
    h = F.relu(_bn(sd, "bn3", F.conv2d(h, sd["conv3.weight"], padding=1), 1e-5))
    assert h.shape[-2:] == (4, 4)
    want = F.linear(h.mean(dim=(2, 3)), sd["fc.weight"], sd["fc.bias"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-9, atol=1e-9)


def test_small_model_widths_and_mlp_depth():
    """digits_cnn_large is 3x the digits CNN (width 48), small_cnn has width 32; ``depth`` counts
    the hidden ReLU layers (the reduced teacher's default 4: "a 5-layered MLP")."""
    assert create_model("digits_cnn_large", 10).num_features == 4 * 48
    assert create_model("small_cnn", 10).num_features == 4 * 32
    linears = lambda m: [x for x in m.modules() if isinstance(x, nn.Linear)]  # noqa: E731
    assert len(linears(create_model("mlp", 3, depth=3))) == 4
    assert len(linears(create_model("reduced_teacher", 10))) == 5


def test_reduced_teacher_is_finite_on_one_hot_distributions():
    """A large teacher's distribution may contain exact zeros: log is taken of clamped probs."""
    model = create_model("reduced_teacher", 4)
    out = model(torch.eye(4))
    assert torch.isfinite(out).all() and (out.argmax(-1) == torch.arange(4)).all()


# --- where the dropout sits ---------------------------------------------------------------------

DROPOUT_MODELS = {
    "wrn28_2": (3, (2, 3, 32, 32), {}),
    "digits_cnn": (10, (6, 1, 8, 8), {}),
    "mlp": (3, (5, 4), {"in_features": 4, "hidden": 16}),
    "efficientnet_b0": (3, (2, 3, 32, 32), {"drop_path": 0.0}),
}


@pytest.mark.parametrize("name", sorted(DROPOUT_MODELS))
def test_dropout_acts_on_the_features_just_before_the_classifier(name):
    """With everything else in eval mode, the classifier's input in a dropout pass is the eval
    features with some entries zeroed and the others scaled by 1 / (1 - p)."""
    num_classes, shape, kw = DROPOUT_MODELS[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes, dropout=0.5, **kw).double().eval()
    seen = []
    model.fc.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        model(x)
        model.dropout.train()
        torch.manual_seed(1)
        model(x)
    (feats, _), (dropped, out) = seen
    kept = dropped != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(dropped[kept], 2 * feats[kept], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, F.linear(dropped, model.fc.weight, model.fc.bias))


# --- initialization -----------------------------------------------------------------------------


def test_conv_and_dense_initialization_scales():
    """He normal in fan-out mode for convolutions (std sqrt(2 / (k * k * c_out))), dense kernels
    U(+-1/sqrt(c_out)) with zero bias, as the MPL/WRN reference; the MLP's hidden layers are He
    normal in fan-in mode (std sqrt(2 / fan_in))."""
    torch.manual_seed(0)
    wrn = create_model("wrn28_2", 10)
    assert wrn.stem.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 16)), rel=0.15)
    shortcut = wrn.blocks[4].shortcut.weight  # 1x1, 32 -> 64
    assert shortcut.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.1)
    bound = 1 / math.sqrt(10)
    assert 0.9 * bound < wrn.fc.weight.abs().max() <= bound and not wrn.fc.bias.any()
    hidden = create_model("mlp", 3, in_features=64, hidden=512, depth=1).hidden[0]
    assert hidden.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    assert not hidden.bias.any()


# --- weight decay groups and the registry -------------------------------------------------------


def test_param_groups_for_any_conv_and_linear_and_shared_parameters_once():
    """Every convolution (1-D too) and linear weight is decayed; other matrices (an embedding)
    are not; a weight tied between two layers appears once."""
    lin, tied = nn.Linear(3, 3), nn.Linear(3, 3)
    tied.weight = lin.weight
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Embedding(4, 3), nn.LayerNorm(3), lin, tied)
    decay, no_decay = param_groups_for_weight_decay(model, 0.1)
    assert [id(p) for p in decay["params"]] == [id(model[0].weight), id(lin.weight)]
    others = [model[0].bias, model[1].weight, model[2].weight, model[2].bias, lin.bias, tied.bias]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in others]
    torch.optim.SGD(param_groups_for_weight_decay(model, 0.1), lr=0.1)


def test_registering_a_name_twice_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    def wrn28_2(num_classes: int) -> nn.Module:
        return nn.Linear(1, num_classes)

    with pytest.raises(RuntimeError, match="wrn28_2"):
        registry.register_model(wrn28_2)
