"""A run's training curves as one picture: ``DIR/curves.png`` from ``DIR/metrics.csv``.

Three panels share the step axis: the losses and loss terms the method logs (the teacher's
supervised, UDA and MPL terms, the student's loss on the teacher's targets and on labeled data
after its step, ...), the accuracies of each evaluation, and the learning rates. Written at the end
of every ``metapl train`` run (TensorBoard's ``tb/`` has the same series, live).
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from metapl.atomic import replace_atomically  # noqa: E402
from metapl.train.metrics_log import CSV_NAME  # noqa: E402

PNG_NAME = "curves.png"


def read_metrics(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every metric of a run's metrics.csv (long format: step,name,value) as (steps, values)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(Path(run_dir) / CSV_NAME, newline="") as f:
        for row in csv.DictReader(f):
            steps, values = series.setdefault(row["name"], ([], []))
            steps.append(int(row["step"]))
            values.append(float(row["value"]))
    return series


def _panel(name: str) -> int:
    if name.endswith("accuracy"):
        return 1
    if name.endswith("_lr"):
        return 2
    return 0  # losses and loss terms


def plot_curves(run_dir: Path, title: str) -> Path:
    """Write ``run_dir/curves.png`` (atomically: a reader never sees half a file); returns it."""
    run_dir = Path(run_dir)
    series = read_metrics(run_dir)
    fig, axes = plt.subplots(3, 1, figsize=(7, 8.5), sharex=True)
    for name, (steps, values) in sorted(series.items()):
        panel = _panel(name)
        scale = 100 if panel == 1 else 1
        axes[panel].plot(
            steps, [scale * v for v in values], label=name, marker="." if panel else ""
        )
    for ax, ylabel in zip(axes, ("loss", "accuracy (%)", "learning rate")):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
    axes[0].set_title(title)
    axes[-1].set_xlabel("training step")
    fig.tight_layout()
    path = run_dir / PNG_NAME
    try:
        replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path
