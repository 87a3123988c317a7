"""Interruptions outside `metapl train`: Ctrl-C ends every command in one line, and a crash while
a result is written leaves the earlier result whole (figures, best.toml, benchmark JSON)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.figure
import pytest

from metapl.experiments.figure9 import plot_figure9
from metapl.experiments.figure10 import plot_figure10
from metapl.experiments.twomoons_plots import plot_gradient_cosine
from metapl.train.config import TrainConfig
from metapl.tuning import bestfile

ROOT = Path(__file__).parent.parent
OLD_PNG = b"\x89PNG an earlier, complete figure"


def _crash_while_saving(monkeypatch):
    """Figure.savefig writes half a file where it is told to, then dies (a kill, a full disk)."""

    def half(self, target, *args, **kwargs):
        Path(target).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half)


def _figure9(tmp_path: Path, path: Path) -> None:
    for method in ("supervised", "uda_mpl"):
        run = tmp_path / method / "seed0"
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text("step,name,value\n5,student_labeled_accuracy,0.5\n")
    plot_figure9(tmp_path, 0, path)


def _figure10(tmp_path: Path, path: Path) -> None:
    series = {"large_teacher": [[0.5, 0.5]], "reduced_teacher_by_quarter": {"1": [[0.2, 0.8]]}}
    (tmp_path / "figure10.json").write_text(json.dumps(series))
    plot_figure10(tmp_path / "figure10.json", path)


def _grad_cosine(tmp_path: Path, path: Path) -> None:
    plot_gradient_cosine({"mpl": {"steps": [0, 1], "per_seed": [[0.1, 0.2]]}}, path)


@pytest.mark.parametrize("plot", [_figure9, _figure10, _grad_cosine])
def test_a_figure_killed_while_written_leaves_the_earlier_one_whole(tmp_path, monkeypatch, plot):
    path = tmp_path / "figure.png"
    path.write_bytes(OLD_PNG)
    _crash_while_saving(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        plot(tmp_path, path)
    assert path.read_bytes() == OLD_PNG
    assert not list(tmp_path.glob(".figure.png.*"))  # no temporary file left behind


def test_best_toml_that_fails_midway_leaves_the_earlier_one_and_no_temporary_file(
    tmp_path, monkeypatch
):
    path = tmp_path / "best.toml"
    path.write_text("student_lr = 0.1\n")

    def half(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:5])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(OSError):
        bestfile.write_atomic(path, bestfile.render(TrainConfig(), ["header"], {}))
    monkeypatch.undo()
    assert path.read_text() == "student_lr = 0.1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.toml"]


def test_result_files_are_written_through_metapl_atomic():
    """A result written straight to its path is half a file after a kill, and the earlier result is
    gone: metapl's modules and the benchmark scripts write through metapl.atomic."""
    offenders = []
    for path in [*(ROOT / "src" / "metapl").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        if path.name == "atomic.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            direct = re.search(r"\.write_text\(|\.write_bytes\(", line)
            plot = ".savefig(" in line and "replace_atomically" not in line
            if direct or plot:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
