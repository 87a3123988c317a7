"""Figure 9 on digits at 50 labels per class: accuracy on the labeled data over training, per seed,
read from the runs' metrics.csv (the run folders are not kept), and its mean over the steps
before fine-tuning.

    metapl digits --labels-per-class 50 --seeds 0-4 --methods supervised,uda_mpl \\
        --out results/digits/k50_figure9
    python results/digits/k50_figure9/labeled_accuracy.py results/digits/k50_figure9

The tuning seed that K=50 was chosen on, rerun (tuning_seed100/ keeps the run's results.json,
figure9.json, figure9.png, the printed summary as run.log, and labeled_accuracy.json):

    metapl digits --labels-per-class 50 --seeds 100 --methods supervised,uda_mpl --out OUT
    python results/digits/k50_figure9/labeled_accuracy.py OUT
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np

SERIES = {
    "Supervised": ("supervised", "student_labeled_accuracy"),
    "MPL teacher": ("uda_mpl", "teacher_labeled_accuracy"),
    "MPL student": ("uda_mpl", "student_labeled_accuracy"),
}

out = Path(sys.argv[1])
seeds = json.loads((out / "results.json").read_text())["config"]["seeds"]
mpl_steps = json.loads((out / "uda_mpl" / f"seed{seeds[0]}" / "config.json").read_text())["steps"]
series: dict = {name: {} for name in SERIES}
for name, (method, key) in SERIES.items():
    for seed in seeds:
        with (out / method / f"seed{seed}" / "metrics.csv").open(newline="") as f:
            rows = [
                (int(r["step"]), float(r["value"])) for r in csv.DictReader(f) if r["name"] == key
            ]
        series[name][seed] = {"steps": [s for s, _ in rows], "accuracy": [v for _, v in rows]}


def mean_before_finetuning(entry: dict, start: int) -> float:
    """Mean labeled accuracy over the evaluations in [start, MPL's last step before fine-tuning]."""
    values = [a for s, a in zip(entry["steps"], entry["accuracy"]) if start <= s <= mpl_steps]
    return float(np.mean(values))


summary = {}
for start in (0, mpl_steps // 2):
    row = {}
    for name in SERIES:
        per_seed = [mean_before_finetuning(series[name][s], start) for s in seeds]
        row[name] = {
            "mean": float(np.mean(per_seed)),
            "std": float(np.std(per_seed)),
            "per_seed": per_seed,
        }
    summary[f"steps {start}-{mpl_steps}"] = row
    print(
        f"steps {start}-{mpl_steps}: "
        + ", ".join(
            f"{name} {100 * v['mean']:.2f} +- {100 * v['std']:.2f}" for name, v in row.items()
        )
    )
(out / "labeled_accuracy.json").write_text(
    json.dumps({"summary": summary, "series": series}, indent=1)
)
