"""PyTorch's CPU threads per command (metapl.cpu_threads): twomoons follows the idle cores, train
and tune keep PyTorch's default unless --threads is given, and each gives the process's own
setting back."""

import os

import pytest
import torch
from test_tune import tiny_args

from metapl import cpu_threads
from metapl.cli import main
from metapl.experiments.twomoons import run


@pytest.mark.parametrize("given, used", [([], 3), (["--threads", "2"], 2)])
def test_threads_option_is_used_for_the_run_and_given_back(tmp_path, monkeypatch, given, used):
    """Without --threads, the idle cores' count (3 here); the process's own setting afterwards."""
    seen = []
    monkeypatch.setattr(
        "metapl.experiments.twomoons.run",
        lambda cfg, show_progress: seen.append(torch.get_num_threads()) or run(cfg),
    )
    monkeypatch.setattr(cpu_threads, "idle_cores_threads", lambda: 3)
    before = torch.get_num_threads()
    args = ["twomoons", "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*args, *given]) == 0
    assert seen == [used] and torch.get_num_threads() == before


@pytest.mark.parametrize(
    "torch_default, load, threads",
    [(2, 0.0, 2), (2, 2.4, 2), (2, 2.6, 1), (2, 5.0, 1), (1, 0.0, 1), (8, 0.0, 4), (8, 1.2, 3)],
)
def test_threads_by_default_are_the_cores_other_work_leaves_idle(
    monkeypatch, torch_default, load, threads
):
    """4 cores for this process, PyTorch's default and the cores other work keeps busy vary. Would
    break: a busy machine given PyTorch's threads (on 2 cores beside 2 busy processes, 181 s
    instead of 69 s), or an idle one given 1 (39 s instead of 30-34 s)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda: load)
    before = torch.get_num_threads()
    torch.set_num_threads(torch_default)
    try:
        assert cpu_threads.idle_cores_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_busy_cores_are_read_from_proc_stat_now(monkeypatch, tmp_path):
    """/proc/stat's first line twice: 2 cores, of 1,000 ticks 250 idle and 50 iowait, so 1.4
    cores busy; without it, the load average. Would break: iowait counted as busy, the whole
    machine's ticks taken for one core, or the load average (a minute behind) read first."""
    lines = iter(["cpu 100 0 100 100 0 0 0 0 0 0\n", "cpu 500 0 400 350 50 0 0 0 0 0\n"])
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/stat":
            stat = tmp_path / "stat"
            stat.write_text(next(lines, ""))
            if not stat.read_text():  # read twice: now as if there were no /proc/stat
                raise FileNotFoundError(path)
            return real_open(stat, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert cpu_threads.busy_cores(window_s=0.0) == pytest.approx(2 * (1 - 300 / 1000))
    assert cpu_threads.busy_cores(window_s=0.0) == 9.0  # the file read fails: the load average


@pytest.mark.parametrize("given, used", [([], "default"), (["--threads", "1"], 1)])
def test_train_keeps_pytorchs_threads_unless_told(tmp_path, monkeypatch, given, used):
    """Would break: train following the load (a resumed run could then round differently from
    the run it continues), or --threads ignored."""
    seen = []
    monkeypatch.setattr(cpu_threads, "idle_cores_threads", lambda: 99)  # never asked
    monkeypatch.setattr(
        "metapl.train.engine.train",
        lambda cfg, out, show_progress, note=None: (
            seen.append(torch.get_num_threads()) or {"results": [{"accuracy": 0.5}]}
        ),
    )
    before = torch.get_num_threads()
    args = ["train", "--preset", "digits-supervised", "--steps", "2", "--out", str(tmp_path / "r")]
    assert main([*args, "--quiet", *given]) == 0
    assert seen == [before if used == "default" else used]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("command", ["twomoons", "train", "tune"])
def test_threads_below_one_is_an_error_before_anything_is_written(tmp_path, capsys, command):
    args = {
        "twomoons": ["twomoons", "--out", str(tmp_path / "out")],
        "train": ["train", "--preset", "digits-supervised", "--out", str(tmp_path / "out")],
        "tune": ["tune", "--preset", "digits-uda-mpl", "--trials", "1", *tiny_args(tmp_path)],
    }[command]
    assert main([*args, "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err == f"metapl {command}: error: --threads must be >= 1, got 0\n"
    assert list(tmp_path.iterdir()) == []
    # --threads 100000 was a segmentation fault (exit 139) when the thread pools started
    assert main([*args, "--threads", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"metapl {command}: error: --threads must be at most 1024, got 100,000")
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
