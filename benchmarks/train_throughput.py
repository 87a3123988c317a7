"""Steps per second and peak memory of real training steps (issue 3, item 10).

Runs the engine's own step (``Run.advance``: per-image RandAugment and batch assembly on the
device, the method's step, the LR schedules, EMA) for a preset at its Table 3 batch sizes, on
CIFAR-shaped random images, so that no dataset files are needed. Timed: the steps after
``--warmup``, with one synchronization at the end (no host sync inside the loop). On the H200:

    python benchmarks/train_throughput.py --device cuda --precision bf16 --steps 300 \\
        --json benchmarks/results/train_throughput_h200_bf16.json

On a CPU, a smoke run: ``--device cpu --steps 3 --warmup 1 --set batch_size=4``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import fail, positive_int, save  # noqa: E402

from metapl.bench import synthetic_cifar_split  # noqa: E402
from metapl.errors import MetaplError  # noqa: E402
from metapl.train.batches_ahead import batches_for  # noqa: E402
from metapl.train.config import apply_overrides, parse_set_options  # noqa: E402
from metapl.train.data import BatchSource  # noqa: E402
from metapl.train.engine import resolve_device  # noqa: E402
from metapl.train.presets import load_preset  # noqa: E402
from metapl.train.run import Run  # noqa: E402


def measure(preset: str, device: str, precision: str, steps: int, warmup: int, sets: list[str]):
    dev = resolve_device(device)
    overrides = {"device": dev.type, "precision": precision, **parse_set_options(sets)}
    cfg = apply_overrides(load_preset(preset), overrides).validate()
    torch.manual_seed(0)
    n_unlabeled = cfg.batch_size * cfg.unlabeled_ratio
    split = synthetic_cifar_split(max(4 * n_unlabeled, 1024), np.random.RandomState(0))
    run = Run(cfg, split, dev)
    compiled = run.compile_models() if cfg.compile else []  # --set compile=true, as train does
    # as `metapl train` draws them: on a GPU, made a step ahead on a background thread
    source = BatchSource(split, cfg, run.method.views, dev)
    source = batches_for(source, dev, run.total_steps - 1, run.views_at)
    for _ in range(warmup):
        run.advance(source)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for _ in range(steps):
        metrics = run.advance(source)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    source.close()
    losses = {k: float(v) for k, v in metrics.items() if "loss" in k and torch.is_tensor(v)}
    return {
        "preset": preset,
        "method": cfg.method,
        "model": cfg.model,
        "estimator": cfg.mpl_estimator,
        "precision": precision,
        "compiled": compiled,  # the models torch.compile'd (--set compile=true)
        "compile_mode": cfg.compile_mode if cfg.compile else None,
        # the exact step's labeled pass in a CUDA graph: asked for, and what the last step ran
        "labeled_cuda_graph": cfg.mpl_labeled_cuda_graph,
        "labeled_path": getattr(getattr(run.method, "mpl", None), "last_labeled_path", None),
        "batch_labeled": cfg.batch_size,
        "batch_unlabeled": n_unlabeled,
        "steps_timed": steps,
        "warmup_steps": warmup,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        # held from the driver: a CUDA graph's memory between replays counts here only
        "peak_reserved_mib": (
            torch.cuda.max_memory_reserved(dev) / 2**20 if dev.type == "cuda" else None
        ),
        "final_losses": losses,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--preset",
        default="cifar10-4k-uda-mpl",
        help="a built-in preset or a TOML file of config keys (default: cifar10-4k-uda-mpl)",
    )
    p.add_argument(
        "--device",
        default="cuda",
        choices=("cpu", "cuda", "auto"),
        help="auto: cuda where PyTorch sees one, else cpu (default: cuda)",
    )
    p.add_argument(
        "--precision",
        default="bf16",
        choices=("fp32", "bf16"),
        help="the config key precision: bf16 autocast or fp32 (default: bf16)",
    )
    p.add_argument("--steps", type=positive_int, default=300, help="timed steps (default: 300)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (default: 20)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, as metapl train's --set; repeatable (default: none)",
    )
    p.add_argument("--json", type=Path, help="write {machine, results: [...]} here")
    args = p.parse_args()
    try:
        row = measure(args.preset, args.device, args.precision, args.steps, args.warmup, args.set)
    except MetaplError as e:  # no CUDA device, an unknown --set key, ...: one line, as metapl's
        fail(__file__, str(e))
    print(json.dumps(row, indent=1))
    if args.json:
        save(args.json, {"results": [row]}, sort_keys=True)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
