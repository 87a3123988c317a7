"""How far a 2-process gloo run is from a 1-process run on the whole batch, in float64: the numbers
behind docs/multi-gpu.md "Equality with one process" (tests/test_torchrun.py only bounds them, by
a relative 1e-10).

The test's five cases, with the test's own helpers (tests/test_torchrun.py: the float64 MLP on
digits, its tiny settings, and `python -m torch.distributed.run --nproc_per_node 2 -m metapl train`
on gloo): UDA+MPL with the exact teacher gradient for 2 steps plus 1 fine-tuning step, supervised
for 3 steps, UDA for 3 steps, UDA+MPL with BatchNorm and ``sync_batchnorm=true``, and NoisyStudent
from a large teacher (a 1-step run made first; the two ranks precompute its distributions
together). Saved per case: the largest
absolute difference of any entry of the final student's and teacher's weights and buffers (each
tensor's own largest one too, with the size of its entries), and the largest relative difference
of the logged metrics.

python benchmarks/torchrun_equality_cpu.py --json benchmarks/results/torchrun_equality_cpu.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from cli_helpers import for_preset  # noqa: E402
from machine import parser_with_json, save  # noqa: E402
from test_torchrun import (  # noqa: E402
    LARGE_TEACHER,
    SYNC_BN,
    options,
    read_metrics,
    register_test_model,
    torchrun,
)

from metapl.cli import main as metapl  # noqa: E402
from metapl.train.checkpoint import load_checkpoint  # noqa: E402

# the parametrization of test_two_processes_train_like_one_on_the_whole_batch
CASES = {
    "uda-mpl": ("digits-uda-mpl", 2, ["--set", "finetune_steps=1"]),
    "supervised": ("digits-supervised", 3, []),
    "uda": ("digits-uda", 3, []),
    "uda-mpl-sync-batchnorm": ("digits-uda-mpl", 2, ["--set", "finetune_steps=1", *SYNC_BN]),
    "noisy-student": (
        "digits-reduced-noisy-student",
        2,
        ["--set", "finetune_steps=1", "--set", "label_smoothing=0.1", "--set", LARGE_TEACHER]
        + ["--set", "eval_batch_size=16"],
    ),
}


def large_teacher_run(out: Path) -> Path:
    """The test's large_teacher fixture: a finished 1-step run of the float64 MLP."""
    preset = "digits-reduced-large-teacher"
    args = ["train", "--preset", preset, "--out", str(out), *for_preset(preset, options(1))]
    assert metapl(args) == 0
    return out


def compare(name: str, preset: str, steps: int, extra: list[str], tmp: Path) -> dict:
    args = for_preset(preset, options(steps, *extra))
    two, one = tmp / "two", tmp / "one"
    torchrun(tmp, preset, two, args)
    assert metapl(["train", "--preset", preset, "--out", str(one), *args]) == 0
    got, want = load_checkpoint(two / "checkpoint.pt"), load_checkpoint(one / "checkpoint.pt")
    tensors = {}
    for model in ("student", "teacher") if preset.endswith("mpl") else ("student",):
        for key, value in want[model].items():
            if key.endswith("num_batches_tracked"):
                continue
            diff = (got[model][key] - value).abs().max()
            tensors[f"{model}.{key}"] = {
                "max_abs_difference": float(diff),
                "max_abs_value": float(value.abs().max()),
            }
    metrics_two, metrics_one = read_metrics(two / "metrics.csv"), read_metrics(one / "metrics.csv")
    metrics = [
        abs(metrics_two[k] - v) / abs(v)
        for k, v in metrics_one.items()
        if v != 0 and k in metrics_two
    ]
    worst = max(tensors, key=lambda k: tensors[k]["max_abs_difference"])
    row = {
        "case": name,
        "preset": preset,
        "steps": steps,
        "extra": extra,
        "step_reached": int(want["step"]),
        "max_abs_difference": tensors[worst]["max_abs_difference"],
        "max_abs_difference_in": worst,
        "metrics_max_relative_difference": max(metrics),
        "metrics_same_keys": metrics_two.keys() == metrics_one.keys(),
        "tensors": tensors,
    }
    print(
        f"{name:24s} weights: max abs difference {row['max_abs_difference']:.1e} ({worst}); "
        f"metrics: max relative {row['metrics_max_relative_difference']:.1e}",
        flush=True,
    )
    return row


def main() -> None:
    args = parser_with_json(__doc__).parse_args()
    torch.set_num_threads(1)  # the tests' setting (the workers get OMP_NUM_THREADS=1)
    register_test_model()
    results = []
    with tempfile.TemporaryDirectory() as teacher_tmp:
        teacher = large_teacher_run(Path(teacher_tmp) / "large_teacher")
        for name, (preset, steps, extra) in CASES.items():
            given = [f"large_teacher={teacher}" if e == LARGE_TEACHER else e for e in extra]
            with tempfile.TemporaryDirectory() as tmp:
                results.append(compare(name, preset, steps, given, Path(tmp)))
            results[-1]["extra"] = extra  # not the temporary folder's name
    save(args.json, {"dtype": "float64", "results": results})


if __name__ == "__main__":
    main()
