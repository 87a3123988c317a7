"""The training engine on tiny data, and the methods it drives.

- CIFAR-10 and SVHN presets end to end on tiny files in the official formats (tests/fake_datasets.py),
  with a 3-channel version of the digits CNN registered here: no built-in model is both RGB and cheap
  enough on a CPU (``digits_cnn`` has ``in_chans=1`` and config keys cannot change it; WRN-28-2 would
  spend tens of seconds evaluating the 4,000 labeled images).
- Resume after an interruption at a step between two checkpoints, with EMA and both MPL estimators.
- The guard against non-finite weights reaching a checkpoint.
- Methods: UDA's loss (KL, mask, warm-up) and what UDA+MPL feeds the teacher and the student.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import for_preset
from fake_datasets import write_cifar10, write_svhn
from torch import Tensor, nn

from metapl.cli import main
from metapl.errors import NonFiniteLossError
from metapl.methods import Batch, MPLMethod, UDALoss, UDAMethod
from metapl.methods.build import build_method
from metapl.models import list_models, register_model
from metapl.models.small import DigitsCNN
from metapl.train import engine
from metapl.train import run as live_run
from metapl.train.checkpoint import load_checkpoint
from metapl.train.config import apply_overrides
from metapl.train.guards import check_finite_weights
from metapl.train.presets import load_preset

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def rgb_tiny_cnn(num_classes: int, dropout: float = 0.0) -> nn.Module:
    """The digits CNN at width 4 on RGB input: cheap on 32x32 images."""
    return DigitsCNN(num_classes, width=4, dropout=dropout, in_chans=3)


if "rgb_tiny_cnn" not in list_models():
    register_model(rgb_tiny_cnn)


# --- 8. CIFAR-10 and SVHN presets on tiny files --------------------------------------------------


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), per_batch=800, test=60)


@pytest.fixture(scope="module")
def svhn_root(tmp_path_factory):
    return write_svhn(tmp_path_factory.mktemp("svhn"), train=1000, test=40)


SMALL = ["--set", "model=rgb_tiny_cnn", "--set", "batch_size=4", "--set", "unlabeled_ratio=2"]
SMALL += ["--set", "warmup_steps=1", "--set", "eval_batch_size=2000", "--device", "cpu"]


def test_cifar10_uda_mpl_preset_trains_on_tiny_files(tmp_path, cifar_root, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "cifar10-4k-uda-mpl", "--data-dir", str(cifar_root)]
    assert main([*args, "--out", str(out), "--steps", "3", "--quiet", *SMALL]) == 0
    assert "cifar10-4k-uda-mpl: test accuracy" in capsys.readouterr().out
    (record,) = json.loads((out / "results.json").read_text())["results"]
    assert record["method"] == "uda_mpl" and record["dataset"] == "cifar10-4k"
    for key in ("accuracy", "student_labeled_accuracy", "teacher_labeled_accuracy"):
        assert 0.0 <= record[key] <= 1.0
    # Accuracies are fractions of the test (60) and labeled (4,000) images; the 400 tuning images
    # are labeled ones this run trained on, so no "tune_accuracy" reads as a held-out accuracy
    assert (record["accuracy"] * 60) == pytest.approx(round(record["accuracy"] * 60))
    labeled = record["student_labeled_accuracy"] * 4000
    assert labeled == pytest.approx(round(labeled)) and "tune_accuracy" not in record
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["student"]["conv1.weight"].shape[1] == 3
    assert ckpt["config"]["data_dir"] == str(cifar_root)


def test_cifar10_tuning_view_tests_on_the_400_tuning_images(tmp_path, cifar_root):
    out = tmp_path / "run"
    args = ["train", "--preset", "cifar10-4k-supervised", "--data-dir", str(cifar_root)]
    args += ["--out", str(out), "--steps", "2", "--quiet", "--set", "tuning=true"]
    args += for_preset("cifar10-4k-supervised", SMALL)
    assert main(args) == 0
    (record,) = json.loads((out / "results.json").read_text())["results"]
    assert record["dataset"] == "cifar10-4k-tune" and "tune_accuracy" not in record
    assert (record["accuracy"] * 400) == pytest.approx(round(record["accuracy"] * 400))


def test_svhn_randaugment_mpl_preset_trains_on_tiny_files(tmp_path, svhn_root):
    out = tmp_path / "run"
    args = ["train", "--preset", "svhn-1k-randaugment-mpl", "--data-dir", str(svhn_root)]
    assert main([*args, "--out", str(out), "--steps", "2", "--quiet", *SMALL]) == 0
    (record,) = json.loads((out / "results.json").read_text())["results"]
    assert (record["method"], record["dataset"], record["steps"]) == (
        "randaugment_mpl",
        "svhn-1k",
        2,
    )
    assert 0.0 <= record["accuracy"] <= 1.0 and "tune_accuracy" not in record
    assert (record["accuracy"] * 40) == pytest.approx(round(record["accuracy"] * 40))


# --- resume: interrupted between checkpoints, in process -----------------------------------------


def _digits_config(**overrides):
    base = dict(
        steps=14,
        warmup_steps=2,
        batch_size=10,
        unlabeled_ratio=2,
        log_every=1,
        eval_every=5,
        checkpoint_every=4,
        uda_threshold=0.0,
        uda_warmup_steps=14,
        device="cpu",
    )
    return apply_overrides(load_preset("digits-uda-mpl"), {**base, **overrides}).validate()


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize(
    "overrides",
    [
        # resumed inside the MPL phase, then 2 fine-tuning steps: the preset's 300 (which ran here
        # twice before, 95% of this test's time) test nothing more
        {"ema_decay": 0.9, "finetune_steps": 2},
        {"mpl_estimator": "first_order", "student_dropout": 0.0, "finetune_steps": 2},
        # the moving-average baseline of the reward is in the checkpoint, and resumes
        {
            "mpl_estimator": "first_order",
            "mpl_baseline_decay": 0.5,
            "student_dropout": 0.0,
            "finetune_steps": 2,
        },
        # 8 MPL steps then 6 fine-tuning steps: interrupted inside the fine-tuning phase
        {"steps": 8, "uda_warmup_steps": 8, "finetune_steps": 6},
    ],
    ids=["exact+ema", "first_order", "first_order+baseline", "finetune"],
)
def test_resume_after_interrupt_between_checkpoints_is_exact(tmp_path, monkeypatch, overrides):
    cfg = _digits_config(**overrides)
    reference = engine.train(cfg, tmp_path / "ref", show_progress=False)
    baseline = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["method"]["mpl"]["baseline"]
    if cfg.mpl_estimator == "first_order":  # --set mpl_baseline_decay reaches the step
        assert (baseline is None) == (cfg.mpl_baseline_decay < 0)

    real_batch = engine.BatchSource.batch

    def interrupted_batch(self, step, views=None):
        if step == 10:  # logged up to step 10, last checkpoint at step 8
            raise KeyboardInterrupt
        return real_batch(self, step, views)

    out = tmp_path / "run"
    monkeypatch.setattr(engine.BatchSource, "batch", interrupted_batch)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, out, show_progress=False)
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 8
    assert max(int(r[0]) for r in _rows(out / "metrics.csv")[1:]) == 10

    resumed = engine.train(cfg, out, show_progress=False)
    assert resumed["results"] == reference["results"]
    if cfg.finetune_steps:
        assert "accuracy_before_finetune" in resumed["results"][0]
        assert "finetune_optimizer" in load_checkpoint(out / "checkpoint.pt")
    got, want = (load_checkpoint(p / "checkpoint.pt") for p in (out, tmp_path / "ref"))
    for part in ("student", "teacher", "ema"):
        if want[part] is None:
            continue
        for key, value in want[part].items():
            assert torch.equal(got[part][key], value), f"{part}.{key}"
    assert got["method"] == want["method"]
    assert _rows(out / "metrics.csv") == _rows(tmp_path / "ref" / "metrics.csv")


def test_temporary_files_that_killed_writes_left_are_cleared_when_the_run_resumes(tmp_path):
    """A kill -9 while curves.png, metrics.csv (rewritten at every resume), config.json or
    results.json was written left its hidden temporary file; they piled up over resumes, and only
    the checkpoint's were ever removed."""
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / f".{name}.k1ll3d.tmp" for name in ("curves.png", "metrics.csv", "config.json")]
    stale.append(out / ".results.json.x.tmp")
    others = [out / ".notes.txt.x.tmp", out / "curves.png.tmp"]  # not metapl's temporary files
    for path in stale + others:
        path.write_bytes(b"half a file")
    cfg = _digits_config(
        method="supervised", steps=2, checkpoint_every=2, uda_warmup_steps=2, finetune_steps=0
    )
    engine.train(cfg, out, show_progress=False)
    assert [p.name for p in stale if p.exists()] == []
    assert all(p.exists() for p in others)


