"""Friction found by following the README and docs/*.md as a new user, in a fresh venv.

Each test failed before its fix: two commands into one --out at once both ran to the end; an error
was glued to the progress bar's line and the bar was redrawn after it; a mistyped option printed
argparse's usage block and the top-level parser's message without the command's name; `--seeds 5-1`
was "expected a range like 0-9"; the help of several commands had no example and hid defaults
(`metapl digits --device` is cpu, not train's auto); `metapl train --steps 10` on a preset that
fine-tunes ran 310 steps and said "after 10 steps"; the `metapl tune` hint to train best.toml
left out the --data-dir the dataset needs.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_cli import one_error_line, tiny, train_cli

from metapl.cli import EXAMPLES, build_parser, main, parse_seeds
from metapl.errors import ConfigError
from metapl.tuning.runner import Tuner

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ROOT = Path(__file__).parent.parent


def _error(argv: list[str], capsys) -> str:
    """The one stderr line of a command line that argparse refuses (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return one_error_line(capsys.readouterr().err)


# --- two commands into one --out -------------------------------------------------------------


def test_a_second_command_into_a_running_commands_out_is_refused_before_any_work(tmp_path, capsys):
    """Both used to run to the end: one metrics.csv, two TensorBoard files, each results.json
    replacing the other's. A real `metapl train` process holds the folder here."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "metapl", "train", "--preset", "digits-supervised"]
    cmd += ["--steps", "100000", "--set", "eval_every=100000", "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # it is training, with its files made (the running process keeps writing them, so what
        # is compared below is what a second command would add or replace)
        while not ((out / "metrics.csv").exists() and list(out.glob("tb/events.*"))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        events, config = list(out.glob("tb/events.*")), (out / "config.json").read_bytes()
        for command in (
            ["train", "--preset", "digits-supervised", "--steps", "200"],
            ["twomoons", "--seeds", "0", "--steps", "2"],
        ):
            assert main([*command, "--out", str(out), "--quiet"]) == 2
            err = one_error_line(capsys.readouterr().err)
            assert f"--out {out} is in use by another metapl command that is still running" in err
        assert list(out.glob("tb/events.*")) == events  # no second TensorBoard file
        assert (out / "config.json").read_bytes() == config and not (out / "results.json").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # The kernel dropped the killed process's lock: the folder is free again (this command gets
    # past the claim, to a mistake of its own found later).
    args = ["--preset", "digits-supervised", "--steps", "200", "--set", "model=mlp"]
    assert main(["train", *args, "--out", str(out)]) == 2
    assert "model mlp cannot take" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["digits", "reduced"])
def test_digits_and_reduced_hold_their_run_folders_while_they_run(
    tmp_path, capsys, monkeypatch, command
):
    """`metapl train --out` one of the run folders of a running `metapl digits` or `reduced`
    (OUT/METHOD/seedN) is refused, as for their --out; they let go of them when they end, so the
    same call in the same process (the library's) holds them again."""
    import metapl.experiments.digits as digits
    import metapl.experiments.reduced as reduced

    out = tmp_path / "out"
    run = out / ("supervised" if command == "digits" else "large_teacher") / "seed3"
    seen = []

    def instead_of_training(cfg, where, show_progress):
        args = ["train", "--preset", "digits-supervised", "--steps", "2", "--quiet"]
        seen.append(main([*args, "--out", str(run)]))
        seen.append(one_error_line(capsys.readouterr().err))
        return {}

    module = digits if command == "digits" else reduced
    monkeypatch.setattr(module, "_train_and_report", instead_of_training)
    if command == "digits":
        config = digits.DigitsConfig(seeds=[3], methods=("supervised",))
    else:
        config = reduced.ReducedConfig(seeds=[3], students=("supervised",))
    runner = digits.run_digits if command == "digits" else reduced.run_reduced
    for _ in range(2):
        runner(config, out, show_progress=False)
        assert seen[0] == 2 and f"--out {run} is in use by another metapl command" in seen[1]
        seen.clear()
    # and free afterwards (train gets past the hold; only the run folder made here is left)
    args = ["train", "--preset", "digits-supervised", "--steps", "2", "--quiet"]
    assert main([*args, "--out", str(run), "--set", "model=mlp"]) == 2
    assert "model mlp cannot take" in one_error_line(capsys.readouterr().err)


def test_a_digits_run_folder_holding_files_metapl_did_not_write_is_refused(tmp_path, capsys):
    """As for --out: a project's config.json inside OUT/METHOD/seedN was overwritten by the run."""
    run = tmp_path / "out" / "supervised" / "seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text('{"mine": true}')
    args = ["digits", "--seeds", "0", "--steps", "2", "--methods", "supervised", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "config.json, which metapl did not write" in err
    assert (run / "config.json").read_text() == '{"mine": true}'


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--preset", "digits-supervised", "--steps", "200", "--quiet"],
        ["twomoons", "--seeds", "0", "--steps", "2", "--quiet"],
        ["digits", "--seeds", "0", "--steps", "2", "--methods", "supervised", "--quiet"],
        ["reduced", "--seeds", "0", "--steps", "2", "--methods", "supervised", "--quiet"],
    ],
    ids=lambda c: c[0],
)
def test_each_command_that_holds_its_out_is_refused_one_that_is_held(tmp_path, capsys, command):
    """README: train, twomoons, digits and reduced hold their --out while they run, and a second
    command into it is refused before any work. The test above holds the folder with train and
    tries train and twomoons only; here the folder is held as a running command holds it (a flock
    on the folder), and each of the four must refuse it."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main([*command, "--out", str(out)]) == 2
        err = one_error_line(capsys.readouterr().err)
        assert f"--out {out} is in use by another metapl command that is still running" in err
        assert list(out.iterdir()) == []
    finally:
        os.close(fd)


def test_tune_processes_share_their_out(tmp_path, capsys, monkeypatch):
    """README: `metapl tune` processes share their --out on purpose (several workers of one
    study): a held folder does not stop a tune."""
    import fcntl

    import metapl.tuning

    out = tmp_path / "tune"
    out.mkdir()
    monkeypatch.setattr(metapl.tuning, "tune", lambda opts: opts.out / "best.toml")
    args = ["tune", "--preset", "digits-uda", "--trials", "1", "--out", str(out)]
    args += ["--storage", f"sqlite:///{tmp_path / 's.db'}"]
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(args) == 0
    finally:
        os.close(fd)
    assert capsys.readouterr().out.startswith(f"wrote {out / 'best.toml'}")


def test_a_command_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    """The folder is created when the command claims it; a mistake found later removes it again,
    with the parents it created, and leaves a folder that already existed."""
    out = tmp_path / "new" / "run"
    args = ["--preset", "digits-uda", "--steps", "2", "--set", "model=mlp", "--quiet"]
    assert main(["train", *args, "--out", str(out)]) == 2
    assert sorted(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    assert main(["train", *args, "--out", str(tmp_path / "kept")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    capsys.readouterr()


# --- an error after a progress bar -----------------------------------------------------------


def test_an_error_during_a_run_is_the_last_line_and_not_glued_to_the_bar(tmp_path, capsys):
    """With the bar on (no --quiet): the message came right after the bar's text on its line, and
    the bar, closed only when garbage-collected, was drawn once more after it."""
    args = ["--steps", "10", "--device", "cpu", "--set", "log_every=1", "--set", "warmup_steps=0"]
    assert train_cli("digits-supervised", tmp_path / "run", *args, "--set", "student_lr=1e30") == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert lines[0].startswith("digits-supervised:")  # the bar was shown
    assert re.match(r"metapl train: error: step \d+: student_loss is nan", lines[-1]), lines[-1]
    assert sum("error:" in line for line in lines) == 1
    assert err.endswith("\n" + lines[-1] + "\n")


# --- mistakes in the options -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["twomoons", "--out", "x", "--stesp", "5"],
            "metapl twomoons: error: unrecognized arguments: --stesp 5 (did you mean --steps?)",
        ),
        (
            ["train", "--preset", "digits-uda", "--out", "x", "--data_dir", "D"],
            "metapl train: error: unrecognized arguments: --data_dir D (did you mean --data-dir?)",
        ),
        (
            ["train", "--preset", "digits-uda", "--out", "x", "--device", "gpu"],
            "metapl train: error: argument --device: invalid choice: 'gpu' (choose from 'auto', "
            "'cpu', 'cuda') (did you mean cuda?)",  # by meaning: cpu is closer in spelling
        ),
        (["twomons", "--out", "x"], "metapl: error: argument COMMAND: invalid choice: 'twomons'"),
        # a mistyped required option: argparse said only that --preset was missing
        (
            ["train", "--prest", "digits-uda", "--out", "x"],
            "metapl train: error: unrecognized arguments: --prest (did you mean --preset?)",
        ),
        (
            ["tune", "--preset", "digits-uda", "--trials", "2", "--storage=x", "--ot", "x"],
            "metapl tune: error: unrecognized arguments: --ot (did you mean --out?)",
        ),
        # a missing option, with nothing mistyped (a negative number is a value, not an option)
        (
            ["train", "--out", "x", "--steps", "-5"],
            "metapl train: error: the following arguments are required: --preset",
        ),
        # nor is an option abbreviated as argparse allows it (`--pre` is --preset)
        (
            ["train", "--pre", "digits-uda"],
            "metapl train: error: the following arguments are required: --out",
        ),
    ],
)
def test_a_mistyped_option_is_one_line_naming_the_command(tmp_path, capsys, argv, expected):
    """It was argparse's usage block, then the message; for an option unknown to a command, the
    usage and the message of `metapl` itself, which did not say whose option it was."""
    err = _error(argv, capsys)
    assert err.startswith(expected), err
    prog = expected.split(": error:")[0]
    assert err.endswith(f"; see `{prog} --help`\n")


def test_a_config_key_in_other_case_names_the_key(tmp_path, capsys):
    argv = ["train", "--preset", "digits-uda", "--out", str(tmp_path / "r")]
    assert main([*argv, "--set", "TEACHER_LR=0.1"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "unknown config key 'TEACHER_LR' (did you mean teacher_lr" in err, err


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["trian", "--preset", "digits-uda"], "(did you mean train?); see `metapl --help`"),
        (["bench", "--device", "cdua", "--json", "x"], "(did you mean cuda?); see `metapl bench"),
        (["twomoons", "--estimator", "exakt"], "(did you mean exact?); see `metapl twomoons"),
    ],
)
def test_a_mistyped_command_or_choice_names_the_closest_one(capsys, argv, hint):
    """As a mistyped option does: `metapl trian` listed the commands without saying which."""
    assert hint in _error(argv, capsys)


def test_seeds_counting_down_say_so():
    with pytest.raises(ConfigError, match="the range 5-1 counts down; write it 1-5"):
        parse_seeds("5-1")
    with pytest.raises(ConfigError, match="the range 9-3 counts down"):
        parse_seeds("0,9-3")


@pytest.mark.parametrize(
    "set_option, hint",
    [
        ("tacher_lr=0.1", "(did you mean teacher_lr,"),  # a typo in the first letters
        ("studnet_lr=0.1", "(did you mean student_lr,"),
    ],
)
def test_a_mistyped_key_or_preset_names_the_closest(tmp_path, capsys, set_option, hint):
    assert train_cli("digits-uda-mpl", tmp_path / "r", "--set", set_option, "--quiet") == 2
    assert hint in one_error_line(capsys.readouterr().err)
    assert train_cli("digits-uda-mlp", tmp_path / "r", "--quiet") == 2
    err = one_error_line(capsys.readouterr().err)
    assert "unknown preset 'digits-uda-mlp' (did you mean digits-uda-mpl?)" in err


# --- --help ----------------------------------------------------------------------------------


def _commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_explains_itself_with_its_defaults_and_an_example(name):
    parser = _commands()[name]
    text = parser.format_help()
    assert parser.description, f"`metapl {name} --help` says nothing about what it does"
    # the example, whole, after "example:", and it parses
    example = EXAMPLES[name].replace("\\\n", " ")
    assert "example:\n  " + EXAMPLES[name].split("\n")[0] in text
    for line in example.split("\n"):
        if shlex.split(line)[0] == "metapl":  # not a setup line such as `mkdir -p runs/tune`
            command = line.split(" > ")[0]  # up to the shell's redirection of its output
            parser.parse_args(shlex.split(command)[2:])
    for action in parser._actions:
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if shown and action.option_strings:
            assert "default" in (action.help or ""), f"metapl {name} {action.option_strings}"


def test_the_help_says_what_defaults_the_code_has():
    from metapl.experiments.twomoons import TwoMoonsConfig

    twomoons = _commands()["twomoons"].format_help()
    assert f"(default: {TwoMoonsConfig().steps})" in " ".join(twomoons.split())
    digits = " ".join(_commands()["digits"].format_help().split())
    assert "default: cpu" in digits


# --- what a short run says it did --------------------------------------------------------------


def test_train_says_when_fine_tuning_steps_followed_the_steps_asked_for(tmp_path, capsys):
    """`--steps 10` on digits-uda-mpl ran 310 steps (its 300 fine-tuning steps) and said
    "after 10 steps"."""
    args = [*tiny(2), "--set", "finetune_steps=3"]
    assert train_cli("digits-uda-mpl", tmp_path / "run", *args) == 0
    assert "after 2 steps and 3 fine-tuning steps\n" in capsys.readouterr().out
    assert train_cli("digits-uda-mpl", tmp_path / "run0", *tiny(2)) == 0
    assert capsys.readouterr().out.split("\n")[0].endswith("after 2 steps")


def test_train_names_the_tuning_split_when_it_scored_the_run(tmp_path, capsys):
    """`--set tuning=true` scores the run on the tuning split (results.json's "accuracy"), and the
    summary line called that number "test accuracy"."""
    split = ["--set", "tune_per_class=2"]
    assert (
        train_cli("digits-supervised", tmp_path / "run", *tiny(2), *split, "--set", "tuning=true")
        == 0
    )
    assert capsys.readouterr().out.startswith("digits-supervised: tuning-split accuracy ")
    assert train_cli("digits-supervised", tmp_path / "final", *tiny(2), *split) == 0
    assert capsys.readouterr().out.startswith("digits-supervised: test accuracy ")


def test_the_tune_hint_to_train_best_toml_keeps_the_data_dir(tmp_path, capsys, monkeypatch):
    """`metapl tune --preset cifar10-4k-uda-mpl --data-dir D` printed `metapl train --preset
    OUT/best.toml --out RUN`, which stops with "needs --data-dir"."""
    import metapl.tuning

    out = tmp_path / "out"
    monkeypatch.setattr(metapl.tuning, "tune", lambda opts: opts.out / "best.toml")
    args = ["tune", "--preset", "cifar10-4k-uda-mpl", "--trials", "1", "--out", str(out)]
    args += ["--storage", f"sqlite:///{tmp_path / 's.db'}", "--data-dir", "/data/cifar"]
    assert main(args) == 0
    expected = f"metapl train --preset {out / 'best.toml'} --data-dir /data/cifar --out RUN"
    assert capsys.readouterr().out == f"wrote {out / 'best.toml'}: {expected}\n"

    # best.toml's own comment says the same (digits needs no --data-dir, and gets none)
    from test_tune import fake_train, options

    tuner = Tuner(options(tmp_path))
    tuner.train = fake_train([])
    path = tuner.run()
    assert f"# train it: metapl train --preset {path} --out RUN\n" in path.read_text()


@pytest.mark.parametrize("command", ["digits", "reduced"])
def test_digits_and_reduced_say_what_they_wrote(tmp_path, capsys, command):
    """train and twomoons end with a "wrote ..." line; digits and reduced printed none, so where
    the per-run folders are was left to guess."""
    out = tmp_path / command
    args = [command, "--seeds", "0", "--methods", "supervised", "--steps", "2", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"wrote {out}/results.json; each run's folder in {out}/METHOD/seedN"
    assert (out / "supervised" / "seed0" / "results.json").exists()


def test_version_is_the_installed_packages(capsys):
    """`metapl --version`: the version pyproject.toml gave the installed package (one number to
    bump, and a test that fails when the two drift apart)."""
    import importlib.metadata

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"metapl {importlib.metadata.version('metapl')}\n"


def test_the_lazy_library_names_are_listed_for_tab_completion():
    import metapl

    assert {"MetaPseudoLabels", "TeacherLogits", "MetaplError", "__version__"} <= set(dir(metapl))
