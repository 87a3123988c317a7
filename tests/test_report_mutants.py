"""metapl.report on its own: the paired differences, the printed tables and the results files
(the CLI tests see them only through whole runs, with symmetric or single-seed numbers)."""

from __future__ import annotations

import json
import os

import pytest

from metapl.errors import ConfigError
from metapl.report import (
    check_replaceable,
    output_folder,
    paired_differences,
    print_accuracy_table,
    print_paired_differences,
    write_json_atomic,
)


def records_of(acc: dict[str, dict[int, float]]) -> list[dict]:
    return [
        {"method": m, "seed": s, "accuracy": a}
        for m, by_seed in acc.items()
        for s, a in by_seed.items()
    ]


def test_paired_wins_are_the_seeds_where_the_method_is_above():
    """Asymmetric counts: ``method`` above ``other`` on two seeds, below on one. Wins and losses
    swapped would read as the opposite conclusion; the counts are plain ints, so the result can
    go into results.json."""
    records = records_of(
        {"mpl": {0: 0.90, 1: 0.80, 2: 0.70}, "supervised": {0: 0.85, 1: 0.70, 2: 0.75}}
    )
    p = paired_differences(records, [("mpl", "supervised")])["mpl - supervised"]
    assert p["wins_ties_losses"] == [2, 0, 1]
    assert p["mean"] == pytest.approx((0.05 + 0.10 - 0.05) / 3)
    assert all(type(x) is int for x in p["wins_ties_losses"]) and type(p["n"]) is int
    json.dumps(p)  # numpy integers would not serialise


def test_paired_differences_use_only_the_common_seeds():
    """Seeds run by only one side of a pair are not compared (seed 0 and 3 here)."""
    records = records_of({"a": {0: 0.5, 1: 0.6, 2: 0.7}, "b": {1: 0.5, 2: 0.8, 3: 0.1}})
    p = paired_differences(records, [("a", "b")])["a - b"]
    assert p["n"] == 2 and p["wins_ties_losses"] == [1, 0, 1]
    assert p["mean"] == pytest.approx(0.0, abs=1e-12)
    # differences +0.1, -0.1: sample std 0.1 * sqrt(2), standard error 0.1
    assert p["standard_error"] == pytest.approx(0.1)


def test_print_paired_differences_in_points_with_the_counts_in_order(capsys):
    """The printed line carries the numbers of the dict, in percentage points, with wins, ties
    and losses each in its place."""
    paired = {
        "mpl - supervised": {
            "mean": 0.0125,
            "standard_error": 0.005,
            "wins_ties_losses": [3, 1, 0],
            "n": 4,
        }
    }
    print_paired_differences(paired)
    line = capsys.readouterr().out.strip()
    assert line == (
        "mpl - supervised   +1.25 points paired (s.e. 0.50; 3 wins, 1 ties, 0 losses over 4 seeds)"
    )


def test_print_accuracy_table_in_percent_with_each_rows_n(capsys):
    """Mean and spread both in percent, and each row's own number of runs."""
    print_accuracy_table(
        "title",
        {
            "mpl": {"mean": 0.9512, "std": 0.0123, "n": 3},
            "supervised": {"mean": 0.5, "std": 0.0, "n": 1},
        },
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "title"
    assert lines[1] == "  mpl          95.12 +-  1.23 %  (n=3)"
    assert lines[2] == "  supervised   50.00 +-  0.00 %  (n=1)"


def test_write_json_atomic_sorts_keys(tmp_path):
    """results.json keys are sorted, so two runs' files diff cleanly whatever the insertion order."""
    path = tmp_path / "results.json"
    write_json_atomic(path, {"b": 1, "a": {"d": 2, "c": 3}})
    text = path.read_text()
    assert text.index('"a"') < text.index('"b"') and text.index('"c"') < text.index('"d"')
    assert json.loads(text) == {"a": {"c": 3, "d": 2}, "b": 1}


def test_output_folder_refuses_a_folder_it_cannot_write(tmp_path, monkeypatch):
    """The nearest existing folder must be writable (checked with os.access: chmod alone would
    not show it to root); the folder itself is not created here."""
    denied = []

    def access(path, mode):
        denied.append((os.fspath(path), mode))
        return False

    monkeypatch.setattr(os, "access", access)
    target = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match=f"{tmp_path} is not writable; choose another --res"):
        output_folder(target, option="--res")
    assert denied == [(os.fspath(tmp_path), os.W_OK | os.X_OK)]
    monkeypatch.undo()
    assert output_folder(target) == target and not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "name",
    [
        "results.json",
        "config.json",
        "checkpoint.pt",
        "metrics.csv",
        # the figures were written after results.json: a traceback with the results replaced
        "twomoons.png",
        "grad_cosine.png",
        "figure9.png",
        "figure10.json",
        "curves.png",
        "classes.json",
    ],
)
def test_output_folder_refuses_a_folder_where_a_result_file_goes(tmp_path, name):
    """A folder named results.json in --out was a traceback when the results were written, after
    the whole run; now refused before any work."""
    (tmp_path / "run" / name).mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"{name} is a folder, where metapl writes a file"):
        output_folder(tmp_path / "run", command="train")
    assert output_folder(tmp_path / "other") == tmp_path / "other"


