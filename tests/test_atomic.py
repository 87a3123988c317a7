"""metapl.atomic: a file appears whole or not at all, with the permissions of a plain open()."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from metapl.atomic import (
    remove_leftovers,
    replace_atomically,
    temp_prefix,
    write_json_atomically,
    write_text_atomically,
)
from metapl.report import write_json_atomic
from metapl.train.checkpoint import save_checkpoint
from metapl.train.curves import plot_curves
from metapl.train.metrics_log import MetricsLogger


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomically(path, {"a": 1})

    def half(tmp: Path) -> None:
        tmp.write_text('{"a": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(path, half)
    assert path.read_text() == '{\n "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_every_run_file_gets_the_mode_of_a_plain_open(tmp_path, umask_027):
    """mkstemp makes 0600 files: checkpoints, metrics and plots used to be unreadable to others
    while config.json and results.json were not."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert mode(plain) == umask_027
    state = {"format_version": 1, "step": 1, "student": {"w": torch.zeros(2)}, "config": {}}
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    save_checkpoint(tmp_path / "checkpoint.pt", {**state, "step": 2})  # and .prev.pt
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"loss": 0.5})
    with MetricsLogger(tmp_path, resume_step=1) as log:  # the resume rewrite of metrics.csv
        log.log(2, {"loss": 0.4})
    plot_curves(tmp_path, "t")
    write_json_atomic(tmp_path / "results.json", {"a": 1})
    names = ["checkpoint.pt", "checkpoint.prev.pt", "metrics.csv", "curves.png", "results.json"]
    for name in names:
        assert mode(tmp_path / name) == umask_027, name


@pytest.mark.parametrize("name", ["f" * 250 + ".json", "é" * 125 + ".pt"], ids=["ascii", "utf8"])
def test_a_file_name_near_the_limit_is_written(tmp_path, name):
    """A name of 242 to 255 bytes (`metapl bench --json` or `metapl export --output`) was "could not
    write ...: File name too long" after the work: its temporary file's name was 14 bytes longer."""
    target = tmp_path / name
    write_json_atomically(target, {"a": 1})
    assert target.read_text() == '{\n "a": 1\n}'
    (tmp_path / f"{temp_prefix(target)}killed.tmp").write_text("")  # a killed writer's leftover
    remove_leftovers(target)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_link_is_written_through_and_stays_a_link(tmp_path):
    """`--json results.json` where results.json is a link to a shared file: the shared file gets
    the result. Before, the rename replaced the link itself with a plain file, and the file it
    pointed to kept its old content."""
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "timings.json"
    target.write_text("old")
    link = tmp_path / "timings.json"
    link.symlink_to(target)
    write_text_atomically(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    # a link to a file not there yet (its folder is): the file is made there
    dangling = tmp_path / "later.json"
    dangling.symlink_to(shared / "later.json")
    write_text_atomically(dangling, "first")
    assert dangling.is_symlink() and (shared / "later.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["later.json", "shared", "timings.json"]
    assert sorted(p.name for p in shared.iterdir()) == ["later.json", "timings.json"]


def test_a_links_temporary_files_lie_beside_the_file_it_points_to(tmp_path):
    """Writing through a link makes its temporary file in the target's folder, named after the
    target (a rename works only within one file system), and remove_leftovers(link) finds a killed
    writer's leftovers there."""
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "real.json"
    link = tmp_path / "alias.json"
    link.symlink_to(target)
    made: list[Path] = []

    def fill(tmp: Path) -> None:
        made.append(tmp)
        tmp.write_text("x")

    replace_atomically(link, fill)
    assert made[0].parent == shared and made[0].name.startswith(temp_prefix(target))
    assert target.read_text() == "x" and link.is_symlink()
    (shared / f"{temp_prefix(target)}killed.tmp").write_text("")
    remove_leftovers(link)
    assert sorted(p.name for p in shared.iterdir()) == ["real.json"]