# --- non-finite weights never reach a checkpoint ------------------------------------------------


def test_finite_loss_with_overflowed_weights_stops_before_the_checkpoint(tmp_path, monkeypatch):
    cfg = apply_overrides(_digits_config(), {"method": "supervised", "log_every": 1})
    real_step = live_run.build_method

    def build(*args, **kwargs):
        method = real_step(*args, **kwargs)
        step = method.step

        def poisoned_step(batch):
            metrics = step(batch)  # the loss stays finite
            if batch.step == 5:  # 0-based: the 6th step, after the checkpoint at step 4
                method.models["student"].bn2.running_var[0] = math.inf
            return metrics

        method.step = poisoned_step
        return method

    monkeypatch.setattr(live_run, "build_method", build)  # where Run builds it
    with pytest.raises(
        NonFiniteLossError, match=r"step 8: student weight bn2.running_var contains inf"
    ):
        engine.train(cfg, tmp_path / "run", show_progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 4 and torch.isfinite(ckpt["student"]["bn2.running_var"]).all()
    assert not (tmp_path / "run" / "results.json").exists()


def test_check_finite_weights_names_model_and_tensor():
    good, bad = nn.Linear(2, 2), nn.BatchNorm1d(3)
    check_finite_weights({"teacher": good, "student": nn.ReLU()}, step=3)
    with torch.no_grad():
        bad.running_mean[1] = math.nan
    with pytest.raises(
        NonFiniteLossError, match=r"^step 3: student weight running_mean contains nan"
    ):
        check_finite_weights({"teacher": good, "student": bad}, step=3)


# --- 11. methods -------------------------------------------------------------------------------


def test_uda_loss_is_zero_for_identical_views_at_temperature_one():
    logits = torch.randn(6, 10) * 3
    loss = UDALoss(factor=1.0, temperature=1.0, threshold=0.0)(logits, logits.clone(), step=0)
    assert loss.abs().item() < 1e-6
    sharpened = UDALoss(factor=1.0, temperature=0.8, threshold=0.0)(logits, logits, step=0)
    assert sharpened.item() > 1e-4  # the sharpened target differs from the strong prediction


def test_uda_loss_masks_low_confidence_examples_and_takes_no_gradient_through_the_target():
    confident = torch.tensor([[8.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.1, 0.0, 0.0]])
    weak = torch.cat([confident, unsure]).requires_grad_()
    strong = torch.randn(2, 3).requires_grad_()
    uda = UDALoss(factor=2.0, temperature=0.8, threshold=0.8)
    loss = uda(weak, strong, step=10)
    target = F.softmax(confident / 0.8, -1)
    kl = (target * (target.log() - F.log_softmax(strong[:1], -1))).sum()
    assert loss.item() == pytest.approx(2.0 * kl.item() / 2, rel=1e-5)  # mean over both examples
    loss.backward()
    assert weak.grad is None or not weak.grad.any()
    assert strong.grad[1].abs().max() == 0 and strong.grad[0].abs().max() > 0


def test_uda_warmup_ramps_the_weight_linearly():
    uda = UDALoss(factor=3.0, warmup_steps=4)
    assert [uda.weight(s) for s in range(6)] == [0.75, 1.5, 2.25, 3.0, 3.0, 3.0]
    assert UDALoss(factor=3.0, warmup_steps=0).weight(0) == 3.0
    weak, strong = torch.randn(4, 5) * 4, torch.randn(4, 5)
    at = [UDALoss(3.0, 0.8, 0.0, 4)(weak, strong, s) for s in (0, 1, 3, 9)]
    assert torch.allclose(torch.stack(at), at[2] * torch.tensor([0.25, 0.5, 1.0, 1.0]))


def test_uda_mask_reads_the_unsharpened_confidence():
    """The confidence mask uses the weak view's plain softmax, not the sharpened target: at T = 0.5 a
    0.75-confident example sharpens to 0.9 but must still be dropped by a 0.8 threshold."""
    weak = torch.log(torch.tensor([[3.0, 1.0], [9.0, 1.0]], dtype=torch.float64))  # p = .75, .9
    strong = torch.tensor([[0.3, -0.2], [-0.5, 0.4]], dtype=torch.float64)
    loss = UDALoss(factor=1.0, temperature=0.5, threshold=0.8)(weak, strong, step=0)
    # Oracle for the kept row: sharpen(p)_c = p_c^(1/T) / sum p^(1/T) = [81, 1] / 82.
    q = torch.tensor([81.0, 1.0], dtype=torch.float64) / 82.0
    log_p = strong[1] - torch.logsumexp(strong[1], 0)
    kl = (q * (q.log() - log_p)).sum()
    assert loss.item() == pytest.approx(kl.item() / 2, rel=1e-12)  # mean over both examples


def test_uda_loss_is_finite_when_the_sharpened_target_underflows_to_zero():
    """A very confident weak view (logit gap 100 at T = 0.8 in float32) gives target entries that
    are exactly 0; 0 * log 0 must count as 0, not NaN, and the KL is then -log p_strong(argmax)."""
    weak = torch.tensor([[0.0, 100.0, 0.0]])
    assert (F.softmax(weak / 0.8, -1) == 0).any()  # the case this test is about
    strong = torch.tensor([[0.5, 1.0, -1.0]], requires_grad=True)
    loss = UDALoss(factor=1.0, temperature=0.8, threshold=0.5)(weak, strong, step=0)
    want = -F.log_softmax(strong.detach(), -1)[0, 1]
    assert torch.isfinite(loss) and loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(strong.grad).all()


class Recorder(nn.Module):
    """A linear classifier on flattened images that records every input it sees."""

    def __init__(self, features: int, classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(features, classes)
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        return self.fc(x.flatten(1))


def _views(n_l: int = 4, n_u: int = 6, dtype: torch.dtype = torch.float32) -> Batch:
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> Tensor:
        return torch.rand(n, 1, 2, 2, generator=g, dtype=dtype)

    return Batch(
        x_labeled=rand(n_l),
        y_labeled=torch.arange(n_l) % 3,
        x_labeled_strong=rand(n_l) + 10,
        x_unlabeled_weak=rand(n_u) + 20,
        x_unlabeled_strong=rand(n_u) + 30,
        step=7,
    )


def test_uda_mpl_feeds_the_weak_view_to_the_teacher_and_the_strong_view_to_the_student():
    built = build_method(_digits_config(), 3, torch.device("cpu"))  # the views the engine uses
    torch.manual_seed(0)
    # float64: the UDA term here is a KL of about 3e-6, a difference of near-equal numbers, and the
    # teacher's one batched forward sums in another order than the separate forwards below; in
    # float32 that alone moved it by 1e-6 relative on some CPUs.
    teacher, student = Recorder(4).double(), Recorder(4).double()
    uda = built.uda
    method = MPLMethod(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True),
        labeled_view=built.labeled_view,
        unlabeled_view=built.unlabeled_view,
        uda=uda,
    )
    assert set(method.views) == {"unlabeled_strong", "unlabeled_weak"}
    b = _views(dtype=torch.float64)
    w_teacher = teacher.fc.weight.detach().clone(), teacher.fc.bias.detach().clone()
    metrics = method.step(b)

    # The teacher: one forward on [labeled, student's (strong) view, weak view].
    (seen,) = teacher.seen
    assert torch.equal(seen, torch.cat([b.x_labeled, b.x_unlabeled_strong, b.x_unlabeled_weak]))
    # Its UDA term: the weak view's sharpened prediction is the target for the strong view.
    logits = lambda x: F.linear(x.flatten(1), *w_teacher)  # noqa: E731
    want = uda(logits(b.x_unlabeled_weak), logits(b.x_unlabeled_strong), 0)
    swapped = uda(logits(b.x_unlabeled_strong), logits(b.x_unlabeled_weak), 0)
    assert metrics["teacher_extra"].item() == pytest.approx(want.item(), rel=1e-6)
    assert not math.isclose(want.item(), swapped.item(), rel_tol=1e-3)

    # The student: trained on the strong view (update and JVP passes) and evaluated on labeled data;
    # it never sees the weak view. (Its first forward is the exact step's trial of a labeled batch
    # of a new size: metapl.mpl.student_checks.check_student_takes.)
    assert torch.equal(student.seen[0], b.x_labeled)
    assert torch.equal(student.seen[1], b.x_unlabeled_strong)
    assert any(torch.equal(x, b.x_labeled) for x in student.seen)
    assert all(
        torch.equal(x, b.x_unlabeled_strong) or torch.equal(x, b.x_labeled) for x in student.seen
    )


@pytest.mark.parametrize(
    "method, labeled, unlabeled",
    [
        ("supervised_mpl", None, "x_unlabeled_weak"),
        ("randaugment_mpl", "x_labeled_strong", "x_unlabeled_strong"),
    ],
)
def test_other_mpl_rows_use_their_views(method, labeled, unlabeled):
    cfg = apply_overrides(_digits_config(), {"method": method})
    built = build_method(cfg, 3, torch.device("cpu"))
    teacher, student = Recorder(4), Recorder(4)
    mpl = MPLMethod(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.1),
        torch.optim.SGD(student.parameters(), lr=0.1),
        labeled_view=built.labeled_view,
        unlabeled_view=built.unlabeled_view,
    )
    b = _views()
    mpl.step(b)
    x_l = b.x_labeled if labeled is None else getattr(b, labeled)
    assert torch.equal(teacher.seen[0], torch.cat([x_l, getattr(b, unlabeled)]))
    # (after the exact step's trial of the labeled batch: its first of this size)
    assert torch.equal(student.seen[0], x_l)
    assert torch.equal(student.seen[1], getattr(b, unlabeled))


