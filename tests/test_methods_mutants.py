"""Methods, mutation audit: what test_engine.py left open. Each baseline's optimizer step against a
reference (the gradient of *its whole loss*, views and label smoothing included), UDA's mask at
the threshold, the missing-view error, and build_method's mapping of a config to methods, models
and optimizers (App. C: Nesterov SGD, EfficientNet's RMSprop, the reduced teacher's Adam, no weight
decay on BN/biases, the teacher's own weight decay)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from test_engine import Recorder, _views

from metapl.errors import ConfigError, DataError
from metapl.methods import Batch, MPLMethod, SupervisedMethod, UDALoss, UDAMethod
from metapl.methods.build import build_method, make_optimizer
from metapl.methods.noisy_student import NoisyStudentMethod
from metapl.train.config import apply_overrides
from metapl.train.presets import load_preset

LR = 0.1
CPU = torch.device("cpu")


def _model() -> Recorder:
    torch.manual_seed(0)
    return Recorder(4).double()


def _reference_update(model: Recorder, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain SGD (lr 0.1) on ``loss_fn(logits_of)`` from the model's current weights."""
    w = model.fc.weight.detach().clone().requires_grad_()
    b = model.fc.bias.detach().clone().requires_grad_()
    loss = loss_fn(lambda x: F.linear(x.flatten(1), w, b))
    gw, gb = torch.autograd.grad(loss, [w, b])
    return w.detach() - LR * gw, b.detach() - LR * gb


def _assert_weights(model: Recorder, want: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(model.fc.weight.detach(), want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.fc.bias.detach(), want[1], rtol=1e-12, atol=1e-12)


# --- UDA ----------------------------------------------------------------------------------------


def test_uda_mask_keeps_an_example_exactly_at_the_threshold():
    """The mask is confidence >= threshold: an example whose confidence equals it counts."""
    weak = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.0, 0.0]], dtype=torch.float64)
    strong = torch.tensor([[0.3, 0.1, 0.0], [0.0, 0.2, 0.0]], dtype=torch.float64)
    conf = F.softmax(weak[0], -1).max().item()
    loss = UDALoss(factor=1.0, temperature=1.0, threshold=conf)(weak, strong, step=0)
    q = F.softmax(weak[0], -1)
    kl = (q * (q.log() - F.log_softmax(strong[0], -1))).sum()
    assert loss.item() == pytest.approx(kl.item() / 2, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),  # a NaN loss
        ({"threshold": 1.5}, "threshold must be in [0, 1]"),  # masked every example
        ({"factor": -1.0}, "factor must be a finite number >= 0"),
        ({"factor": float("nan")}, "factor must be a finite number >= 0"),
        ({"warmup_steps": 2.5}, "warmup_steps must be an integer"),
    ],
)
def test_uda_loss_built_by_hand_refuses_what_the_config_refuses(kwargs, message):
    """TrainConfig checks its uda_* keys; a UDALoss built by hand (the library's own UDA, named in
    examples/mpl_on_your_models.py) took these without a word."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        UDALoss(**kwargs)


def test_uda_views_of_other_examples_are_a_data_error():
    """torch's "The size of tensor a (8) must match the size of tensor b (6)" came through."""
    with pytest.raises(DataError, match=r"shapes \(8, 3\) and \(6, 3\): give both views"):
        UDALoss()(torch.zeros(8, 3), torch.zeros(6, 3), step=0)


def test_uda_loss_defaults_are_the_cifar10_column_of_table3():
    assert UDALoss() == UDALoss(factor=1.0, temperature=0.8, threshold=0.8, warmup_steps=0)