@pytest.mark.parametrize("name", ["", " ", "\t"])
def test_output_folder_refuses_an_empty_name(tmp_path, monkeypatch, name):
    """An unset $VAR, with or without spaces around it: Path("") is the current folder, and
    Path(" ") a folder named " " in it (only "" was refused by the tests, a check without the
    strip went unseen)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="^--res is empty; give a folder name$"):
        output_folder(name, option="--res", command="train")
    assert not list(tmp_path.iterdir())


def test_check_replaceable_counts_two_names_of_one_folder_as_the_same(tmp_path, monkeypatch):
    """Results of `--set data_dir=d` are those of `--set data_dir=$PWD/d` (a path key), not of
    another folder, nor of the same name for a key not said to be a path."""
    monkeypatch.chdir(tmp_path)
    for folder in ("d", "e"):
        (tmp_path / folder).mkdir()
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"command": "train", "config": {"data_dir": "d", "note": "d"}}
    (out / "results.json").write_text(json.dumps(earlier))
    same = {"data_dir": str(tmp_path / "d"), "note": "d"}
    check_replaceable(out, "train", same, paths=["data_dir"])
    with pytest.raises(ConfigError, match="another configuration"):
        check_replaceable(out, "train", same)  # not a path key: compared as written
    with pytest.raises(ConfigError, match="another configuration"):
        check_replaceable(out, "train", {**same, "data_dir": "e"}, paths=["data_dir"])


def test_an_output_that_is_a_pipe_is_not_read_to_see_whether_it_is_a_database(tmp_path):
    """The check for an SQLite database read the head of whatever the output named: on a named
    pipe (or /dev/stdout on a terminal) the read blocked, and the command hung in silence."""
    import subprocess
    import sys

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    done = subprocess.run(
        [sys.executable, "-m", "metapl", "compare", str(tmp_path / "nope"), "--json", str(fifo)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "does not exist" in done.stderr, done.stderr


def test_same_file_is_one_existing_file_or_a_relative_name_the_other_ends_with(
    tmp_path, monkeypatch
):
    from metapl.report import same_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "x.toml").write_text("")
    assert same_file("p/x.toml", "./p/x.toml") and same_file("p/x.toml", str(tmp_path / "p/x.toml"))
    # a relative name recorded from another folder: the same --out from the folder above
    assert same_file("rd/large_teacher/seed0", "/elsewhere/sub/rd/large_teacher/seed0")
    assert same_file("/elsewhere/sub/rd/large_teacher/seed0", "rd/large_teacher/seed0")
    assert not same_file("rd/large_teacher/seed0", "/elsewhere/rd/large_teacher/seed1")
    assert not same_file("rd/large_teacher/seed0", "/elsewhere/xrd/large_teacher/seed0")
    assert not same_file("../rd", "/a/rd") and not same_file(".", "/a/b")
    assert not same_file("p/x.toml", "p/y.toml") and not same_file(None, "p/x.toml")
    assert same_file(None, None) and not same_file(1, "1")
