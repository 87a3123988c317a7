"""End-to-end: `metapl train`, `metapl presets` and `metapl digits` on tiny runs.

Every run here is a few steps of the digits presets (8x8 images, a small CNN, batch 10) so the
whole file stays well under a minute on two cores. The resume test kills a real `python -m metapl`
process with SIGKILL and checks that rerunning the command ends with exactly the weights of an
uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import for_preset
from fake_datasets import random_images, write_cifar10, write_cifar_batch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metapl.cli import main
from metapl.data.digits import digits_split
from metapl.experiments.digits import paired_differences
from metapl.models import create_model
from metapl.train.checkpoint import config_fingerprint, load_checkpoint, save_checkpoint
from metapl.train.config import TrainConfig, apply_overrides
from metapl.train.curves import read_metrics
from metapl.train.data import evaluate
from metapl.train.presets import load_preset

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny(steps: int, log_every: int = 2, eval_every: int = 3, checkpoint_every: int = 2) -> list:
    """CLI options for a digits run of a fraction of a second."""
    options = {
        "warmup_steps": 2,
        "uda_warmup_steps": 4,
        "uda_threshold": 0.0,  # UDA active from the first step (no confident examples yet)
        "log_every": log_every,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
        "batch_size": 10,
        "unlabeled_ratio": 2,
        "finetune_steps": 0,  # the digits UDA+MPL preset fine-tunes; these runs test the main loop
    }
    args = ["--steps", str(steps), "--device", "cpu", "--quiet"]
    for key, value in options.items():
        args += ["--set", f"{key}={value}"]
    return args


def train_cli(preset: str, out: Path, *extra: str) -> int:
    return main(["train", "--preset", preset, "--out", str(out), *for_preset(preset, extra)])


def read_rows(path: Path) -> list[tuple[int, str, str]]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["step", "name", "value"]
        return [(int(step), name, value) for step, name, value in reader]


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err


def float_tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


# --- 1. what a run folder holds ---------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, method",
    [("digits-uda-mpl", "uda_mpl"), ("digits-supervised", "supervised"), ("digits-uda", "uda")],
)
def test_train_writes_config_metrics_tensorboard_checkpoint_results(
    tmp_path, capsys, preset, method
):
    out = tmp_path / "run"
    assert train_cli(preset, out, *tiny(6), "--set", "student_lr=0.07", "--seed", "3") == 0
    assert "test accuracy" in capsys.readouterr().out
    mpl = method.endswith("_mpl")

    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == preset and config["method"] == method
    assert (config["steps"], config["student_lr"], config["seed"]) == (6, 0.07, 3)
    assert (config["batch_size"], config["device"]) == (10, "cpu")
    assert (config["unlabeled_ratio"] == 2) == (method != "supervised")  # no unlabeled batch there
    assert set(config) == set(TrainConfig.__dataclass_fields__)
    assert TrainConfig(**config).validate().to_dict() == config  # the resolved config, complete

    rows = read_rows(out / "metrics.csv")
    pairs = [(step, name) for step, name, _ in rows]
    assert len(pairs) == len(set(pairs))
    steps_of = lambda name: sorted(s for s, n in pairs if n == name)  # noqa: E731
    assert steps_of("student_loss" if not mpl else "teacher_loss") == [2, 4, 6]
    assert steps_of("test_accuracy") == [3, 6] and steps_of("student_lr") == [2, 4, 6]
    assert (steps_of("teacher_labeled_accuracy") == [3, 6]) == mpl
    assert all(float(v) == float(v) for _, _, v in rows)  # numbers, no NaN

    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("test_accuracy")] == [3, 6]

    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 6 and ckpt["config"] == config
    models = {"student", "teacher"} if mpl else {"student"}
    assert ("teacher" in ckpt) == mpl
    assert set(ckpt["optimizers"]) == set(ckpt["schedulers"]) == models
    assert {"torch", "python", "numpy"} <= set(ckpt["rng"])
    for name in models:
        assert "conv1.weight" in ckpt[name] and "bn1.running_var" in ckpt[name]
        assert ckpt["schedulers"][name]["last_epoch"] == 6
        assert ckpt["optimizers"][name]["state"]  # momentum buffers are saved

    results = json.loads((out / "results.json").read_text())
    (record,) = results["results"]
    assert (record["method"], record["seed"], record["steps"]) == (method, 3, 6)
    assert 0.0 <= record["accuracy"] <= 1.0 and record["dataset"] == "digits-5pc-seed3"
    assert ("teacher_labeled_accuracy" in record) == mpl
    assert results["config"] == config

    # curves.png: a PNG of the logged series, written atomically (no temporary file left)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".curves.png.*"))
    series = read_metrics(out)
    assert series["test_accuracy"][0] == [3, 6] and set(series) == {n for _, n, _ in rows}

    # The checkpoint holds the reported model: its test accuracy is the one in results.json.
    model = create_model("digits_cnn", 10)
    model.load_state_dict(ckpt["student"])
    split = digits_split(3, 5)
    cfg = load_preset(preset)
    assert evaluate(model, split.x_test, split.y_test, cfg, torch.device("cpu")) == pytest.approx(
        record["accuracy"], abs=0
    )


# --- 2. resume after kill -9 ends with exactly the uninterrupted weights ---------------------

RESUME_STEPS = 48
# The UDA ramp spans the run, so a resume that lost the MPL step counter would differ.
RESUME_ARGS = tiny(RESUME_STEPS, log_every=1, eval_every=4, checkpoint_every=3)
RESUME_ARGS += ["--set", f"uda_warmup_steps={RESUME_STEPS}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, single_torch_thread) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train_cli("digits-uda-mpl", out, *RESUME_ARGS) == 0
    return out


def _logged_step(metrics: Path) -> int:
    """The largest step in a metrics.csv being written (0 if none yet); tolerates a half line."""
    last = 0
    try:
        for line in metrics.read_text().splitlines()[1:]:
            head = line.split(",", 1)[0]
            if head.isdigit():
                last = max(last, int(head))
    except FileNotFoundError:
        pass
    return last


def _run_and_kill(out: Path, ready) -> None:
    """Start the CLI as a real process, SIGKILL it once ``ready(out)``, and wait for it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "metapl", "train", "--preset", "digits-uda-mpl", "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, *RESUME_ARGS], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    try:
        while not ready(out):
            assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.005)
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -9  # killed, not finished