def test_uda_method_step_follows_the_gradient_of_supervised_plus_consistency():
    """One SGD step on CE(labeled) + UDA(weak -> strong); the weak view's target takes no
    gradient, the strong view's prediction does."""
    model = _model()
    uda = UDALoss(factor=3.0, temperature=0.7, threshold=0.0, warmup_steps=0)
    method = UDAMethod(model, torch.optim.SGD(model.parameters(), lr=LR), uda)
    b = _views(dtype=torch.float64)

    def loss(logits):
        target = F.softmax(logits(b.x_unlabeled_weak).detach() / 0.7, -1)
        log_p = F.log_softmax(logits(b.x_unlabeled_strong), -1)
        kl = (target * (target.log() - log_p)).sum(-1).mean()
        return F.cross_entropy(logits(b.x_labeled), b.y_labeled) + 3.0 * kl

    want = _reference_update(model, loss)
    metrics = method.step(b)
    _assert_weights(model, want)
    assert metrics["uda_consistency"] > 0


# --- NoisyStudent and the supervised baselines ---------------------------------------------------


def test_noisy_student_step_learns_labels_and_the_large_teachers_distributions():
    """CE(labeled, label smoothing) + CE(large teacher's distribution, strong unlabeled view), one
    forward on [labeled, unlabeled strong]."""
    model = _model()
    method = NoisyStudentMethod(
        model, torch.optim.SGD(model.parameters(), lr=LR), label_smoothing=0.2
    )
    assert method.views == ("unlabeled_strong",)
    b = _views(dtype=torch.float64)
    b.t_unlabeled = F.softmax(torch.randn(6, 3, dtype=torch.float64), -1)
    b.t_labeled = F.softmax(torch.randn(4, 3, dtype=torch.float64), -1)

    def supervised(logits):
        return F.cross_entropy(logits(b.x_labeled), b.y_labeled, label_smoothing=0.2)

    def distill(logits):
        return -(b.t_unlabeled * F.log_softmax(logits(b.x_unlabeled_strong), -1)).sum(-1).mean()

    want = _reference_update(model, lambda lg: supervised(lg) + distill(lg))
    with torch.no_grad():
        before = lambda x: model.fc(x.flatten(1))  # noqa: E731
        want_sup = supervised(before).item()
        want_distill = distill(before).item()
    model.seen.clear()
    metrics = method.step(b)
    (seen,) = model.seen
    assert torch.equal(seen, torch.cat([b.x_labeled, b.x_unlabeled_strong]))
    _assert_weights(model, want)
    assert metrics["student_supervised"].item() == pytest.approx(want_sup, rel=1e-12)
    assert metrics["student_distill"].item() == pytest.approx(want_distill, rel=1e-12)
    assert metrics["student_loss"].item() == pytest.approx(want_sup + want_distill, rel=1e-12)


@pytest.mark.parametrize("view", ["labeled_weak", "labeled_strong"])
def test_supervised_steps_on_its_view_with_label_smoothing(view):
    """Two steps (each from fresh gradients) of CE with label smoothing on the chosen view; the
    RandAugment row asks the engine for the strong view. Without autocast the step stays in the
    model's float64 (a bf16 autocast would be off by ~1e-3)."""
    model = _model()
    method = SupervisedMethod(
        model, torch.optim.SGD(model.parameters(), lr=LR), label_smoothing=0.3, labeled_view=view
    )
    assert method.views == (() if view == "labeled_weak" else (view,))
    b = _views(dtype=torch.float64)
    x = b.x_labeled if view == "labeled_weak" else b.x_labeled_strong
    for _ in range(2):
        want = _reference_update(
            model, lambda lg: F.cross_entropy(lg(x), b.y_labeled, label_smoothing=0.3)
        )
        method.step(b)
        _assert_weights(model, want)
    assert all(torch.equal(s, x) for s in model.seen)


def test_a_missing_view_is_a_clear_error():
    model = _model()
    method = SupervisedMethod(
        model, torch.optim.SGD(model.parameters(), lr=LR), labeled_view="labeled_strong"
    )
    b = Batch(x_labeled=torch.zeros(2, 1, 2, 2, dtype=torch.float64), y_labeled=torch.zeros(2))
    with pytest.raises(ValueError, match="labeled_strong"):
        method.step(b)


def _uda_method():
    model = _model()
    return UDAMethod(model, torch.optim.SGD(model.parameters(), lr=LR), UDALoss())


def _noisy_student():
    model = _model()
    return NoisyStudentMethod(model, torch.optim.SGD(model.parameters(), lr=LR))


