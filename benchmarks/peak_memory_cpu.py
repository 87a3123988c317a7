"""Where the exact step's peak memory is, against the first-order step's, on CPU (issue 5's goal:
the exact step's peak no more than the first-order step's; the H200 measured +15 MiB).

The UDA+MPL step of `metapl bench` (WRN-28-2, labeled B, unlabeled 7B, two teacher views; bf16 and
channels_last as on the GPU by default), each estimator built afresh and counted by
:class:`metapl.live_memory.LiveTensorMemory` (live tensor storages: no operator's scratch space).
For one step after two it saves the peak, the live memory when the student's update pass starts
its backward (its forward done: the teacher's graph, the student's activations), how far the step
rises above that, and the operator at the peak:
python benchmarks/peak_memory_cpu.py --batch-sizes 8,32 --json benchmarks/results/peak_memory_cpu.json
"""

from __future__ import annotations

import contextlib
import gc
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, save  # noqa: E402

from metapl.bench import step_settings, synthetic_cifar_split  # noqa: E402
from metapl.live_memory import LiveTensorMemory  # noqa: E402
from metapl.train.config import TrainConfig, apply_overrides  # noqa: E402
from metapl.train.data import BatchSource  # noqa: E402
from metapl.train.run import Run  # noqa: E402


class PeakOp(LiveTensorMemory):
    """Also names the operator whose output set the peak."""

    peak_op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.peak_bytes
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.peak_bytes > before:
            self.peak_op = str(func)
        return out


@contextlib.contextmanager
def backward_starts(live: LiveTensorMemory, marks: list[float]):
    """Records the live MiB at each ``Tensor.backward`` call: the step's first is the student's
    update pass (the teacher's comes last)."""
    real = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        marks.append(live.bytes / 2**20)
        return real(self, *args, **kwargs)

    torch.Tensor.backward = backward  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.backward = real  # type: ignore[method-assign]


def measure(variant: str, batch: int, precision: str, memory_format: str) -> dict:
    """``variant``: an mpl_estimator, "+forward_ad" after "exact" for J by forward-mode AD."""
    estimator, _, jvp = variant.partition("+")
    settings = step_settings("uda_mpl", "wrn28_2", "cpu", batch, precision, memory_format)
    settings["mpl_estimator"] = estimator
    if jvp:
        settings["mpl_jvp"] = jvp
    cfg = apply_overrides(TrainConfig(), settings).validate()
    torch.manual_seed(0)
    split = synthetic_cifar_split(max(28 * batch, 1024), np.random.RandomState(0))
    gc.collect()
    marks: list[float] = []
    with PeakOp("cpu") as live:
        run = Run(cfg, split, torch.device("cpu"))
        x = BatchSource(split, cfg, run.method.views, torch.device("cpu")).batch(0)
        for _ in range(2):
            run.method.step(x)
        live.reset_peak()
        with backward_starts(live, marks):
            run.method.step(x)
        run_jvp = run.method.mpl.last_jvp_path if estimator == "exact" else None
        del run, x
    return {
        "estimator": estimator,
        "jvp": run_jvp,
        "batch_labeled": batch,
        "batch_unlabeled": 7 * batch,
        "peak_mib": live.peak_mib,
        "at_update_backward_mib": marks[0],
        "above_update_backward_mib": live.peak_mib - marks[0],
        "peak_op": live.peak_op,
    }


def main() -> None:
    parser = parser_with_json(__doc__)
    parser.add_argument("--batch-sizes", default="8,32", help="labeled batches B, comma-separated")
    parser.add_argument(
        "--estimators",
        default="first_order,exact",
        help="comma-separated mpl_estimator values; exact+forward_ad: J by forward-mode AD",
    )
    parser.add_argument(
        "--precision",
        default="bf16",
        choices=("fp32", "bf16"),
        help="the config key precision: bf16 autocast or fp32 (default: bf16)",
    )
    parser.add_argument(
        "--memory-format",
        default="channels_last",
        choices=("channels_last", "contiguous"),
        help="the config key memory_format (default: channels_last)",
    )
    args = parser.parse_args()
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for estimator in args.estimators.split(","):
            row = measure(estimator, batch, args.precision, args.memory_format)
            print(
                f"B={batch:<4} {estimator:<18} peak {row['peak_mib']:9.2f} MiB   at the update "
                f"backward {row['at_update_backward_mib']:9.2f}   +{row['above_update_backward_mib']:.2f}"
                f"   peak op {row['peak_op']}",
                flush=True,
            )
            rows.append(row)
    save(
        args.json,
        {
            "setup": {
                "model": "wrn28_2",
                "method": "uda_mpl",
                "precision": args.precision,
                "memory_format": args.memory_format,
                "counted": "live tensor storages (metapl.live_memory), one step after two",
                "threads": torch.get_num_threads(),
            },
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
