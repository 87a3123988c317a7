"""Milliseconds on CPU, contiguous vs channels_last: what the config key ``memory_format`` chooses.

1. One forward+backward per registry model, in train mode, on a batch the size it sees in this
   project's CPU runs.
2. Whole UDA+MPL steps of WRN-28-2 (`metapl bench`'s CPU setup: labeled 4, unlabeled 28, the
   teacher seeing 60 images): exact (tangent tape), by double backward, and first-order.

Within each part every variant is timed interleaved, round by round (on a shared machine a load
change then hits all alike; separate runs of `metapl bench` drift by 10% and more, up to 19%
between sessions in benchmarks/results/bench_cpu_*.json). Median of
--repeats after warm-up:
python benchmarks/memory_format_cpu.py --json benchmarks/results/memory_format_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from jvp_cpu import timed  # noqa: E402
from machine import positive_int, save  # noqa: E402

from metapl.models import create_model  # noqa: E402

# (model, images per batch, channels, side): WRN-28-2 at `metapl bench`'s CPU unlabeled batch,
# the digits CNNs at the digits presets' teacher batch (50 + 2 x 200), the rest small.
CASES = [
    ("wrn28_2", 28, 3, 32),
    ("small_cnn", 128, 3, 32),
    ("digits_cnn", 450, 1, 8),
    ("resnet50", 8, 3, 64),
    ("efficientnet_b0", 8, 3, 64),
]


def fwd_bwd(model: torch.nn.Module, x: torch.Tensor):
    def run():
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(-1).sum().backward()

    return run


def rows(repeats: int, warmup: int) -> list[dict]:
    out = []
    for name, n, chans, side in CASES:
        torch.manual_seed(0)
        plain = create_model(name, 10).train()
        cl = create_model(name, 10).train().to(memory_format=torch.channels_last)
        cl.load_state_dict(plain.state_dict())
        x = torch.rand(n, chans, side, side)
        fns = {
            "contiguous": fwd_bwd(plain, x),
            "channels_last": fwd_bwd(cl, x.contiguous(memory_format=torch.channels_last)),
        }
        ms = {k: statistics.median(v) for k, v in timed(fns, repeats, warmup)}
        row = {"model": name, "images": n, "input": [chans, side, side], **ms}
        row["channels_last_over_contiguous"] = ms["channels_last"] / ms["contiguous"]
        print(
            f"{name:<16} {n:4d} images  contiguous {ms['contiguous']:8.1f} ms  "
            f"channels_last {ms['channels_last']:8.1f} ms  ({row['channels_last_over_contiguous']:.2f}x)"
        )
        out.append(row)
    return out


def step_rows(repeats: int, warmup: int) -> list[dict]:
    import numpy as np

    from metapl.bench import synthetic_cifar_split
    from metapl.train.config import TrainConfig, apply_overrides
    from metapl.train.data import BatchSource
    from metapl.train.run import Run

    split = synthetic_cifar_split(1024, np.random.RandomState(0))
    device = torch.device("cpu")
    fns = {}
    for estimator in ("exact", "double_backward", "first_order"):
        for layout in ("contiguous", "channels_last"):
            settings = dict(dataset="cifar10-4k", model="wrn28_2", method="uda_mpl", device="cpu")
            settings.update(batch_size=4, steps=10_000, warmup_steps=10)
            settings.update(mpl_estimator=estimator, memory_format=layout)
            cfg = apply_overrides(TrainConfig(), settings).validate()
            run = Run(cfg, split, device)
            batch = BatchSource(split, cfg, run.method.views, device).batch(0)
            fns[f"{estimator}_mpl_step/{layout}"] = lambda run=run, batch=batch: run.method.step(
                batch
            )
    ms = {k: statistics.median(v) for k, v in timed(fns, repeats, warmup)}
    out = []
    for estimator in ("exact", "double_backward", "first_order"):
        plain, cl = (
            ms[f"{estimator}_mpl_step/contiguous"],
            ms[f"{estimator}_mpl_step/channels_last"],
        )
        row = {"step": f"{estimator}_mpl_step", "contiguous": plain, "channels_last": cl}
        row["channels_last_over_contiguous"] = cl / plain
        print(
            f"{row['step']:<26} contiguous {plain:8.1f} ms  channels_last {cl:8.1f} ms  "
            f"({cl / plain:.2f}x)"
        )
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=9,
        help="timed rounds, each calling every variant once; the median is kept (default: 9)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    p.add_argument("--json", type=Path, help="where to write the results (default: none)")
    args = p.parse_args()
    payload = {
        "setup": {"repeats": args.repeats, "warmup": args.warmup, "pass": "forward+backward"},
        "results": rows(args.repeats, args.warmup),
        "wrn28_2_uda_mpl_steps": step_rows(args.repeats, args.warmup),
    }
    if args.json:
        save(args.json, payload, sort_keys=True)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