def _uda_mpl():
    teacher, student = _model(), _model()
    return MPLMethod(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=LR),
        torch.optim.SGD(student.parameters(), lr=LR),
        unlabeled_view="unlabeled_strong",
        uda=UDALoss(),
    )


@pytest.mark.parametrize(
    "make, missing, match",
    [
        (_uda_method, "x_unlabeled_weak", "unlabeled_weak view"),
        (_uda_method, "x_unlabeled_strong", "unlabeled_strong view"),
        (_noisy_student, "x_unlabeled_strong", "unlabeled_strong view"),
        (_noisy_student, "t_unlabeled", "t_unlabeled"),
        (_uda_mpl, "x_unlabeled_weak", "unlabeled_weak view"),
    ],
)
def test_every_method_names_what_its_batch_lacks(make, missing, match):
    """UDA, NoisyStudent and UDA+MPL name a missing view (or the large teacher's distributions)
    as SupervisedMethod does, not a TypeError from inside torch.cat or a loss."""
    method = make()
    b = _views(dtype=torch.float64)
    b.t_unlabeled = F.softmax(torch.randn(6, 3, dtype=torch.float64), -1)
    setattr(b, missing, None)
    with pytest.raises(ValueError, match=match):
        method.step(b)


# --- build_method: from a config row to a method -------------------------------------------------


def _cfg(method: str, **overrides):
    """The digits preset (digits_cnn), with every value this file checks made distinct."""
    base = dict(
        method=method,
        device="cpu",
        student_dropout=0.15,
        teacher_dropout=0.45,
        label_smoothing=0.05,
        uda_factor=2.5,
        uda_temperature=0.6,
        uda_threshold=0.7,
        uda_warmup_steps=33,
        mpl_temperature=0.9,
        teacher_hidden=24,
    )
    return apply_overrides(load_preset("digits-uda-mpl"), {**base, **overrides})


def test_make_optimizer_follows_appendix_c():
    cfg = _cfg("supervised", momentum=0.8)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    sgd = make_optimizer("sgd", model, 0.3, 7e-4, cfg)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] is True
    assert [g["weight_decay"] for g in sgd.param_groups] == [7e-4, 0.0]
    assert [len(g["params"]) for g in sgd.param_groups] == [1, 3]  # conv kernel | bias, BN
    plain = make_optimizer("sgd", model, 0.3, 0.0, _cfg("supervised", momentum=0.0))
    assert plain.defaults["nesterov"] is False  # PyTorch refuses Nesterov without momentum
    rms = make_optimizer("rmsprop", model, 0.3, 7e-4, cfg)
    assert isinstance(rms, torch.optim.RMSprop)
    assert (rms.defaults["alpha"], rms.defaults["eps"], rms.defaults["momentum"]) == (
        0.9,
        1e-3,
        0.9,
    )
    adam = make_optimizer("adam", model, 0.3, 7e-4, cfg)
    assert isinstance(adam, torch.optim.Adam)
    assert adam.defaults["betas"] == (0.9, 0.999) and adam.defaults["eps"] == 1e-7
    assert [g["weight_decay"] for g in adam.param_groups] == [7e-4, 0.0]


@pytest.mark.parametrize(
    "method, kind, view",
    [
        ("supervised", SupervisedMethod, "labeled_weak"),
        ("label_smoothing", SupervisedMethod, "labeled_weak"),
        ("randaugment", SupervisedMethod, "labeled_strong"),
        ("uda", UDAMethod, None),
        ("noisy_student", NoisyStudentMethod, None),
    ],
)
def test_build_baselines(method, kind, view):
    built = build_method(_cfg(method), 10, CPU)
    assert type(built) is kind
    assert built.models["student"].dropout.p == 0.15
    assert built.label_smoothing == 0.05
    if view is not None:
        assert built.labeled_view == view
    if kind is UDAMethod:
        assert built.uda == UDALoss(2.5, 0.6, 0.7, 33)


