"""Figure 10: the large teacher's distribution of a few unlabeled images, and the reduced
teacher's at each quarter of the student's training (Section 5.3)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from metapl.atomic import replace_atomically  # noqa: E402


def plot_figure10(series_path: Path, path: Path) -> None:
    series = json.loads(Path(series_path).read_text())
    large = np.asarray(series["large_teacher"])
    quarters = series["reduced_teacher_by_quarter"]
    columns = [("large teacher", large)] + [
        (f"{25 * int(q)}% of training", np.asarray(quarters[q])) for q in sorted(quarters, key=int)
    ]
    rows, classes = large.shape
    fig, axes = plt.subplots(
        rows, len(columns), figsize=(2.2 * len(columns), 1.2 * rows), squeeze=False, sharey=True
    )
    for r in range(rows):
        for c, (title, probs) in enumerate(columns):
            ax = axes[r][c]
            ax.bar(np.arange(classes), probs[r], color="#4c72b0" if c == 0 else "#dd8452")
            ax.set_ylim(0, 1)
            ax.set_xticks(range(classes))
            ax.tick_params(labelsize=6)
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle("Target distributions: large teacher vs ReducedMPL's teacher over training")
    fig.tight_layout()
    try:  # whole or not at all: an earlier figure survives a crash (metapl.atomic)
        replace_atomically(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