@pytest.mark.parametrize("when", ["first_checkpoint", "random_step"])
def test_resume_after_sigkill_gives_exactly_the_uninterrupted_weights(
    tmp_path, uninterrupted, when
):
    out = tmp_path / "run"
    kill_at = random.randint(5, 30) if when == "random_step" else 0
    if when == "first_checkpoint":
        _run_and_kill(out, lambda o: (o / "checkpoint.pt").exists())
    else:
        _run_and_kill(out, lambda o: _logged_step(o / "metrics.csv") >= kill_at)
    info = f"killed at logged step >= {kill_at}" if kill_at else "killed at the first checkpoint"
    killed_at = load_checkpoint(out / "checkpoint.pt")["step"]  # complete despite the kill
    assert 0 < killed_at < RESUME_STEPS, info

    assert train_cli("digits-uda-mpl", out, *RESUME_ARGS) == 0, info
    got, want = (load_checkpoint(p / "checkpoint.pt") for p in (out, uninterrupted))
    assert got["step"] == want["step"] == RESUME_STEPS
    for model in ("student", "teacher"):
        assert got[model].keys() == want[model].keys()
        for key, tensor in want[model].items():
            assert torch.equal(got[model][key], tensor), f"{model}.{key} differs ({info})"
        for param, state in want["optimizers"][model]["state"].items():
            buf = got["optimizers"][model]["state"][param]["momentum_buffer"]
            assert torch.equal(buf, state["momentum_buffer"]), info

    rows = read_rows(out / "metrics.csv")
    assert len({(s, n) for s, n, _ in rows}) == len(rows), f"duplicated rows ({info})"
    assert rows == read_rows(uninterrupted / "metrics.csv"), info
    got_results, want_results = (
        json.loads((p / "results.json").read_text())["results"] for p in (out, uninterrupted)
    )
    assert got_results == want_results


# --- 3. corrupt checkpoint, 4. other configuration ------------------------------------------