def test_uda_method_trains_on_labeled_weak_and_strong_in_one_pass():
    torch.manual_seed(0)
    model = Recorder(4)
    uda = UDALoss(factor=1.0, temperature=0.8, threshold=0.0, warmup_steps=100)
    w = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    method = UDAMethod(model, torch.optim.SGD(model.parameters(), lr=0.1), uda)
    b = _views()
    metrics = method.step(b)
    (seen,) = model.seen
    assert torch.equal(seen, torch.cat([b.x_labeled, b.x_unlabeled_weak, b.x_unlabeled_strong]))
    logits = lambda x: F.linear(x.flatten(1), *w)  # noqa: E731
    want = uda(logits(b.x_unlabeled_weak), logits(b.x_unlabeled_strong), b.step)
    assert uda.weight(b.step) == pytest.approx(0.08)  # the engine's step drives the ramp
    assert metrics["uda_consistency"].item() == pytest.approx(want.item(), rel=1e-6)
    supervised = F.cross_entropy(logits(b.x_labeled), b.y_labeled)
    assert metrics["student_supervised"].item() == pytest.approx(supervised.item(), rel=1e-6)


def test_uda_method_applies_label_smoothing_to_its_supervised_term():
    """``label_smoothing`` (a config key for every method) reaches UDA's supervised CE."""
    torch.manual_seed(0)
    model = Recorder(4)
    w = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    uda = UDALoss(factor=1.0, temperature=0.8, threshold=0.0)
    method = UDAMethod(model, torch.optim.SGD(model.parameters(), lr=0.1), uda, label_smoothing=0.3)
    b = _views()
    metrics = method.step(b)
    logits = F.linear(b.x_labeled.flatten(1), *w)
    smoothed = F.cross_entropy(logits, b.y_labeled, label_smoothing=0.3)
    plain = F.cross_entropy(logits, b.y_labeled)
    assert metrics["student_supervised"].item() == pytest.approx(smoothed.item(), rel=1e-6)
    assert not math.isclose(smoothed.item(), plain.item(), rel_tol=1e-3)