@pytest.mark.parametrize(
    "method, views",
    [
        ("supervised_mpl", ("labeled_weak", "unlabeled_weak")),
        ("randaugment_mpl", ("labeled_strong", "unlabeled_strong")),
        ("uda_mpl", ("labeled_weak", "unlabeled_strong")),
        ("reduced_mpl", ("labeled_weak", "unlabeled_strong")),
    ],
)
def test_build_mpl_rows(method, views):
    cfg = _cfg(method, teacher_optimizer="adam", teacher_weight_decay=0.0, precision="bf16")
    built = build_method(cfg, 10, CPU)
    assert type(built) is MPLMethod
    assert (built.labeled_view, built.unlabeled_view) == views
    assert built.uda == (UDALoss(2.5, 0.6, 0.7, 33) if method == "uda_mpl" else None)
    assert built.teacher_sees_distributions == (method == "reduced_mpl")
    teacher, student = built.models["teacher"], built.models["student"]
    assert student.dropout.p == 0.15
    if method == "reduced_mpl":  # the calibration MLP, hidden width teacher_hidden
        assert teacher.mlp.dropout.p == 0.45 and teacher.mlp.hidden[0].out_features == 24
    else:
        assert teacher.dropout.p == 0.45
    t_opt, s_opt = built.optimizers["teacher"], built.optimizers["student"]
    assert isinstance(t_opt, torch.optim.Adam) and isinstance(s_opt, torch.optim.SGD)
    # teacher_weight_decay 0 is the teacher's own value (only < 0 falls back to weight_decay)
    assert [g["weight_decay"] for g in t_opt.param_groups] == [0.0, 0.0]
    assert [g["weight_decay"] for g in s_opt.param_groups] == [cfg.weight_decay, 0.0]
    mpl = built.mpl
    assert (mpl.temperature, mpl.label_smoothing) == (0.9, 0.05)
    assert mpl.autocast_dtype == torch.bfloat16


def test_teacher_weight_decay_falls_back_to_weight_decay_when_negative():
    built = build_method(_cfg("supervised_mpl", teacher_weight_decay=-1.0), 10, CPU)
    decays = [g["weight_decay"] for g in built.optimizers["teacher"].param_groups]
    assert decays == [5e-4, 0.0]


def test_uda_mpl_teachers_uda_term_ramps_with_the_step_count():
    """The teacher's UDA weight follows the step: the second step's term is uda(..., step=1)."""
    torch.manual_seed(0)
    teacher, student = Recorder(4).double(), Recorder(4).double()
    uda = UDALoss(factor=4.0, temperature=0.8, threshold=0.0, warmup_steps=4)
    method = MPLMethod(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=LR),
        torch.optim.SGD(student.parameters(), lr=LR),
        unlabeled_view="unlabeled_strong",
        uda=uda,
    )
    b = _views(dtype=torch.float64)
    method.step(b)
    w = teacher.fc.weight.detach().clone(), teacher.fc.bias.detach().clone()
    metrics = method.step(b)
    logits = lambda x: F.linear(x.flatten(1), *w)  # noqa: E731
    want = uda(logits(b.x_unlabeled_weak), logits(b.x_unlabeled_strong), 1)
    assert uda.weight(1) == 2.0 and uda.weight(0) == 1.0
    assert metrics["teacher_extra"].item() == pytest.approx(want.item(), rel=1e-9)


@pytest.mark.parametrize(
    "estimator, decay, reaches",
    [
        ("first_order", 0.5, 0.5),
        ("first_order", 0.0, 0.0),  # a baseline of the last reward, not none
        ("first_order", -2.0, None),  # any negative value: no baseline
        ("first_order", -1.0, None),  # the default
        # a preset file's decay with the exact estimator (--set refuses it) is dropped, as
        # mpl_jvp's with another estimator: the library would refuse it in its own words
        ("exact", 0.9, None),
    ],
)
def test_the_baseline_decay_reaches_the_first_order_step(estimator, decay, reaches):
    cfg = _cfg("uda_mpl", mpl_estimator=estimator, mpl_baseline_decay=decay)
    assert build_method(cfg, 10, CPU).mpl.baseline_decay == reaches