def test_a_checkpoint_of_another_format_version_is_refused_by_train_and_predict(tmp_path, capsys):
    """The engine wrote format_version but nothing read it: a checkpoint of another layout (a
    newer metapl's) was resumed, or predicted with, as if it were this one's."""
    from metapl.errors import CheckpointError
    from metapl.train.run_model import load_run_model

    out = tmp_path / "run"
    assert train_cli("digits-supervised", out, *tiny(4)) == 0
    ckpt = out / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    save_checkpoint(ckpt, {**state, "format_version": 2})
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert train_cli("digits-supervised", out, *tiny(6)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"checkpoint {ckpt} has format version 2; this metapl reads version 1" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(CheckpointError, match="format version 2"):
        load_run_model(out)


def test_corrupt_checkpoint_is_exit_2_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli("digits-supervised", out, *tiny(4)) == 0
    ckpt, prev = out / "checkpoint.pt", out / "checkpoint.prev.pt"
    final = load_checkpoint(ckpt)
    assert load_checkpoint(prev)["step"] == 2
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()

    assert train_cli("digits-supervised", out, *tiny(4)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"checkpoint {ckpt} is corrupt" in err and f"mv {prev} {ckpt}" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    # Following the hint resumes from step 2 and ends where the first run ended.
    os.replace(prev, ckpt)
    assert train_cli("digits-supervised", out, *tiny(4)) == 0
    resumed = load_checkpoint(ckpt)
    assert resumed["step"] == 4
    assert all(torch.equal(resumed["student"][k], v) for k, v in final["student"].items())

    # Without a previous checkpoint the message says so, and offers no mv.
    ckpt.write_bytes(b"not a checkpoint")
    prev.unlink()
    capsys.readouterr()
    assert train_cli("digits-supervised", out, *tiny(4)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert str(ckpt) in err and "no previous checkpoint" in err and "mv " not in err
    assert "delete it to start this run over" in err
    assert ckpt.read_bytes() == b"not a checkpoint" and (out / "results.json").exists()


def test_other_configuration_in_existing_run_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli("digits-uda", out, *tiny(4)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert train_cli("digits-uda", out, *tiny(4), "--set", "student_lr=0.123") == 2
    err = one_error_line(capsys.readouterr().err)
    assert "different configuration" in err and "student_lr" in err and "0.123" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    # Length and cadence may change: the same run continues to more steps.
    assert train_cli("digits-uda", out, *tiny(6)) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6


def test_results_of_another_configuration_without_a_checkpoint_are_kept(
    tmp_path, capsys, monkeypatch
):
    """A finished run whose checkpoints were deleted (to save space): another configuration
    trained into its folder replaced its results.json and metrics.csv without a word, and added
    its TensorBoard events to the old ones."""
    out = tmp_path / "run"
    assert train_cli("digits-uda", out, *tiny(4)) == 0
    for checkpoint in out.glob("checkpoint*.pt"):
        checkpoint.unlink()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert train_cli("digits-uda", out, *tiny(4), "--set", "student_lr=0.123") == 2
    err = one_error_line(capsys.readouterr().err)
    assert "holds train results of another configuration (student_lr=" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the same configuration starts over and reproduces them: allowed, whatever the cadence of
    # logs, evaluations and checkpoints and the device's name (auto, a CPU here; each but
    # log_every went unchecked)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    again = tiny(4, log_every=1, eval_every=2, checkpoint_every=4)
    assert train_cli("digits-uda", out, *["auto" if a == "cpu" else a for a in again]) == 0
    assert json.loads((out / "config.json").read_text())["device"] == "auto"


def test_results_of_an_older_metapl_without_a_checkpoint_are_rerun_at_the_new_key_default(
    tmp_path, capsys
):
    """A finished run of a metapl from before a config key existed, its checkpoints deleted: the
    same command was refused as "another configuration (mpl_baseline_decay=None)", though the
    key's default is the old behaviour (a checkpoint's resume already counted it so)."""
    out = tmp_path / "run"
    first_order = ("--set", "mpl_estimator=first_order")
    assert train_cli("digits-uda-mpl", out, *tiny(2), *first_order) == 0
    for checkpoint in out.glob("checkpoint*.pt"):
        checkpoint.unlink()
    results = json.loads((out / "results.json").read_text())
    del results["config"]["mpl_baseline_decay"]
    (out / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    # another value of the new key is still another configuration, and nothing is replaced
    # (not train_cli: it drops the key, which the preset's exact estimator does not read)
    decay = ("--set", "mpl_baseline_decay=0.5")
    args = ["train", "--preset", "digits-uda-mpl", "--out", str(out), *tiny(2)]
    assert main([*args, *first_order, *decay]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "another configuration (mpl_baseline_decay=-1" in err, err
    assert "mpl_baseline_decay" not in json.loads((out / "results.json").read_text())["config"]
    # the same command reruns
    assert train_cli("digits-uda-mpl", out, *tiny(2), *first_order) == 0
    assert json.loads((out / "results.json").read_text())["config"]["mpl_baseline_decay"] == -1


def test_fewer_steps_than_the_checkpoint_reached_are_refused(tmp_path, capsys):
    """`--steps 4` on a run at step 6 rewrote results.json and config.json as a 4-step run of the
    6-step model, replacing the true results."""
    out = tmp_path / "run"
    assert train_cli("digits-uda", out, *tiny(6)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert train_cli("digits-uda", out, *tiny(4)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "is at step 6, past the 4 steps this run asks for; give --steps 6 or more" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert train_cli("digits-uda", out, *tiny(6)) == 0  # the same length again: a rerun


def test_a_longer_steps_on_a_run_in_its_fine_tuning_is_refused(tmp_path, capsys):
    """A finished run of a fine-tuning preset, again with a longer --steps: it went on fine-tuning
    (its schedule ended at a learning rate of 0), no MPL step ran, and results.json called it a
    run of the longer --steps."""
    out = tmp_path / "run"
    finetune = ("--set", "finetune_steps=2")
    assert train_cli("digits-uda-mpl", out, *tiny(2), *finetune) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert train_cli("digits-uda-mpl", out, *tiny(3), *finetune) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "is at step 4, in the fine-tuning that followed its 2 steps: a longer --steps (3)" in err
    assert "give --steps 2 to finish it, or train the longer run into another --out" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert train_cli("digits-uda-mpl", out, *tiny(2), *finetune) == 0  # the same run: fine


def test_fewer_steps_than_a_run_whose_warmup_was_cut_says_so(tmp_path, capsys):
    """`--steps 4` cut the preset's warm-up to 4; `--steps 2` on that run cut it to 2 and was
    refused as "a different configuration (warmup_steps: 4 -> 2)", an option never set."""
    out = tmp_path / "run"
    args = ["train", "--preset", "digits-supervised", "--out", str(out), "--quiet"]
    args += ["--device", "cpu", "--set", "batch_size=10"]
    assert main([*args, "--steps", "4"]) == 0
    capsys.readouterr()
    assert main([*args, "--steps", "2"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "is at step 4, past the 2 steps this run asks for; give --steps 4 or more" in err, err
    # another difference besides is still named as such
    assert main([*args, "--steps", "2", "--set", "student_lr=0.5"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "different configuration" in err and "student_lr" in err, err


def _as_written_before(ckpt_path: Path, *keys: str) -> None:
    """Make the checkpoint look written by a metapl without the config ``keys``."""
    ckpt = load_checkpoint(ckpt_path)
    for key in keys:
        del ckpt["config"][key]
    ckpt["config_fingerprint"] = config_fingerprint(ckpt["config"])
    save_checkpoint(ckpt_path, ckpt)


def _as_written_before_memory_format_existed(ckpt_path: Path) -> None:
    _as_written_before(ckpt_path, "memory_format")


def test_a_run_folder_from_before_a_new_option_resumes_at_its_default(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli("digits-uda", out, *tiny(4)) == 0
    _as_written_before_memory_format_existed(out / "checkpoint.pt")
    # The option's default keeps the old behaviour: the run continues from step 4.
    assert train_cli("digits-uda", out, *tiny(6)) == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 6 and ckpt["config"]["memory_format"] == "auto"
    assert [s for s, n, _ in read_rows(out / "metrics.csv") if n == "student_loss"] == [2, 4, 6]

    # Another value of the new option is another configuration.
    _as_written_before_memory_format_existed(out / "checkpoint.pt")
    capsys.readouterr()
    args = ("--set", "memory_format=channels_last")
    assert train_cli("digits-uda", out, *tiny(8), *args) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "different configuration" in err and "memory_format" in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6


def test_gradient_clipping_keys_train_and_are_part_of_the_configuration(tmp_path, capsys):
    """student_grad_clip / teacher_grad_clip (0, off, in every preset): a UDA+MPL run takes both;
    another max norm is another configuration; a run folder from before the keys resumes at 0."""

    def clip(student: str, teacher: str) -> tuple[str, ...]:
        return ("--set", f"student_grad_clip={student}", "--set", f"teacher_grad_clip={teacher}")

    out, old = tmp_path / "run", tmp_path / "old"
    assert train_cli("digits-uda-mpl", out, *tiny(3), *clip("1.0", "2.0")) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["student_grad_clip"], config["teacher_grad_clip"]) == (1.0, 2.0)
    capsys.readouterr()
    assert train_cli("digits-uda-mpl", out, *tiny(4), *clip("1.0", "3.0")) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "different configuration" in err and "teacher_grad_clip: 2.0 -> 3.0" in err

    assert train_cli("digits-uda-mpl", old, *tiny(2)) == 0
    _as_written_before(old / "checkpoint.pt", "student_grad_clip", "teacher_grad_clip")
    assert train_cli("digits-uda-mpl", old, *tiny(3)) == 0
    assert load_checkpoint(old / "checkpoint.pt")["step"] == 3


# --- 5. bad options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "digits-uda", "--set", "no_such_key=1"], "unknown config key 'no_such_key'"),
        (["--preset", "digits-uda", "--set", "student_lr"], "expected key=value"),
        (["--preset", "digits-uda", "--set", "steps=abc"], "steps expects an integer"),
        (["--preset", "digits-uda", "--set", "flip=maybe"], "flip expects true or false"),
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--preset", "digits-uda", "--set", "method=mpl"], "method 'mpl' is not one of"),
        (["--preset", "digits-uda", "--set", "model=no_such_net"], "unknown model 'no_such_net'"),
        (
            ["--preset", "digits-uda", "--set", "steps=5"],
            "warmup_steps (100) must not exceed steps",
        ),
        (["--preset", "digits-uda", "--steps", "5", "--set", "warmup_steps=6"], "(6) must not"),
        (["--preset", "digits-uda", "--set", "student_dropout=1"], "student_dropout must be in"),
        (
            ["--preset", "digits-uda", "--set", "student_labeled_weight=1"],
            "applies to the +MPL methods only",
        ),
        (
            ["--preset", "digits-uda-mpl", "--set", "student_labeled_weight=-1"],
            "student_labeled_weight must be >= 0",
        ),
        (
            ["--preset", "digits-uda", "--set", "student_grad_clip=-1"],
            "student_grad_clip must be >= 0",
        ),
        (
            ["--preset", "digits-uda", "--set", "teacher_grad_clip=1"],
            "teacher_grad_clip applies to the +MPL methods only",
        ),
        # the value given, as every other choice's message says it (adamw: the library step
        # takes it, training runs do not)
        (
            ["--preset", "digits-uda", "--set", "student_optimizer=adamw"],
            "student_optimizer must be one of sgd, rmsprop, adam, got 'adamw'",
        ),
        # it said "(the paper reuses CIFAR-10's values)", SVHN's reason, not digits' remedy
        (
            ["--preset", "digits-uda", "--set", "tuning=true"],
            "digits has no tuning split by default: reserve one with --set tune_per_class=N",
        ),
    ],
)
def test_bad_options_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", *args]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("metapl train: error: ") and message in err
    assert not out.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--preset", "digits-uda"],
        ["twomoons", "--seeds", "0"],
        ["digits", "--seeds", "0"],
        ["reduced", "--seeds", "0"],
        ["tune", "--preset", "digits-uda", "--trials", "1", "--storage", "STORAGE"],
    ],
    ids=lambda c: c[0],
)
def test_out_in_place_of_a_file_is_exit_2_before_any_work(tmp_path, capsys, command):
    """Used to be a traceback after the work (twomoons trained every method first)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    command = [str(tmp_path / "s.db") if c == "STORAGE" else c for c in command]
    for out, where in ((a_file, "is a file"), (a_file / "run", f"is inside {a_file}")):
        assert main([*command, "--out", str(out), "--quiet"]) == 2
        err = one_error_line(capsys.readouterr().err)
        assert f"--out {out} {where}" in err and "choose another --out" in err
    assert a_file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_data_dir_that_is_a_file(tmp_path, capsys):
    a_file = tmp_path / "cifar.tar.gz"
    a_file.write_bytes(b"not a folder")
    assert train_cli("cifar10-4k-uda", tmp_path / "run", "--data-dir", str(a_file)) == 2
    assert f"--data-dir {a_file} is a file" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_short_steps_cut_the_presets_warmup_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli("digits-supervised", out, "--steps", "3", "--device", "cpu", "--quiet") == 0
    err = capsys.readouterr().err
    assert "warmup_steps lowered from 100 to 3 to fit --steps 3" in err
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 3 and config["warmup_steps"] == 3
    # The same command resumes the finished run (the same resolved configuration).
    assert train_cli("digits-supervised", out, "--steps", "3", "--device", "cpu", "--quiet") == 0
    # A longer --steps extends it with the warm-up it had: a new cut (to 5) was refused as
    # "a different configuration (warmup_steps: 3 -> 5)".
    capsys.readouterr()
    assert train_cli("digits-supervised", out, "--steps", "5", "--device", "cpu", "--quiet") == 0
    assert "warmup_steps 3, as in the run being resumed (the preset's is 100)" in (
        capsys.readouterr().err
    )
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 5 and config["warmup_steps"] == 3
    assert max(step for step, *_ in read_rows(out / "metrics.csv")) == 5


def test_short_steps_note_a_uda_ramp_that_outlasts_the_run(tmp_path, capsys):
    """digits-uda ramps the UDA factor over 200 steps: --steps 4 trained with 2% of it at the
    last step without a word. The note says so; the ramp is kept, as the config records."""
    quick = ["--steps", "4", "--device", "cpu", "--quiet", "--set", "eval_every=2"]
    assert train_cli("digits-uda", tmp_path / "run", *quick) == 0
    err = capsys.readouterr().err
    assert "warmup_steps lowered from 100 to 4 to fit --steps 4" in err
    assert "uda_warmup_steps 200 is longer than the run's 4 steps: the UDA factor reaches 2%" in err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["uda_warmup_steps"] == 200
    ramp = ["--set", "uda_warmup_steps=4"]
    assert train_cli("digits-uda", tmp_path / "ramped", *quick, *ramp) == 0
    assert "uda_warmup" not in capsys.readouterr().err


def test_the_first_order_estimator_is_noted_unless_its_weight_is_set(tmp_path, capsys):
    quick = ["--steps", "1", "--device", "cpu", "--quiet", "--set", "finetune_steps=0"]
    first_order = [*quick, "--set", "mpl_estimator=first_order"]
    assert train_cli("digits-uda-mpl", tmp_path / "run", *first_order) == 0
    err = capsys.readouterr().err
    assert "note: mpl_estimator=first_order sums its REINFORCE term over the 200 unlabeled" in err
    weighted = [*first_order, "--set", "mpl_weight=0.005"]
    assert train_cli("digits-uda-mpl", tmp_path / "weighted", *weighted) == 0
    assert "mpl_estimator=first_order" not in capsys.readouterr().err


@pytest.mark.parametrize("set_warmup", [0, 2])
def test_a_warmup_set_by_the_first_command_is_kept_when_steps_extend_it(
    tmp_path, capsys, set_warmup
):
    """A run trained with --set warmup_steps=N and a --steps below the preset's warm-up, extended
    by a longer --steps without the --set: N is the run's warm-up, 0 included (not cut to the new
    --steps, which was refused as another configuration)."""
    out, quick = tmp_path / "run", ("--device", "cpu", "--quiet")
    first = ("--set", f"warmup_steps={set_warmup}")
    assert train_cli("digits-supervised", out, "--steps", "3", *first, *quick) == 0
    capsys.readouterr()
    assert train_cli("digits-supervised", out, "--steps", "5", *quick) == 0
    assert f"warmup_steps {set_warmup}, as in the run being resumed" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 5 and config["warmup_steps"] == set_warmup


@pytest.mark.parametrize("damage", ["{not json", "[]", '{"warmup_steps": true}', None])
def test_a_damaged_config_json_takes_the_warmup_from_the_checkpoint(tmp_path, capsys, damage):
    """config.json hand-edited (or deleted) before a longer --steps: the warm-up the first --steps
    had cut was cut again, to the new --steps, and the resume was refused as "a different
    configuration (warmup_steps: 3 -> 5); use a new --out or the same options" though the options
    were the same. The checkpoint records the run's configuration too."""
    out = tmp_path / "run"
    args = ("--device", "cpu", "--quiet")
    assert train_cli("digits-supervised", out, "--steps", "3", *args) == 0
    if damage is None:
        (out / "config.json").unlink()
    else:
        (out / "config.json").write_text(damage)
    capsys.readouterr()
    assert train_cli("digits-supervised", out, "--steps", "5", *args) == 0
    assert "warmup_steps 3, as in the run being resumed" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())  # written whole again
    assert config["steps"] == 5 and config["warmup_steps"] == 3


def test_bad_preset_through_a_real_process(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "metapl", "train", "--preset", "cifar10-4k-mpl", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown preset 'cifar10-4k-mpl'" in one_error_line(proc.stderr)
    assert not out.exists()


def test_output_into_a_closed_pipe_stops_quietly():
    """`metapl presets | head -1`: the reader leaves early; no traceback, the status of SIGPIPE."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "metapl", "presets"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # before the listing is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert err == ""


# --- 6. NaN ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, lr, loss",
    [
        ("digits-supervised", "student_lr=1e30", "student_loss is nan"),
        ("digits-uda-mpl", "teacher_lr=1e30", "student_labeled_after is nan"),
    ],
)
def test_non_finite_loss_stops_the_run_without_a_poisoned_checkpoint(
    tmp_path, capsys, preset, lr, loss
):
    out = tmp_path / "run"
    args = tiny(10, log_every=1, checkpoint_every=1) + ["--set", "warmup_steps=0", "--set", lr]
    assert train_cli(preset, out, *args) == 2
    err = one_error_line(capsys.readouterr().err)
    assert loss in err and "stopped before writing a checkpoint" in err
    failed_at = int(err.split("error: step ", 1)[1].split(":", 1)[0])
    assert not (out / "results.json").exists()
    for path in (out / "checkpoint.pt", out / "checkpoint.prev.pt"):
        if path.exists():
            ckpt = load_checkpoint(path)
            assert ckpt["step"] < failed_at
            for model in ("student", "teacher"):
                for key, value in float_tensors(ckpt.get(model, {})).items():
                    assert torch.isfinite(value).all(), f"{path.name}: {model}.{key}"


# --- 7. dataset errors through the CLI -------------------------------------------------------


def _empty(root: Path) -> str:
    root.mkdir()
    return "cifar-10-batches-py/data_batch_1 is missing"


def _truncated_cifar(root: Path) -> str:
    path = root / "cifar-10-batches-py" / "data_batch_1"
    write_cifar_batch(path, random_images(10, 0), list(range(10)))
    path.write_bytes(path.read_bytes()[:5000])
    return "data_batch_1 is truncated or not a CIFAR-10 batch"


def _too_few_cifar(root: Path) -> str:
    write_cifar10(root, per_batch=10, test=10)
    return "has only 50 training images, but cifar10-4k needs 4000"


def _malformed_svhn(root: Path) -> str:
    root.mkdir()
    (root / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    return "train_32x32.mat is truncated or not a MATLAB v5 file"


def _missing_svhn(root: Path) -> str:
    root.mkdir()
    return "train_32x32.mat is missing"


@pytest.mark.parametrize(
    "preset, make",
    [
        ("cifar10-4k-supervised", _empty),
        ("cifar10-4k-uda-mpl", _truncated_cifar),
        ("cifar10-4k-uda", _too_few_cifar),
        ("svhn-1k-supervised", _malformed_svhn),
        ("svhn-1k-uda-mpl", _missing_svhn),
    ],
)
def test_dataset_errors_exit_2_naming_the_file(tmp_path, capsys, preset, make):
    data, out = tmp_path / "data", tmp_path / "run"
    expected = make(data)
    assert train_cli(preset, out, "--data-dir", str(data), "--quiet") == 2
    err = one_error_line(capsys.readouterr().err)
    assert expected in err and str(data) in err
    assert not out.exists()


def test_a_broken_jpeg_stops_the_run_where_it_is_read_and_a_rerun_resumes(
    tmp_path, capsys, monkeypatch
):
    """README's one exception to "before anything is written": ImageNet's JPEGs are decoded when
    first used, so a broken one stops the run there (one line naming it, exit 2), after
    config.json and metrics.csv exist; with the file replaced, the same command resumes from the
    last checkpoint and ends as an uninterrupted run. Here a test image breaks the evaluation at
    step 3, after the checkpoint of step 2."""
    from fake_datasets import write_imagenet

    data = write_imagenet(tmp_path / "imagenet", {"n01": 10, "n02": 10}, {"n01": 2, "n02": 2})
    broken = data / "val" / "n02" / "n02_0001.JPEG"
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 3])
    args = ["--data-dir", str(data), *tiny(4, log_every=1, eval_every=3), "--set", "pad=1"]
    for key_value in ("model=small_cnn", "image_size=8", "eval_batch_size=8", "batch_size=4"):
        args += ["--set", key_value]
    out = tmp_path / "run"
    assert train_cli("imagenet-full-supervised", out, *args) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"{broken} is not a readable image" in err
    assert (out / "config.json").exists() and (out / "metrics.csv").exists()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert not (out / "results.json").exists()

    broken.write_bytes(good)
    from metapl.train import engine

    taken = []
    advance = engine.Run.advance
    monkeypatch.setattr(
        engine.Run, "advance", lambda run, source: taken.append(run.step) or advance(run, source)
    )
    assert train_cli("imagenet-full-supervised", out, *args) == 0
    assert taken == [2, 3]  # from the checkpoint of step 2, not from the start
    assert train_cli("imagenet-full-supervised", tmp_path / "unbroken", *args) == 0
    got, want = (load_checkpoint(p / "checkpoint.pt") for p in (out, tmp_path / "unbroken"))
    assert got["step"] == want["step"] == 4
    assert all(torch.equal(got["student"][k], v) for k, v in want["student"].items())
    assert read_rows(out / "metrics.csv") == read_rows(tmp_path / "unbroken" / "metrics.csv")


def test_a_run_resumes_only_on_the_data_it_started_with(tmp_path, capsys):
    """The split is a function of the files: one deleted between a stop and the resume would move
    images between labeled and unlabeled halfway through. The resume is refused (one line, exit
    2, the checkpoint and the rows as they were); with the file back it resumes; a checkpoint from
    before metapl recorded its data resumes as before."""
    from fake_datasets import write_imagenet

    data = write_imagenet(tmp_path / "imagenet", {"n01": 10, "n02": 10}, {"n01": 2, "n02": 2})
    args = ["--data-dir", str(data), *tiny(2, log_every=1, eval_every=2), "--set", "pad=1"]
    for key_value in ("model=small_cnn", "image_size=8", "eval_batch_size=8", "batch_size=4"):
        args += ["--set", key_value]
    longer = [*args, "--steps", "4"]
    out = tmp_path / "run"
    assert train_cli("imagenet-full-supervised", out, *args) == 0
    capsys.readouterr()
    saved = (out / "checkpoint.pt").read_bytes()
    rows = read_rows(out / "metrics.csv")
    gone = data / "train" / "n01" / sorted(os.listdir(data / "train" / "n01"))[0]
    kept = gone.read_bytes()
    gone.unlink()
    assert train_cli("imagenet-full-supervised", out, *longer) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "was written by a run on other data than this run loaded" in err
    assert "(then 19 labeled, 19 unlabeled and 4 test images, now 18 labeled, " in err
    assert (out / "checkpoint.pt").read_bytes() == saved
    assert read_rows(out / "metrics.csv") == rows

    gone.write_bytes(kept)
    assert train_cli("imagenet-full-supervised", out, *longer) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["data"]["labeled"] == 19 and len(ckpt["data"]["fingerprint"]) == 64
    del ckpt["data"]  # as a checkpoint of an earlier metapl: nothing to compare
    save_checkpoint(out / "checkpoint.pt", ckpt)
    gone.unlink()
    assert train_cli("imagenet-full-supervised", out, *[*args, "--steps", "5"]) == 0


def test_ctrl_c_names_the_step_a_rerun_resumes_from_and_the_rerun_says_it_resumes(
    tmp_path, capsys, monkeypatch
):
    """Ctrl-C stops at once (no checkpoint of the step in progress): its line names the step and
    the last checkpoint's, or that there is none yet; the rerun says where it resumes, or that it
    starts over (a run folder without a checkpoint)."""
    from metapl.train import engine

    advance = engine.Run.advance

    def interrupted_at(stop: int):
        def step(run, source):
            if run.step == stop:
                raise KeyboardInterrupt
            return advance(run, source)

        return step

    out = tmp_path / "run"
    shown = [a for a in tiny(8) if a != "--quiet"]
    monkeypatch.setattr(engine.Run, "advance", interrupted_at(1))
    assert train_cli("digits-supervised", out, *tiny(8)) == 130
    assert capsys.readouterr().err == (
        "metapl train: interrupted after step 1 of 8, before its first checkpoint; the same "
        "command starts it again\n"
    )
    monkeypatch.setattr(engine.Run, "advance", interrupted_at(5))
    assert train_cli("digits-supervised", out, *shown) == 130
    err = capsys.readouterr().err
    assert err.startswith(
        f"metapl train: starting {out} over from step 0: it holds no checkpoint (they are saved "
        "every 2 steps)\n"
    )
    assert err.endswith(
        "metapl train: interrupted after step 5 of 8, its last checkpoint is of step 4; the "
        "same command resumes from it (SIGTERM, unlike Ctrl-C, saves the step in progress "
        "first)\n"
    )
    monkeypatch.setattr(engine.Run, "advance", advance)
    assert train_cli("digits-supervised", out, *shown) == 0
    err = capsys.readouterr().err
    assert f"metapl train: resuming {out} from its checkpoint of step 4 of 8\n" in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 8


def test_dataset_preset_without_data_dir(tmp_path, capsys):
    assert train_cli("svhn-1k-uda", tmp_path / "run", "--quiet") == 2
    assert "needs --data-dir" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


# --- 9. presets -------------------------------------------------------------------------------

TABLE1_METHODS = (
    "supervised",
    "label-smoothing",
    "supervised-mpl",
    "randaugment",
    "randaugment-mpl",
    "uda",
    "uda-mpl",
)
TABLE3_KEYS = (
    "student_lr",
    "teacher_lr",
    "student_dropout",
    "teacher_dropout",
    "uda_factor",
    "uda_temperature",
    "weight_decay",
    "label_smoothing",
    "steps",
    "warmup_steps",
    "batch_size",
)
TABLE3 = {  # uda-mpl presets: Table 3 of the paper, a row per dataset in TABLE3_KEYS' order
    name: dict(zip(TABLE3_KEYS, row, strict=True))
    for name, row in {
        "cifar10-4k": (0.3, 0.125, 0.35, 0.5, 1.0, 0.8, 5e-4, 0.0, 1_000_000, 2000, 128),
        "svhn-1k": (0.15, 0.05, 0.45, 0.65, 2.5, 1.25, 5e-4, 0.0, 1_000_000, 2000, 128),
        "imagenet-10pct": (0.8, 0.5, 0.1, 0.1, 16.0, 0.75, 2e-4, 0.1, 500_000, 1000, 2048),
    }.items()
}


@pytest.mark.parametrize(
    "name", ["digits-uda-mpl", "cifar10-4k-uda-mpl", "digits-reduced-reduced-mpl"]
)
def test_presets_name_prints_a_preset_file_that_reads_back_as_the_preset(tmp_path, capsys, name):
    """`metapl presets NAME > my.toml`: the one way to start a preset file of your own from a
    built-in one (a copy of a built-in dataset file holds every row's [methods.*] tables)."""
    assert main(["presets", name]) == 0
    path = tmp_path / "mine.toml"
    path.write_text(capsys.readouterr().out)
    differ = {
        k: v
        for k, v in load_preset(str(path)).to_dict().items()
        if load_preset(name).to_dict()[k] != v
    }
    assert differ == {"preset": str(path)}
    assert main(["presets", "digits-uda-mlp"]) == 2
    assert (
        "unknown preset 'digits-uda-mlp' (did you mean digits-uda-mpl?)" in capsys.readouterr().err
    )


def test_a_copy_of_a_built_in_dataset_file_is_refused_pointing_to_presets_name(tmp_path, capsys):
    """Its [methods.*] tables were "unknown config key 'methods' (did you mean method?)"."""
    from importlib import resources

    copy = tmp_path / "my.toml"
    copy.write_text((resources.files("metapl") / "presets" / "digits.toml").read_text())
    assert main(["train", "--preset", str(copy), "--out", str(tmp_path / "run")]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"preset file {copy}: [methods.*] tables belong to metapl's own dataset files" in err
    assert f"`metapl presets NAME > {copy}` writes the built-in preset NAME as one" in err


def test_presets_lists_every_table1_row_and_digits(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    # the teacher's learning rate only where there is a teacher (`--set` refuses it elsewhere)
    for line in lines:
        assert ("teacher_lr=" in line) == any(m in line for m in ("_mpl,", "reduced_mpl")), line
    expected = {f"{d}-{m}" for d in TABLE3 for m in TABLE1_METHODS}
    expected |= {f"digits-{m}" for m in TABLE1_METHODS}  # Table 1 on real images, on a CPU
    expected |= {"folder-supervised", "folder-uda", "folder-uda-mpl"}  # your own images
    figure7 = {  # ImageNet at 20/40/80% of the labels
        f"imagenet-{pct}pct-{m}"
        for pct in (20, 40, 80)
        for m in ("supervised", "randaugment", "uda-mpl")
    }
    table2 = {
        f"{d}-{m}"
        for d in ("cifar10-full", "svhn-full", "imagenet-full", "digits-reduced")
        for m in ("large-teacher", "supervised", "noisy-student", "reduced-mpl")
    }
    assert sorted(names) == sorted(expected | table2 | figure7)
    for name in names:
        cfg = load_preset(name)
        if cfg.method in ("noisy_student", "reduced_mpl"):
            # these learn from a finished large-teacher run, given at train time
            cfg = apply_overrides(cfg, {"large_teacher": "RUN_DIR"})
        cfg = cfg.validate()
        assert cfg.preset == name and name.startswith(cfg.dataset)
        if name in expected | figure7:
            assert cfg.method.replace("_", "-") == name[len(cfg.dataset) + 1 :]
        assert cfg.label_smoothing > 0 or "label-smoothing" not in name


@pytest.mark.parametrize("dataset", sorted(TABLE3))
def test_uda_mpl_presets_have_table3_values(dataset):
    cfg = load_preset(f"{dataset}-uda-mpl")
    assert cfg.method == "uda_mpl" and cfg.dataset == dataset and cfg.momentum == 0.9
    assert {key: getattr(cfg, key) for key in TABLE3[dataset]} == TABLE3[dataset]
    assert cfg.model == ("resnet50" if dataset == "imagenet-10pct" else "wrn28_2")
    # not in Table 3: UDA's own confidence thresholds (Xie et al. 2019), 0.5 on ImageNet
    assert cfg.uda_threshold == (0.5 if dataset == "imagenet-10pct" else 0.8)


def test_a_preset_file_by_another_name_is_the_same_run(tmp_path, monkeypatch, capsys):
    """`--preset p/x.toml`, resumed as `--preset ./p/x.toml` (or by its absolute path), was "a
    different configuration (preset: 'p/x.toml' -> './p/x.toml')". Another file is still
    another configuration, even with the same settings."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p").mkdir()
    settings = 'dataset = "digits"\nmodel = "digits_cnn"\nmethod = "supervised"\nimage_size = 8\n'
    (tmp_path / "p" / "x.toml").write_text(settings)
    (tmp_path / "p" / "y.toml").write_text(settings)
    quick = ["--steps", "2", "--device", "cpu", "--quiet", "--set", "batch_size=10"]
    assert main(["train", "--preset", "p/x.toml", "--out", "run", *quick]) == 0
    for name in ("./p/x.toml", str(tmp_path / "p" / "x.toml")):
        assert main(["train", "--preset", name, "--out", "run", *quick[:1], "3", *quick[2:]]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3
    capsys.readouterr()
    assert main(["train", "--preset", "p/y.toml", "--out", "run", "--steps", "4", *quick[2:]]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "different configuration (preset: './p/x.toml' -> 'p/y.toml')" in err, err


def test_preset_from_a_toml_file(tmp_path, capsys):
    preset = tmp_path / "mine.toml"
    preset.write_text(
        '# a tuned digits run\ndataset = "digits"\nmodel = "digits_cnn"\nmethod = "uda"\n'
        "image_size = 8\npad = 1\ncutout = 3\nflip = false\nwarmup_steps = 1\n"
        "uda_warmup_steps = 1\nbatch_size = 10\nunlabeled_ratio = 2\nstudent_lr = 0.02\n"
    )
    out = tmp_path / "run"
    assert train_cli(str(preset), out, "--steps", "3", "--device", "cpu", "--quiet") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == str(preset) and config["student_lr"] == 0.02
    assert config["method"] == "uda" and config["steps"] == 3
    assert json.loads((out / "results.json").read_text())["results"][0]["method"] == "uda"

    capsys.readouterr()
    bad = tmp_path / "bad.toml"
    bad.write_text("dataset = digits\nsteps = [1,\n")
    assert train_cli(str(bad), tmp_path / "bad_run", "--quiet") == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"preset file {bad} is not valid TOML" in err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("stpes = 10\n")
    assert train_cli(str(unknown), tmp_path / "bad_run", "--quiet") == 2
    assert f"preset file {unknown}: unknown config key 'stpes'" in one_error_line(
        capsys.readouterr().err
    )
    # a bad value names the file too: it read like a mistake in --set
    unknown.write_text('student_lr = "fast"\n')
    assert train_cli(str(unknown), tmp_path / "bad_run", "--quiet") == 2
    assert f"preset file {unknown}: student_lr expects a number" in one_error_line(
        capsys.readouterr().err
    )
    assert train_cli(str(tmp_path / "absent.toml"), tmp_path / "bad_run", "--quiet") == 2
    assert "absent.toml does not exist" in one_error_line(capsys.readouterr().err)
    # a folder named like a preset file was one that "does not exist" too
    (tmp_path / "folder.toml").mkdir()
    assert train_cli(str(tmp_path / "folder.toml"), tmp_path / "bad_run", "--quiet") == 2
    err = one_error_line(capsys.readouterr().err)
    assert "folder.toml is a folder, not a .toml file" in err, err
    assert not (tmp_path / "bad_run").exists()


# --- 10. metapl digits ------------------------------------------------------------------------


def test_digits_command_writes_results_and_figure9(tmp_path, capsys):
    out = tmp_path / "digits"
    methods = "supervised,uda_mpl,label_spreading"
    args = ["digits", "--seeds", "0", "--steps", "4", "--out", str(out), "--methods", methods]
    assert main([*args, "--quiet"]) == 0
    payload = json.loads((out / "results.json").read_text())
    records = payload["results"]
    assert [(r["method"], r["seed"]) for r in records] == [
        ("supervised", 0),
        ("uda_mpl", 0),
        ("label_spreading", 0),
    ]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    assert all(r["steps"] == 4 for r in records[:2])
    assert set(payload["summary"]) == {
        "supervised",
        "uda_mpl",
        "uda_mpl_before_finetune",
        "label_spreading",
    }
    assert payload["paired"] == {}  # one seed: no paired difference to report
    assert (out / "figure9.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series = json.loads((out / "figure9.json").read_text())
    assert set(series) == {"Supervised", "MPL teacher", "MPL student"}
    for values in series.values():
        # evaluated at the end of the 4 main steps (and after the MPL student's fine-tuning)
        assert values["steps"][0] == 4 and 0.0 <= values["accuracy"][0] <= 1.0
    for method in ("supervised", "uda_mpl"):
        assert (out / method / "seed0" / "checkpoint.pt").exists()
    printed = capsys.readouterr().out
    assert "label_spreading" in printed
    assert f"wrote {out}/results.json, figure9.png, figure9.json;" in printed

    bad = tmp_path / "bad"
    assert main(["digits", "--seeds", "0", "--out", str(bad), "--methods", "uda,nope"]) == 2
    assert "unknown digits method 'nope'" in one_error_line(capsys.readouterr().err)
    assert main(["digits", "--seeds", "0", "--out", str(bad), "--methods", " , "]) == 2
    assert "name at least one" in one_error_line(capsys.readouterr().err)
    assert not bad.exists()
    assert not bad.exists()


def test_digits_with_label_spreading_alone_names_no_run_folders(tmp_path, capsys):
    """It printed "each run's folder in OUT/METHOD/seedN", but LabelSpreading writes none."""
    out = tmp_path / "digits"
    args = ["digits", "--seeds", "0", "--methods", "label_spreading", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out}/results.json"
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_a_digits_rerun_replaces_only_results_of_the_same_configuration(tmp_path, capsys):
    """A rerun into the same --out with other seeds silently replaced the earlier results.json."""
    out = tmp_path / "digits"
    args = ["digits", "--steps", "2", "--methods", "supervised,label_spreading"]
    args += ["--out", str(out), "--quiet"]
    assert main([*args, "--seeds", "0"]) == 0
    earlier = json.loads((out / "results.json").read_text())
    run = out / "supervised" / "seed0"
    written = (run / "checkpoint.pt").stat().st_mtime_ns, (run / "metrics.csv").read_bytes()
    # the same command again reuses the finished runs (trains no step, writes no checkpoint): the
    # same results; without --quiet it says so first
    capsys.readouterr()
    assert main([*[a for a in args if a != "--quiet"], "--seeds", "0"]) == 0
    assert capsys.readouterr().err.startswith(
        f"metapl digits: resuming in {out}: 1 of its 1 training runs have a checkpoint there"
    )
    assert json.loads((out / "results.json").read_text())["results"] == earlier["results"]
    assert (
        (run / "checkpoint.pt").stat().st_mtime_ns,
        (run / "metrics.csv").read_bytes(),
    ) == written
    capsys.readouterr()
    assert main([*args, "--seeds", "1"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "holds digits results of another configuration (seeds=[0])" in err
    assert "choose another --out" in err
    assert json.loads((out / "results.json").read_text()) == earlier
    assert not (out / "supervised" / "seed1").exists()  # refused before any work
    assert main([*args, "--seeds", "0", "--set", "eval_every=1"]) == 2
    assert "another configuration (overrides={})" in one_error_line(capsys.readouterr().err)


def test_digits_paired_differences_are_seed_by_seed():
    acc = {"uda_mpl": [0.97, 0.98, 0.96], "uda": [0.96, 0.98, 0.97], "supervised": [0.9, 0.8, 0.7]}
    records = [
        {"method": m, "seed": s, "accuracy": a}
        for m, accs in acc.items()
        for s, a in enumerate(accs)
    ]
    records.append({"method": "label_spreading", "seed": 0, "accuracy": 0.93})  # one seed only
    paired = paired_differences(records)
    assert set(paired) == {"uda_mpl - uda", "uda_mpl - supervised"}
    p = paired["uda_mpl - uda"]
    assert p["n"] == 3 and p["wins_ties_losses"] == [1, 1, 1]
    assert p["mean"] == pytest.approx(0.0, abs=1e-12)
    # differences +0.01, 0, -0.01: sample std 0.01, standard error 0.01 / sqrt(3)
    assert p["standard_error"] == pytest.approx(0.01 / 3**0.5)
    assert paired["uda_mpl - supervised"]["mean"] == pytest.approx((0.07 + 0.18 + 0.26) / 3)


def test_digits_pairs_each_mpl_row_with_its_own_baseline():
    acc = {
        "supervised_mpl": [0.93, 0.91],
        "supervised": [0.90, 0.92],
        "randaugment_mpl": [0.95, 0.96],
        "randaugment": [0.94, 0.93],
        "uda_mpl": [0.97, 0.98],
    }
    records = [
        {"method": m, "seed": s, "accuracy": a}
        for m, accs in acc.items()
        for s, a in enumerate(accs)
    ]
    paired = paired_differences(records)
    assert set(paired) == {
        "supervised_mpl - supervised",
        "randaugment_mpl - randaugment",
        "uda_mpl - supervised",
        "uda_mpl - supervised_mpl",
        "uda_mpl - randaugment",
        "uda_mpl - randaugment_mpl",
    }
    assert paired["supervised_mpl - supervised"]["mean"] == pytest.approx((0.03 - 0.01) / 2)
    assert paired["supervised_mpl - supervised"]["wins_ties_losses"] == [1, 0, 1]
    assert paired["randaugment_mpl - randaugment"]["mean"] == pytest.approx((0.01 + 0.03) / 2)


def test_digits_runs_the_other_table1_rows(tmp_path, capsys):
    out = tmp_path / "digits"
    methods = "label_smoothing,supervised_mpl,randaugment,randaugment_mpl"
    args = ["digits", "--seeds", "0-1", "--steps", "3", "--out", str(out), "--quiet"]
    assert main([*args, "--methods", methods]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in payload["results"]] == [
        (m, s) for m in methods.split(",") for s in (0, 1)
    ]
    configs = {
        m: json.loads((out / m / "seed1" / "config.json").read_text()) for m in methods.split(",")
    }
    assert {m: c["method"] for m, c in configs.items()} == {m: m for m in methods.split(",")}
    assert configs["label_smoothing"]["label_smoothing"] == 0.1
    # the +MPL rows fine-tune their student as UDA+MPL does (a fifth of the run)
    assert configs["supervised_mpl"]["finetune_steps"] == 1
    assert configs["randaugment"]["finetune_steps"] == 0
    # supervised_mpl's baseline did not run: only RandAugment's pair is there
    assert set(payload["paired"]) == {"randaugment_mpl - randaugment"}
    printed = capsys.readouterr().out
    assert (
        "randaugment_mpl - randaugment" in printed and "supervised_mpl_before_finetune" in printed
    )


def test_digits_set_overrides_every_method_or_one(tmp_path, capsys):
    out = tmp_path / "digits"
    args = ["digits", "--seeds", "3", "--steps", "3", "--out", str(out), "--quiet"]
    args += ["--methods", "supervised,uda_mpl", "--set", "eval_every=2"]
    args += ["--set", "uda_mpl:teacher_lr=0.0123", "--set", "uda_mpl:steps=2"]
    assert main([*args, "--set", "uda_mpl:warmup_steps=2"]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["overrides"] == {
        "*": {"eval_every": "2"},
        "uda_mpl": {"teacher_lr": "0.0123", "steps": "2", "warmup_steps": "2"},
    }
    configs = {
        m: json.loads((out / m / "seed3" / "config.json").read_text())
        for m in ("supervised", "uda_mpl")
    }
    assert configs["supervised"]["eval_every"] == configs["uda_mpl"]["eval_every"] == 2
    assert configs["uda_mpl"]["teacher_lr"] == 0.0123 and configs["uda_mpl"]["steps"] == 2
    assert configs["supervised"]["teacher_lr"] != 0.0123 and configs["supervised"]["steps"] == 3
    # the MPL teacher's own test accuracy is recorded beside the student's (never used to choose)
    record = next(r for r in payload["results"] if r["method"] == "uda_mpl")
    assert 0.0 <= record["teacher_accuracy"] <= 1.0

    for bad_set, message in [
        ("stpes=3", "unknown config key 'stpes'"),
        ("uda:steps", "expected key=value or METHOD:key=value"),
        ("label_spreading:steps=3", "'label_spreading' is not a trained digits method"),
        ("udampl:steps=3", "randaugment_mpl, uda, uda_mpl (did you mean uda_mpl?)"),
        ("uda:steps=many", "steps expects an integer"),
    ]:
        bad = tmp_path / "bad"
        assert main(["digits", "--seeds", "0", "--out", str(bad), "--set", bad_set]) == 2
        assert message in one_error_line(capsys.readouterr().err)
        assert not bad.exists()