# --- Table 2 pipeline on a full split (cifar10-full), tiny files ---------------------------------


@pytest.fixture(scope="module")
def cifar_full_root(tmp_path_factory):
    # cifar10-full reserves the first 4,000 training images for tuning: 4,100 leaves 100 labeled.
    return write_cifar10(tmp_path_factory.mktemp("cifar_full"), per_batch=820, test=40)


def test_cifar10_full_reduced_mpl_pipeline_on_tiny_files(tmp_path, cifar_full_root):
    import numpy as np

    data = ["--data-dir", str(cifar_full_root), "--steps", "2", "--quiet", *SMALL]
    teacher_run = tmp_path / "large"
    assert (
        main(
            [
                "train",
                "--preset",
                "cifar10-full-large-teacher",
                "--out",
                str(teacher_run),
                *for_preset("cifar10-full-large-teacher", data),
            ]
        )
        == 0
    )
    student_run = tmp_path / "student"
    assert (
        main(
            [
                "train",
                "--preset",
                "cifar10-full-reduced-mpl",
                "--out",
                str(student_run),
                *data,
                "--set",
                f"large_teacher={teacher_run}",
                "--set",
                "unlabeled_per_class=5",
            ]
        )
        == 0
    )
    (record,) = json.loads((student_run / "results.json").read_text())["results"]
    assert (record["method"], record["dataset"]) == ("reduced_mpl", "cifar10-full")
    probs_l = np.load(student_run / "large_teacher_labeled.npy")
    probs_u = np.load(student_run / "large_teacher_unlabeled.npy")
    assert probs_l.shape == (100, 10)  # labeled = the 100 left after reserving 4,000 for tuning
    assert probs_u.shape == (100, 10)  # no unlabeled folder: the non-tuning training images
    ckpt = load_checkpoint(student_run / "checkpoint.pt")
    assert ckpt["config"]["student_optimizer"] == "rmsprop"
    assert "hidden.0.weight" in "".join(ckpt["teacher"])  # the reduced MLP teacher
    series = json.loads((student_run / "figure10.json").read_text())
    assert len(series["large_teacher"]) == 6


