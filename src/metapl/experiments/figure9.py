"""Figure 9: accuracy on the labeled training data over training, supervised model vs the MPL
teacher and student (Section 5.2: "MPL is not label correction")."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from metapl.train.curves import read_metrics  # noqa: E402

SERIES = (
    ("supervised", "student_labeled_accuracy", "Supervised"),
    ("uda_mpl", "teacher_labeled_accuracy", "MPL teacher"),
    ("uda_mpl", "student_labeled_accuracy", "MPL student"),
)


def plot_figure9(out: Path, seed: int, path: Path) -> dict:
    """Plot the three series of one seed's runs under ``out``; also write them as JSON."""
    series = {}
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, metric, label in SERIES:
        steps, values = read_metrics(out / method / f"seed{seed}").get(metric, ([], []))
        series[label] = {"steps": steps, "accuracy": values}
        ax.plot(steps, [100 * v for v in values], label=label, marker=".")
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy on labeled data (%)")
    ax.set_title(f"Figure 9 on digits (seed {seed})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps(series, indent=1))
    return series
