"""Figure 9: accuracy on the labeled training data over training, supervised model vs the MPL
teacher and student (Section 5.2: "MPL is not label correction")."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from metapl.atomic import replace_atomically, write_json_atomically  # noqa: E402
from metapl.train.curves import read_metrics  # noqa: E402

SERIES = (
    ("supervised", "student_labeled_accuracy", "Supervised"),
    ("uda_mpl", "teacher_labeled_accuracy", "MPL teacher"),
    ("uda_mpl", "student_labeled_accuracy", "MPL student"),
)


def plot_figure9(out: Path, seed: int, path: Path) -> dict:
    """Plot the three series of one seed's runs under ``out``; also write them as JSON (both files
    whole or not at all)."""
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
    try:  # whole files or none: an earlier figure survives a crash (metapl.atomic)
        replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    write_json_atomically(path.with_suffix(".json"), series)
    return series
