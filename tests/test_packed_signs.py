"""PackedSigns keeps x > 0 at 1 bit an element, and sign_t's tangent from it is the backward
kernels' to the bit (on the GPU too: METAPL_TEST_DEVICE=cuda, as gpu_session.sh runs it)."""

import pytest
import torch
from mpl_helpers import TEST_DEVICE

from metapl.mpl.tangent_ops import PackedSigns, sign_t

aten = torch.ops.aten


def _with_zeros(shape, seed=0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x[x.abs() < 0.2] = 0  # exact zeros: not > 0
    return x.to(TEST_DEVICE)


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((3, 5, 7, 9), "contiguous"),
        ((3, 5, 7, 9), "channels_last"),
        ((2, 1, 4, 4), "channels_last"),  # one channel: strides that tie
        ((13,), "contiguous"),  # not a multiple of 8
        ((), "contiguous"),
        ((8, 6), "strided"),  # every other column: not dense
    ],
)
def test_unpack_gives_x_above_zero_in_xs_shape_and_layout(shape, layout):
    x = _with_zeros(shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = _with_zeros((8, 12))[:, ::2]
    signs = PackedSigns(x)
    positive = signs.unpack()
    assert positive.dtype == torch.bool and positive.shape == x.shape
    assert torch.equal(positive, x > 0)
    assert signs.bits.dtype == torch.uint8 and signs.bits.numel() == -(-x.numel() // 8)
    if layout == "channels_last":  # read in memory order: unpacked in the same layout
        assert positive.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("slope", [0.0, 0.2, -0.3])
def test_the_tangent_from_any_kept_value_is_the_backward_kernels(dtype, slope):
    x = _with_zeros((4, 3, 5, 5), seed=1).to(dtype)
    y = torch.nn.functional.leaky_relu(x, slope) if slope else torch.relu(x)
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(TEST_DEVICE, dtype)
    if slope == 0:
        want = aten.threshold_backward(dx, y, 0)
    else:
        want = aten.leaky_relu_backward(dx, x, slope, False)
    assert torch.equal(sign_t(dx, slope, PackedSigns(x), False), want)
    assert torch.equal(sign_t(dx, slope, x, False), want)
    if slope >= 0:  # the output has the input's sign
        assert torch.equal(sign_t(dx, slope, y, True), want)


def _three_exact_steps(autocast_dtype) -> list[torch.Tensor]:
    from metapl import MetaPseudoLabels
    from metapl.models import create_model

    torch.manual_seed(0)
    teacher, student = (
        create_model("small_cnn", 10, dropout=0.2).to(TEST_DEVICE) for _ in range(2)
    )
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9),
        torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True),
        jvp="tape",
        autocast_dtype=autocast_dtype,
    )
    g = torch.Generator().manual_seed(1)
    x_l, x_u = torch.randn(4, 3, 8, 8, generator=g), torch.randn(12, 3, 8, 8, generator=g)
    y_l = torch.randint(0, 10, (4,), generator=g)
    x_l, x_u, y_l = x_l.to(TEST_DEVICE), x_u.to(TEST_DEVICE), y_l.to(TEST_DEVICE)
    for _ in range(3):
        mpl.step(x_l, y_l, x_u)
    assert mpl.last_jvp_path == "tape"
    return [p.detach().clone() for p in (*teacher.parameters(), *student.parameters())]


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_training_with_packed_signs_is_training_with_the_input_to_the_bit(
    autocast_dtype, monkeypatch
):
    """small_cnn's last ReLU (before the pooling) keeps packed signs; reading its input instead
    (the rule before) trains both models to the same bits, in float32 and under bf16 autocast."""
    from metapl.mpl import tangent_rules

    with_signs = _three_exact_steps(autocast_dtype)
    choose = tangent_rules.TangentRules.choose_sign_sources

    def read_the_input(self, all_needs):
        choose(self, all_needs)
        assert self.signs  # (the case under test: signs were chosen somewhere)
        for _, x, _, source in self._sign_sources:
            if source[0] == ("signs", x):
                source[0] = x
        self.signs.clear()

    monkeypatch.setattr(tangent_rules.TangentRules, "choose_sign_sources", read_the_input)
    with_input = _three_exact_steps(autocast_dtype)
    assert all(torch.equal(a, b) for a, b in zip(with_signs, with_input))
