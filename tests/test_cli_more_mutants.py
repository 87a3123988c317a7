"""The command line (src/metapl/cli.py), third mutation pass: what a user sees that no other test
pinned down. Each test kills a hand-made mutant that passed every cli test: --noise at its bounds,
twomoons options and its "wrote ..." line, the defaults each --help states, `--stesp=1000000`
without a hint, `metapl` alone as a traceback, `metapl train` without --steps saying "after None
steps", digits and reduced each refusing the other's results folder, bench's --batch-size and
--repeats bounds, a negative warm-up in a hand-edited config.json, Ctrl-C glued to a progress
bar, and a short output into a closed pipe.

The commands whose work takes minutes (digits, reduced, bench) run with their experiment replaced
by one that records its configuration; the rest are runs of a few steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_cli import one_error_line

from metapl import bench
from metapl.cli import main
from metapl.errors import ConfigError
from metapl.experiments import digits, reduced, twomoons

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _record(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a function that records its first argument (the experiment's
    configuration) or its keyword arguments, and stops the command with a one-line error."""
    seen: list = []

    def stop(*args, **kwargs):
        seen.append(args[0] if args else kwargs)
        raise ConfigError("recorded")

    monkeypatch.setattr(module, name, stop)
    return seen


# --- twomoons ------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["0", "1"])
def test_twomoons_noise_at_either_bound_trains(tmp_path, capsys, noise):
    """The help and the error say --noise is in [0, 1]: both ends are valid noise levels."""
    out = tmp_path / "tm"
    argv = ["twomoons", "--seeds", "0", "--steps", "2", "--noise", noise, "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["config"]["noise"] == float(noise)


def test_twomoons_options_reach_the_run_and_the_last_line_names_real_files(tmp_path, capsys):
    out = tmp_path / "tm"
    argv = ["twomoons", "--seeds", "1,3", "--steps", "3", "--noise", "0.25", "--threads", "1"]
    argv += ["--estimator", "first_order", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["seeds"], config["steps"], config["noise"], config["estimator"]) == (
        [1, 3],
        3,
        0.25,
        "first_order",
    )
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress bar
    printed = captured.out.splitlines()
    assert printed[0].startswith("TwoMoons, noise 0.25, 2 seeds (1,3), MPL's teacher gradient ")
    assert "first-order" in printed[0]
    last = printed[-1]
    assert last.startswith(f"wrote {out}/results.json, twomoons.png, grad_cosine.png in ")
    assert last.endswith(" s (1 thread)")  # one thread, not "1 threads"
    for name in ("results.json", "twomoons.png", "grad_cosine.png"):
        assert (out / name).is_file()


# --- the defaults each --help states ---------------------------------------------------------


def test_twomoons_defaults_are_the_helps(tmp_path, monkeypatch, capsys):
    seen = _record(monkeypatch, twomoons, "run")
    assert main(["twomoons", "--out", str(tmp_path / "tm")]) == 2
    (cfg,) = seen
    assert (cfg.seeds, cfg.noise, cfg.estimator) == (list(range(10)), 0.1, "exact")
    help_text = " ".join(_help("twomoons", capsys).split())
    assert "(default: 0-9)" in help_text and "(default: 0.1)" in help_text


def test_digits_defaults_are_the_helps(tmp_path, monkeypatch, capsys):
    """`metapl digits` runs on the CPU unless told (its help: "default: cpu"; train's is auto),
    seeds 0-4, K = 5 and the default methods; results.json records that configuration."""
    seen = _record(monkeypatch, digits, "run_digits")
    assert main(["digits", "--out", str(tmp_path / "d")]) == 2
    (cfg,) = seen
    assert (cfg.seeds, cfg.labels_per_class, cfg.device, cfg.steps) == (
        [0, 1, 2, 3, 4],
        5,
        "cpu",
        None,
    )
    assert cfg.methods == digits.DEFAULT_METHODS
    help_text = " ".join(_help("digits", capsys).split())
    assert "(default: 0-4)" in help_text and "K (default: 5)" in help_text
    assert f"default: {','.join(digits.DEFAULT_METHODS)}," in help_text


def test_reduced_defaults_are_the_helps(tmp_path, monkeypatch):
    seen = _record(monkeypatch, reduced, "run_reduced")
    assert main(["reduced", "--out", str(tmp_path / "r")]) == 2
    (cfg,) = seen
    assert (cfg.dataset, cfg.seeds, cfg.device, cfg.labels_per_class) == (
        "digits",
        [0, 1, 2, 3, 4],
        "cpu",
        None,  # the preset's 30
    )
    assert cfg.students == ("supervised", "noisy_student", "reduced_mpl")


def test_options_of_digits_and_reduced_reach_their_configs(tmp_path, monkeypatch):
    seen = _record(monkeypatch, digits, "run_digits")
    argv = ["--seeds", "2,4", "--steps", "7", "--device", "auto", "--labels-per-class", "3"]
    assert main(["digits", *argv, "--methods", "uda, uda,supervised", "--out", str(tmp_path)]) == 2
    (cfg,) = seen
    assert (cfg.seeds, cfg.steps, cfg.device, cfg.labels_per_class) == ([2, 4], 7, "auto", 3)
    assert cfg.methods == ("uda", "supervised")  # spaces and repeats dropped
    seen = _record(monkeypatch, reduced, "run_reduced")
    argv += ["--dataset", "svhn", "--methods", "reduced_mpl,,"]
    assert main(["reduced", *argv, "--out", str(tmp_path)]) == 2
    (cfg,) = seen
    assert cfg.dataset == "svhn"  # refused by the experiment itself, naming the presets
    assert (cfg.seeds, cfg.steps, cfg.device, cfg.labels_per_class) == ([2, 4], 7, "auto", 3)
    assert cfg.students == ("reduced_mpl",)


def test_bench_defaults_and_quiet_are_the_helps(monkeypatch, capsys):
    seen = _record(monkeypatch, bench, "run_bench")
    assert main(["bench"]) == 2
    assert main(["bench", "--quiet"]) == 2
    (default, quiet) = seen
    assert (default["device"], default["repeats"], default["batch_size"]) == ("auto", 20, None)
    assert (default["show_progress"], quiet["show_progress"]) == (True, False)
    help_text = " ".join(_help("bench", capsys).split())
    assert "(default: 20;" in help_text and "default: auto" in help_text


def _help(command: str, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


# --- mistakes on the command line ------------------------------------------------------------


def test_a_mistyped_option_with_its_value_after_equals_names_the_closest(capsys):
    """The hint is for the option's name: with its value the word is too far from any option."""
    with pytest.raises(SystemExit) as info:
        main(["twomoons", "--out", "x", "--stesp=1000000"])
    assert info.value.code == 2
    err = one_error_line(capsys.readouterr().err)
    assert "unrecognized arguments: --stesp=1000000 (did you mean --steps?)" in err, err


def test_no_command_is_one_line_exit_2(capsys):
    """`metapl` alone: argparse's one line, not an AttributeError traceback."""
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("metapl: error: the following arguments are required: COMMAND")


def test_bench_bounds_are_one_line_before_any_timing(monkeypatch, capsys):
    """--batch-size and --repeats below 1 are refused; the largest --batch-size whose 7B
    unlabeled images fit under the limit is accepted, one more is refused."""
    from metapl.train.config import MAX_BATCH

    largest = MAX_BATCH // 7
    seen = _record(monkeypatch, bench, "run_bench")
    assert main(["bench", "--device", "cpu", "--batch-size", "0", "--quiet"]) == 2
    assert "error: --batch-size must be >= 1" in one_error_line(capsys.readouterr().err)
    assert main(["bench", "--device", "cpu", "--repeats", "0", "--quiet"]) == 2
    assert "error: --repeats must be >= 1" in one_error_line(capsys.readouterr().err)
    assert main(["bench", "--device", "cpu", "--batch-size", str(largest + 1), "--quiet"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"--batch-size must be at most {largest:,}" in err and seen == []
    assert main(["bench", "--device", "cpu", "--batch-size", str(largest), "--quiet"]) == 2
    assert one_error_line(capsys.readouterr().err) == "metapl bench: error: recorded\n"
    assert seen[0]["batch_size"] == largest


# --- a results folder belongs to the command that wrote it -------------------------------------


@pytest.mark.parametrize("command, other", [("digits", "reduced"), ("reduced", "digits")])
def test_digits_and_reduced_refuse_each_others_results(
    tmp_path, monkeypatch, capsys, command, other
):
    """Each writes DIR/results.json: one into the other's folder would replace its results. A
    rerun into its own folder is the command's to judge (same configuration or not)."""
    module, name = (digits, "run_digits") if command == "digits" else (reduced, "run_reduced")
    seen = _record(monkeypatch, module, name)
    results = tmp_path / "results.json"
    argv = [command, "--seeds", "0", "--steps", "2", "--out", str(tmp_path), "--quiet"]
    results.write_text(json.dumps({"command": other, "results": []}))
    assert main(argv) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"holds the results of `metapl {other}`, which `metapl {command}` would" in err, err
    assert seen == []
    results.write_text(json.dumps({"command": command, "results": []}))
    assert main(argv) == 2
    assert one_error_line(capsys.readouterr().err) == f"metapl {command}: error: recorded\n"
    assert len(seen) == 1


# --- what `metapl train` says it did -----------------------------------------------------------


def test_train_without_steps_option_names_the_steps_it_ran(tmp_path, capsys):
    """--set steps=2 (no --steps): the summary said "after None steps"."""
    out = tmp_path / "run"
    argv = ["train", "--preset", "digits-supervised", "--out", str(out), "--device", "cpu"]
    argv += ["--set", "steps=2", "--set", "warmup_steps=0", "--set", "finetune_steps=0"]
    assert main([*argv, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress bar
    first, last = captured.out.splitlines()
    assert first.startswith("digits-supervised: test accuracy ")
    assert first.endswith(" after 2 steps")
    accuracy = json.loads((out / "results.json").read_text())["results"][0]["accuracy"]
    assert f"test accuracy {100 * accuracy:.2f}% after" in first
    names = "results.json, curves.png, metrics.csv, tb/, config.json, checkpoint.pt"
    assert last == f"wrote {out}/{names}"
    for name in names.split(", "):
        assert (out / name.rstrip("/")).exists(), name


def test_a_negative_warmup_in_config_json_takes_the_checkpoints(tmp_path, capsys):
    """config.json hand-edited to a negative warm-up is as damaged as one that is not a number:
    the resume takes the warm-up the checkpoint records. Reading it as "no warm-up known" cut the
    warm-up again to the new --steps, and the resume was refused as another configuration."""
    out = tmp_path / "run"
    argv = ["train", "--preset", "digits-supervised", "--out", str(out), "--device", "cpu"]
    argv += ["--quiet", "--set", "finetune_steps=0"]
    assert main([*argv, "--steps", "3"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["warmup_steps"] == 3  # cut from the preset's to fit --steps 3
    (out / "config.json").write_text(json.dumps({**config, "warmup_steps": -1}))
    capsys.readouterr()
    assert main([*argv, "--steps", "5"]) == 0, capsys.readouterr().err
    assert "warmup_steps 3, as in the run being resumed" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["warmup_steps"] == 3


# --- Ctrl-C and a closed pipe ----------------------------------------------------------------


def test_ctrl_c_during_a_run_is_its_own_line_after_the_bar(tmp_path, monkeypatch, capsys):
    """As an error does: the bar is closed first, so "interrupted" is not glued to its line."""
    from metapl.progress import progress_bar

    def interrupted(cfg, show_progress):
        bar = progress_bar(total=10, desc="twomoons")
        bar.update(5)
        raise KeyboardInterrupt

    monkeypatch.setattr(twomoons, "run", interrupted)
    argv = ["twomoons", "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "tm")]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.lstrip("\r").startswith("twomoons:"), err  # the bar was drawn
    assert err.endswith("\nmetapl twomoons: interrupted\n"), err


def test_a_short_output_into_a_closed_pipe_stops_quietly():
    """A command whose output fits the pipe's buffer: the broken pipe shows when main flushes,
    not in the interpreter's flush at exit ("Exception ignored ... BrokenPipeError", status 120)."""
    code = (
        "import sys; from metapl import cli; cli._cmd_presets = lambda args: print('one line');"
        "sys.exit(cli.main(['presets']))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    env.pop("PYTHONUNBUFFERED", None)  # a pipe's stdout is then block-buffered, as in a shell
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    proc.stdout.close()  # before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err