# --- memory_format: channels_last on the CPU is the same training, in another layout ------------


def _two_uda_mpl_steps(memory_format: str):
    import numpy as np

    from metapl.bench import synthetic_cifar_split
    from metapl.train.config import TrainConfig
    from metapl.train.data import BatchSource

    settings = dict(dataset="cifar10-4k", model="rgb_tiny_cnn", method="uda_mpl", device="cpu")
    settings.update(batch_size=4, unlabeled_ratio=2, steps=10, warmup_steps=1, uda_threshold=0.0)
    cfg = apply_overrides(TrainConfig(), {**settings, "memory_format": memory_format}).validate()
    split = synthetic_cifar_split(64, np.random.RandomState(0))
    run = engine.Run(cfg, split, torch.device("cpu"))
    source = BatchSource(split, cfg, run.method.views, torch.device("cpu"))
    batches = [source.batch(step) for step in range(2)]
    for batch in batches:
        run.method.step(batch)
    return run.method, batches


def test_channels_last_on_cpu_trains_the_same_models_as_contiguous():
    plain, plain_batches = _two_uda_mpl_steps("auto")  # auto = contiguous on the CPU
    cl, cl_batches = _two_uda_mpl_steps("channels_last")
    conv = next(m for m in cl.models["student"].modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    # Every image view in the models' layout: the same pixels in another order.
    for view in ("x_labeled", "x_unlabeled_weak", "x_unlabeled_strong"):
        x = getattr(cl_batches[0], view)
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        assert getattr(plain_batches[0], view).is_contiguous()
    for view in ("x_labeled", "x_unlabeled_weak", "x_unlabeled_strong"):
        assert torch.equal(getattr(cl_batches[1], view), getattr(plain_batches[1], view))
    # J still comes from the tangent tape: its first step was checked against forward AD on the
    # channels_last tensors (a wrong rule falls back, and "tape" would not show here).
    assert cl.mpl.last_jvp_path == plain.mpl.last_jvp_path == "tape"
    # Both models end where the contiguous run ends, up to float32 summation order: the teacher
    # to ~1e-4 (its MPL gradient is a difference of float32 passes: 1e-2 from float64 on
    # WRN-28-2, `metapl bench`'s numerics check), the student to ~2e-5 (step 2's targets come
    # from that teacher).
    for name, tol in (("student", 1e-4), ("teacher", 1e-3)):
        for (key, a), b in zip(
            plain.models[name].state_dict().items(), cl.models[name].state_dict().values()
        ):
            torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=f"{name}.{key}")


def test_mpl_weight_reaches_the_step_and_must_be_non_negative():
    from metapl.errors import ConfigError

    method = build_method(_digits_config(mpl_weight=2.5), 10, torch.device("cpu"))
    assert method.mpl.mpl_weight == 2.5
    with pytest.raises(ConfigError, match="mpl_weight must be >= 0"):
        _digits_config(mpl_weight=-1.0)


def test_student_labeled_weight_reaches_the_step():
    method = build_method(_digits_config(student_labeled_weight=0.5), 10, torch.device("cpu"))
    assert method.mpl.student_labeled_weight == 0.5
    assert build_method(_digits_config(), 10, torch.device("cpu")).mpl.student_labeled_weight == 0


def test_memory_format_must_be_known():
    from metapl.errors import ConfigError

    with pytest.raises(ConfigError, match="memory_format must be auto, channels_last or contig"):
        _digits_config(memory_format="nhwc")
