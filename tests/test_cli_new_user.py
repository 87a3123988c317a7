"""Friction found by following the README and docs/*.md as a new user, in a fresh venv.

Each test failed before its fix: two commands into one --out at once both ran to the end; an error
was glued to the progress bar's line and the bar was redrawn after it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_cli import one_error_line, train_cli

from metapl.cli import main

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ROOT = Path(__file__).parent.parent


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
        while not (out / "metrics.csv").exists():  # it is training
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        for command in (
            ["train", "--preset", "digits-supervised", "--steps", "200"],
            ["twomoons", "--seeds", "0", "--steps", "2"],
        ):
            assert main([*command, "--out", str(out), "--quiet"]) == 2
            err = one_error_line(capsys.readouterr().err)
            assert f"--out {out} is in use by another metapl command that is still running" in err
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # The kernel dropped the killed process's lock: the folder is free again (this command gets
    # past the claim, to a mistake of its own found later).
    args = ["--preset", "digits-supervised", "--steps", "200", "--set", "model=mlp"]
    assert main(["train", *args, "--out", str(out)]) == 2
    assert "model mlp cannot take" in one_error_line(capsys.readouterr().err)


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
