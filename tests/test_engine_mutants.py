"""The training loop's bookkeeping, where a wrong change still passed every other test: how many
steps each phase runs, which model is evaluated and when, what a NaN metric stops, the progress bar
of a resumed run, and the ReducedMPL student's teacher distributions (row-aligned with the images
kept).

One tiny digits UDA+MPL run with an EMA and a fine-tuning phase serves most tests (about a second).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from test_engine import _digits_config
from test_train_cli import read_rows

from metapl.distributed import DataParallel
from metapl.errors import ConfigError, NonFiniteLossError
from metapl.train import engine
from metapl.train import run as live_run
from metapl.train.checkpoint import load_checkpoint
from metapl.train.config import apply_overrides
from metapl.train.data import evaluate_models
from metapl.train.run import Figure10Series

pytestmark = pytest.mark.usefixtures("single_torch_thread")

STEPS, FINETUNE = 4, 2


def _config(**overrides):
    """4 UDA+MPL steps, then 2 fine-tuning steps; logged every 4 (and at the last), evaluated
    every 3."""
    base = dict(steps=STEPS, finetune_steps=FINETUNE, uda_warmup_steps=STEPS, eval_every=3)
    base.update(log_every=4, tune_per_class=3)  # 30 tuning images, among the labeled ones
    return _digits_config(**{"ema_decay": 0.5, "checkpoint_every": 2, **base, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory, single_torch_thread):
    """The run folder, its summary, and every evaluation: (images, model weights, accuracy)."""
    out = tmp_path_factory.mktemp("engine_mutants") / "run"
    evaluations = []

    def spy(models, images, labels, *args, **kwargs):
        accuracies = evaluate_models(models, images, labels, *args, **kwargs)
        for name, model in models.items():
            weights = {k: v.clone() for k, v in model.state_dict().items()}
            evaluations.append((images, weights, accuracies[name]))
        return accuracies

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "evaluate_models", spy)
        summary = engine.train(_config(), out, show_progress=False)
    return out, summary, evaluations


def _logged(out) -> dict[int, dict[str, float]]:
    by_step: dict[int, dict[str, float]] = {}
    for step, name, value in read_rows(out / "metrics.csv"):
        by_step.setdefault(step, {})[name] = float(value)
    return by_step


def test_each_phase_runs_exactly_its_own_steps(run):
    """Steps 1..4 are UDA+MPL steps and 5..6 fine-tuning steps: each phase's schedule advanced
    exactly its length, and the losses logged (at step 4, and at the last step, 6, which
    log_every=4 does not divide) are that phase's."""
    out, _, _ = run
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == STEPS + FINETUNE
    assert {k: s["last_epoch"] for k, s in ckpt["schedulers"].items()} == {
        "teacher": STEPS,
        "student": STEPS,
    }
    assert ckpt["finetune_scheduler"]["last_epoch"] == FINETUNE
    logged = _logged(out)
    losses = {s: {n for n in names if "loss" in n} for s, names in logged.items()}
    assert sorted(s for s in losses if losses[s]) == [4, 6]
    assert not any(n.startswith("finetune_") for n in losses[4])
    assert all(n.startswith("finetune_") for n in losses[6])
    # the fine-tuning learning rate follows its own schedule: cosine from finetune_lr to 0
    assert logged[4]["finetune_lr"] == _config().finetune_lr
    assert logged[6]["finetune_lr"] == pytest.approx(0, abs=1e-12)


