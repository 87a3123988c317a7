"""What torch.compile buys each UDA+MPL estimator on CPU, in one process (issue 5's lever "torch.compile
where it holds"; the CPU goal exact <= 0.5x double backward).

`metapl bench --set compile=true` compiles every kind of step, but its runs on different days
differ by 10-20% on this shared machine, so eager and compiled rows from two runs do not compare.
Here every variant is built in one process and timed in interleaved rounds (the order rotated each
round), WRN-28-2 as `metapl bench` builds it (labeled B, unlabeled 7B, two teacher views):

- first_order: eager; compiled (teacher and student, as `--set compile=true`);
- exact (J from the tangent tape): eager; the teacher compiled; the teacher and the student's
  update pass on the tape compiled (as `--set compile=true`);
- double_backward: eager; the teacher compiled (as `--set compile=true`: its student cannot be).

python benchmarks/compile_cpu.py --precision bf16 --memory-format channels_last \\
    --json benchmarks/results/compile_cpu.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from jvp_cpu import timed  # noqa: E402
from machine import parser_with_json, positive_int, save  # noqa: E402

from metapl.bench import step_settings, synthetic_cifar_split  # noqa: E402
from metapl.train.config import TrainConfig, apply_overrides  # noqa: E402
from metapl.train.data import BatchSource  # noqa: E402
from metapl.train.run import Run  # noqa: E402

# name -> (mpl_estimator, what is compiled: "none", "teacher", or "all" = compile_models())
VARIANTS = {
    "first_order": ("first_order", "none"),
    "first_order_compiled": ("first_order", "all"),
    "exact": ("exact", "none"),
    "exact_teacher_compiled": ("exact", "teacher"),
    "exact_compiled": ("exact", "all"),
    "double_backward": ("double_backward", "none"),
    "double_backward_compiled": ("double_backward", "all"),
}


def build(estimator: str, compiled: str, batch: int, precision: str, memory_format: str, split):
    """One step of the variant, as a function (its models built from seed 0, as every variant's)."""
    settings = step_settings("uda_mpl", "wrn28_2", "cpu", batch, precision, memory_format)
    cfg = apply_overrides(TrainConfig(), {**settings, "mpl_estimator": estimator}).validate()
    torch.manual_seed(0)
    run = Run(cfg, split, torch.device("cpu"))
    if compiled == "all":
        run.compile_models()  # (resets the compiler: before any variant has run)
    elif compiled == "teacher":
        run.method.models["teacher"].compile(dynamic=False)
    batch_ = BatchSource(split, cfg, run.method.views, torch.device("cpu")).batch(0)
    return run, lambda: run.method.step(batch_)


def main() -> None:
    parser = parser_with_json(__doc__)
    parser.add_argument("--batch-size", type=positive_int, default=4, help="labeled B (default 4)")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument(
        "--memory-format", default="channels_last", choices=("channels_last", "contiguous")
    )
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed rounds")
    parser.add_argument(
        "--warmup", type=positive_int, default=3, help="rounds before timing (the compiles)"
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    split = synthetic_cifar_split(max(28 * args.batch_size, 1024), np.random.RandomState(0))
    runs, fns = {}, {}
    for name in names:
        runs[name], fns[name] = build(
            *VARIANTS[name], args.batch_size, args.precision, args.memory_format, split
        )
    rows = []
    for name, ms in timed(fns, args.repeats, args.warmup):
        estimator, compiled = VARIANTS[name]
        mpl = runs[name].method.mpl
        row = {
            "name": name,
            "estimator": estimator,
            "compiled": compiled,
            "ms": statistics.median(ms),
            "ms_all": ms,
            "jvp": mpl.last_jvp_path if estimator == "exact" else None,
        }
        rows.append(row)
        print(f"{name:<26} {row['ms']:9.2f} ms", flush=True)
    ms = {r["name"]: r["ms"] for r in rows}
    ratios = {}
    for exact in ("exact", "exact_teacher_compiled", "exact_compiled"):
        for other in ("double_backward", "double_backward_compiled"):
            if exact in ms and other in ms:
                ratios[f"{exact}_over_{other}"] = ms[exact] / ms[other]
        for other in ("first_order", "first_order_compiled"):
            if exact in ms and other in ms:
                ratios[f"{exact}_over_{other}"] = ms[exact] / ms[other]
    for key, value in ratios.items():
        print(f"{key:<52} {value:.3f}x")
    save(
        args.json,
        {
            "setup": {
                "model": "wrn28_2",
                "batch_labeled": args.batch_size,
                "batch_unlabeled": 7 * args.batch_size,
                "precision": args.precision,
                "memory_format": args.memory_format,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "timing": "interleaved rounds, the order rotated each round",
            },
            "results": rows,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