def test_evaluations_at_the_cadence_at_the_end_of_mpl_and_at_the_last_step(run):
    """eval_every=3 of 6 steps: at 3 and 6, and at step 4 where the MPL phase ends (the
    before-fine-tuning accuracy), which the results report beside the final one."""
    out, summary, _ = run
    logged = _logged(out)
    assert sorted(s for s, names in logged.items() if "test_accuracy" in names) == [3, 4, 6]
    (record,) = summary["results"]
    assert record["accuracy_before_finetune"] == logged[4]["test_accuracy"]
    assert record["accuracy"] == logged[6]["test_accuracy"]
    assert (record["steps"], record["finetune_steps"]) == (STEPS, FINETUNE)
    assert json.loads((out / "results.json").read_text())["results"] == summary["results"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_reported_accuracy_is_the_emas_the_teachers_is_only_recorded(run):
    """The test accuracy is the EMA's, and the EMA moved every step (it is neither the initial
    weights nor the student's); the student's weights are never evaluated on the test images, the
    teacher's are, but only to be recorded beside the EMA's."""
    out, summary, evaluations = run
    (record,) = summary["results"]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    cfg = _config()
    split = engine.load_data(cfg)
    initial = engine.Run(cfg, split, torch.device("cpu")).method.models["student"].state_dict()
    assert not _same(ckpt["ema"], ckpt["student"]) and not _same(ckpt["ema"], initial)

    def accuracies(weights, images) -> list[float]:
        return [
            acc
            for x, w, acc in evaluations
            if _same(w, weights) and x.shape == images.shape and np.array_equal(x, images)
        ]

    on_test = [w for x, w, _ in evaluations if np.array_equal(x, split.x_test)]
    assert not any(_same(w, ckpt["student"]) for w in on_test)
    assert set(accuracies(ckpt["ema"], split.x_test)) == {record["accuracy"]}
    # the 30 tuning images are labeled images this run trained on: no "tune_accuracy" of them
    assert "tune_accuracy" not in record
    assert not any(
        x.shape == split.x_tune.shape and np.array_equal(x, split.x_tune) for x, *_ in evaluations
    )
    assert set(accuracies(ckpt["teacher"], split.x_test)) == {record["teacher_test_accuracy"]}
    assert set(accuracies(ckpt["teacher"], split.x_labeled)) == {record["teacher_labeled_accuracy"]}
    # the student's labeled accuracy is the student's own (Figure 9), not the EMA's
    assert set(accuracies(ckpt["student"], split.x_labeled)) == {record["student_labeled_accuracy"]}


# --- NaN metrics stop the run at the first step that logs or checkpoints them --------------------


def _poison_metric_at(monkeypatch, step: int, last: int | None = None, value=float("nan")) -> None:
    """From step ``step`` (1-based) on, to ``last`` if given, the method reports a NaN (or
    ``value``) metric; the weights stay finite."""
    real = live_run.build_method

    def build(*args, **kwargs):
        method = real(*args, **kwargs)
        step_fn = method.step

        def poisoned(batch):
            metrics = step_fn(batch)
            if step <= batch.step + 1 <= (last or batch.step + 1):
                metrics = {**metrics, "student_loss": torch.tensor(value)}
            return metrics

        method.step = poisoned
        return method

    monkeypatch.setattr(live_run, "build_method", build)  # where Run builds it


@pytest.mark.parametrize(
    "log_every, checkpoint_every", [(100, 3), (2, 100)], ids=["checkpoint", "log"]
)
def test_a_nan_metric_stops_at_the_first_checkpoint_or_log_step(
    tmp_path, monkeypatch, log_every, checkpoint_every
):
    """NaN from step 2 on: a checkpoint step that does not log (3) must not save it, and a log
    step that does not checkpoint (2) must not log it; either stops the run there."""
    cfg = apply_overrides(
        _digits_config(),
        {"method": "supervised", "steps": 6, "eval_every": 100, "log_every": log_every}
        | {"checkpoint_every": checkpoint_every},
    )
    _poison_metric_at(monkeypatch, 2)
    stop = min(checkpoint_every, log_every)
    found = "is nan" if stop == 2 else r"was not finite \(found at step 3, where it is nan\)"
    with pytest.raises(NonFiniteLossError, match=f"^step 2: student_loss {found}; the run stopped"):
        engine.train(cfg, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not any(
        name == "student_loss" for _, name, _ in read_rows(tmp_path / "run" / "metrics.csv")
    )


def test_a_loss_that_was_nan_between_two_logs_stops_the_run_naming_its_step(tmp_path, monkeypatch):
    """Inf at step 3 only, finite again at step 4 where the run logs, checkpoints and evaluates:
    every step's losses are watched, so the run stops there, names step 3 and writes nothing of
    step 4 (checking only the logged step's values let it run to the end)."""
    cfg = apply_overrides(
        _digits_config(),
        {"method": "supervised", "steps": 6, "eval_every": 4, "log_every": 4}
        | {"checkpoint_every": 4},
    )
    _poison_metric_at(monkeypatch, 3, last=3, value=float("inf"))
    with pytest.raises(
        NonFiniteLossError,
        match=r"^step 3: student_loss was not finite \(found at step 4, where it is finite again\)",
    ):
        engine.train(cfg, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not (tmp_path / "run" / "results.json").exists()
    assert not read_rows(tmp_path / "run" / "metrics.csv")  # neither its losses nor accuracies


def test_a_nan_at_an_evaluation_step_stops_before_the_evaluation(tmp_path, monkeypatch):
    """An evaluation step that neither logs nor checkpoints checks the losses too: accuracies of
    a NaN step reach neither metrics.csv nor a tuning study's callback."""
    cfg = apply_overrides(
        _digits_config(),
        {"method": "supervised", "steps": 6, "eval_every": 2, "log_every": 100}
        | {"checkpoint_every": 100},
    )
    _poison_metric_at(monkeypatch, 2)
    seen = []
    with pytest.raises(NonFiniteLossError, match=r"^step 2: student_loss is nan; "):
        engine.train(cfg, tmp_path / "run", show_progress=False, on_eval=lambda *a: seen.append(a))
    assert seen == [] and not read_rows(tmp_path / "run" / "metrics.csv")


def test_a_resumed_run_names_the_bad_step_counted_from_its_checkpoint(tmp_path, monkeypatch):
    """3 steps, then the same run continued to 6 with an inf loss at step 5 only: the step named
    is the run's (5), not one counted from the start of this session (2)."""
    cfg = {"method": "supervised", "eval_every": 100, "log_every": 100, "finetune_steps": 0}
    cfg = apply_overrides(_digits_config(), cfg | {"checkpoint_every": 3})
    engine.train(apply_overrides(cfg, {"steps": 3}), tmp_path / "run", show_progress=False)
    _poison_metric_at(monkeypatch, 5, last=5, value=float("inf"))
    with pytest.raises(
        NonFiniteLossError,
        match=r"^step 5: student_loss was not finite \(found at step 6, where it is finite again\)",
    ):
        engine.train(apply_overrides(cfg, {"steps": 6}), tmp_path / "run", show_progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3  # not overwritten


@pytest.mark.parametrize("every", ["log_every", "eval_every", "checkpoint_every"])
def test_another_ranks_bad_step_stops_this_rank_at_the_same_check(tmp_path, monkeypatch, every):
    """Every check goes through DataParallel.earliest (the element-wise minimum over ranks): here
    another rank saw every metric go bad at step 1, so this rank, all finite, stops at its first
    log, evaluation or checkpoint step too (a rank that decided alone would go on to step 3 and
    wait for the others forever)."""
    cadence = {"log_every": 100, "eval_every": 100, "checkpoint_every": 100} | {every: 2}
    cfg = apply_overrides(_digits_config(), {"method": "supervised", "steps": 6} | cadence)
    monkeypatch.setattr(DataParallel, "earliest", lambda self, values: [min(v, 1) for v in values])
    with pytest.raises(
        NonFiniteLossError, match=r"^step 1: \w+ was not finite \(found at step 2, where it is"
    ):
        engine.train(cfg, tmp_path / "run", show_progress=False)
    assert not read_rows(tmp_path / "run" / "metrics.csv")


def test_at_an_evaluation_step_the_message_reads_the_losses_averaged_over_ranks(
    tmp_path, monkeypatch
):
    """Another rank's loss is NaN at step 2, an evaluation step that neither logs nor
    checkpoints: this rank's message reads the mean over ranks (NaN), as the other rank's does,
    not its own finite value ("... where it is finite again")."""
    cadence = {"log_every": 100, "eval_every": 2, "checkpoint_every": 100}
    cfg = apply_overrides(_digits_config(), {"method": "supervised", "steps": 6} | cadence)
    nan = torch.tensor(float("nan"))
    monkeypatch.setattr(DataParallel, "mean_metrics", lambda self, m: dict.fromkeys(m, nan))
    monkeypatch.setattr(DataParallel, "earliest", lambda self, values: [min(v, 2) for v in values])
    with pytest.raises(NonFiniteLossError, match=r"^step 2: \w+ is nan; the run stopped"):
        engine.train(cfg, tmp_path / "run", show_progress=False)


# --- resume: the progress bar, and what a checkpoint carries besides the models -----------------


def test_a_resumed_run_counts_its_progress_from_the_checkpoint(tmp_path, capsys):
    """3 steps, then the same run continued to 5: the bar starts at 3/5 and ends at 5/5 (its rate
    and ETA count only the steps this session runs). A run without fine-tuning reports no
    before-fine-tuning accuracy."""
    cfg = {"method": "supervised", "eval_every": 100, "finetune_steps": 0}
    cfg = apply_overrides(_digits_config(), cfg)
    engine.train(apply_overrides(cfg, {"steps": 3}), tmp_path / "run", show_progress=False)
    summary = engine.train(apply_overrides(cfg, {"steps": 5}), tmp_path / "run")
    counts = {int(n) for n in re.findall(r"\| (\d+)/5 \[", capsys.readouterr().err)}
    assert {3, 5} <= counts <= {3, 4, 5}
    (record,) = summary["results"]
    assert "accuracy_before_finetune" not in record


def test_a_run_resumed_past_its_end_counts_the_fine_tuning_steps(run, tmp_path):
    """The run's checkpoint is at step 6: 4 steps and 2 of fine-tuning. The same configuration
    again is a rerun, not past the end (a bound of --steps alone refused it); --steps 3 is, and the
    advice is the --steps that continues the run (the fine-tuning steps come on top of it)."""
    out, *_ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    with pytest.raises(ConfigError, match=r"is at step 6, past the 5 steps .* give --steps 4 or"):
        engine.train(_config(steps=STEPS - 1), copy, show_progress=False)
    (before,) = json.loads((out / "results.json").read_text())["results"]
    (rerun,) = engine.train(_config(), copy, show_progress=False)["results"]
    assert rerun["accuracy"] == before["accuracy"]


def test_run_state_round_trips_the_ema_and_the_bookkeeping():
    """A checkpoint's state restores the EMA, the step, the before-fine-tuning accuracies and the
    Figure 10 series into a fresh Run (a resumed ReducedMPL run keeps its earlier quarters)."""
    cfg = _config()
    split = engine.load_data(cfg)
    cpu = torch.device("cpu")
    run = engine.Run(cfg, split, cpu)
    with torch.no_grad():
        for p in run.ema.module.parameters():
            p.add_(1.0)
    run.step, run.before_finetune = 4, {"test_accuracy": 0.5}
    run.figure10 = {"1": [[0.25, 0.75]], "2": [[0.5, 0.5]]}
    state = run.state_dict("fingerprint")

    fresh = engine.Run(cfg, split, cpu)
    fresh.load_state_dict(state)
    assert fresh.step == 4 and fresh.before_finetune == {"test_accuracy": 0.5}
    assert fresh.figure10 == run.figure10
    for (k, a), b in zip(
        run.ema.module.state_dict().items(), fresh.ema.module.state_dict().values()
    ):
        assert torch.equal(a, b), k


def test_each_step_draws_its_own_randomness():
    """Dropout and sampling are seeded by (seed, step): two steps draw different numbers, and the
    same step draws the same numbers in another Run (what makes a resume exact)."""
    cfg = apply_overrides(_digits_config(), {"method": "supervised"})
    split = engine.load_data(cfg)
    cpu = torch.device("cpu")

    def draws(run, steps):
        source = engine.BatchSource(split, cfg, run.method.views, cpu)
        seen = []
        step_fn = run.method.step
        run.method.step = lambda batch: (seen.append(torch.rand(3)), step_fn(batch))[1]
        for _ in range(steps):
            run.advance(source)
        return seen

    first = draws(engine.Run(cfg, split, cpu), 2)
    assert not torch.equal(first[0], first[1])
    again = engine.Run(cfg, split, cpu)
    again.step = 1
    assert torch.equal(draws(again, 1)[0], first[1])


# --- Figure 10: the reduced teacher's distributions at each quarter ------------------------------


class _Scaled(torch.nn.Module):
    """A 'reduced teacher' that returns its input doubled (tripled in train mode)."""

    def forward(self, x):
        return (3 if self.training else 2) * x


def test_figure10_records_the_teacher_in_eval_mode_at_each_quarter_at_its_temperature():
    from types import SimpleNamespace

    probs_u = np.log(np.arange(1, 1 + 11 * 3, dtype=np.float32).reshape(11, 3))
    teacher = _Scaled().train()
    cfg = SimpleNamespace(steps=10, mpl_temperature=0.5)
    run = SimpleNamespace(
        cfg=cfg, method=SimpleNamespace(models={"teacher": teacher}), device="cpu", figure10={}
    )
    watched = Figure10Series(run, (None, probs_u))
    # six images evenly spaced over the selection, the first and the last included
    rows = [0, 2, 4, 6, 8, 10]
    assert np.array_equal(watched.large, probs_u[rows])
    for step in range(1, 11):
        watched.maybe_record(step)
    assert teacher.training  # put back as it was
    assert sorted(run.figure10) == ["1", "2", "3", "4"]
    want = torch.softmax(2 * torch.from_numpy(probs_u[rows]) / 0.5, -1)
    for probs in run.figure10.values():  # quarters at steps 2 (2.5 rounds to 2), 5, 8, 10
        torch.testing.assert_close(torch.tensor(probs), want)
    assert watched.series()["large_teacher"] == probs_u[rows].tolist()


# --- ReducedMPL / NoisyStudent: the large teacher's distributions, row-aligned with the images ----


def test_large_teacher_data_keeps_the_top_k_per_class_with_their_own_rows(tmp_path):
    """The student's unlabeled images are the large teacher's top K per class (grouped by class),
    and row i of the returned distributions is the teacher's softmax on image i of the returned
    split, for the kept unlabeled images as for the labeled ones."""
    from metapl.train.checkpoint import config_fingerprint, save_checkpoint
    from metapl.train.large_teacher import prepare_large_teacher_data
    from metapl.train.presets import load_preset

    teacher_dir, k = tmp_path / "large", 5
    teacher_dir.mkdir()
    teacher_cfg = apply_overrides(load_preset("digits-supervised"), {"steps": 1, "warmup_steps": 0})
    (teacher_dir / "config.json").write_text(json.dumps(teacher_cfg.to_dict()))
    large = engine.Run(teacher_cfg, engine.load_data(teacher_cfg), torch.device("cpu"))
    large.step = 1  # as if trained: a finished run of the 1 step its config asks for
    # (its config's own fingerprint: load_run_model refuses a checkpoint of another configuration)
    fingerprint = config_fingerprint(teacher_cfg.to_dict())
    save_checkpoint(teacher_dir / "checkpoint.pt", large.state_dict(fingerprint))
    teacher = large.method.models["student"].eval()
    cfg = apply_overrides(
        load_preset("digits-reduced-reduced-mpl"),
        {"large_teacher": str(teacher_dir), "unlabeled_per_class": k, "device": "cpu"},
    )
    split = engine.load_data(cfg)
    kept, (probs_l, probs_u) = prepare_large_teacher_data(cfg, split, tmp_path, torch.device("cpu"))

    def softmax(images):
        with torch.no_grad():
            return torch.softmax(teacher(torch.from_numpy(images).permute(0, 3, 1, 2) / 255), -1)

    assert len(kept.x_unlabeled) == len(probs_u) == 10 * k
    torch.testing.assert_close(torch.tensor(probs_u), softmax(kept.x_unlabeled))
    torch.testing.assert_close(torch.tensor(probs_l), softmax(split.x_labeled))
    assert np.array_equal(kept.x_labeled, split.x_labeled)
    pool = softmax(split.x_unlabeled).numpy()
    for c in range(10):  # class c's K rows: its K most confident images of the whole pool
        top = np.sort(pool[:, c])[::-1][:k]
        np.testing.assert_allclose(np.sort(probs_u[c * k : (c + 1) * k, c])[::-1], top, rtol=1e-5)


def test_cuda_asked_for_without_a_cuda_device_is_one_config_error(monkeypatch):
    """--device cuda on a machine without CUDA stops at once; auto falls back to the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda was asked for, but PyTorch sees no CUDA"):
        engine.resolve_device("cuda")
    assert engine.resolve_device("auto") == torch.device("cpu")


def test_a_non_finite_ema_stops_before_the_checkpoint(tmp_path, monkeypatch):
    """The EMA (the reported model) is checked like the trained models: an overflow in it alone
    stops the run before its weights reach a checkpoint."""
    from metapl.train.ema import EMA

    real = EMA.update

    def overflowing(self, model):
        real(self, model)
        with torch.no_grad():
            next(self.module.parameters()).fill_(float("inf"))

    monkeypatch.setattr(EMA, "update", overflowing)
    cfg = apply_overrides(_config(), {"method": "supervised", "finetune_steps": 0})
    with pytest.raises(NonFiniteLossError, match="^step 2: ema weight .* contains inf"):
        engine.train(cfg, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
