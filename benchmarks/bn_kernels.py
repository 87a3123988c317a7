"""BatchNorm's kernels at WRN-28-2's shapes, by memory format and dtype (issue 5's next lever).

Session 36's profile of the exact step on an H200 (docs/results.md, "GPU: one H200 (session 36)")
found BatchNorm's kernels in channels_last bf16 about half the step's device time: the statistics
kernel alone 10 ms a step, the convolutions less. This times, per BatchNorm shape of the step
(every layer of WRN-28-2 at 896 and 1,920 images), what those passes run:

- ``train``: forward with batch statistics (the update pass, the teacher's forward);
- ``train+backward``: that forward and its backward (the training passes);
- ``eval``: the transform with given statistics (what the tangent pass runs since session 36);

each in channels_last and contiguous memory, bf16 activations with float32 parameters (as autocast
runs BatchNorm) and float32 activations. The median of ``--repeats`` after warm-up, CUDA events on
a GPU. Writes one JSON naming the machine.

    python benchmarks/bn_kernels.py --device cuda --json $OUT/bn_kernels_h200.json

A CPU smoke run: ``--device cpu --scale 0.01 --repeats 2``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import device_or_exit, positive_int, save  # noqa: E402

aten = torch.ops.aten

# WRN-28-2's BatchNorms: (channels, height = width, layers of that shape), 32x32 input
WRN28_2_SHAPES = ((16, 32, 1), (32, 32, 8), (64, 16, 8), (128, 8, 8))


def _time(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def passes(x, w, b, dy, mean, var) -> dict:
    """The three kinds of BatchNorm pass on ``x`` (see the module's docstring), by name."""

    def train():
        return torch.nn.functional.batch_norm(x, None, None, w, b, True)

    def train_backward():
        torch.autograd.grad(train(), (x, w, b), dy)

    def evaluate():
        with torch.no_grad():
            aten.native_batch_norm(x, w, b, mean, var, False, 0.0, 1e-5)

    return {"train": train, "train+backward": train_backward, "eval": evaluate}


def measure(device: torch.device, images: int, repeats: int, scale: float) -> list[dict]:
    rows = []
    n = max(2, int(images * scale))
    for channels, size, layers in WRN28_2_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            for fmt, memory_format in MEMORY_FORMATS.items():
                x = torch.randn(n, channels, size, size, device=device, dtype=dtype)
                x = x.contiguous(memory_format=memory_format).requires_grad_()
                w = torch.ones(channels, device=device, requires_grad=True)
                b = torch.zeros(channels, device=device, requires_grad=True)
                mean, var = (
                    torch.zeros(channels, device=device),
                    torch.ones(channels, device=device),
                )
                for kind, fn in passes(x, w, b, torch.randn_like(x), mean, var).items():
                    rows.append(_row(kind, fn, device, repeats, n, channels, size, layers, x, fmt))
    return rows


def _row(kind, fn, device, repeats, n, channels, size, layers, x, fmt) -> dict:
    ms = _time(fn, device, repeats)
    row = {
        "kind": kind,
        "images": n,
        "channels": channels,
        "size": size,
        "layers": layers,
        "dtype": str(x.dtype).removeprefix("torch."),
        "memory_format": fmt,
        "ms": ms,
        "ms_all_layers": ms * layers,
    }
    print(
        f"{kind:<15} {n:5d}x{channels:3d}x{size:2d}x{size:<2d} {row['dtype']:<8} {fmt:<13} "
        f"{ms:8.3f} ms  (x{layers} layers: {ms * layers:7.2f} ms)"
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--device",
        default="cuda",
        choices=("cpu", "cuda"),
        help="where the kernels run; cuda times with CUDA events (default: cuda)",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=20,
        help="timed calls of each pass, after 3 warm-up calls; the median is kept (default: 20)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="batch sizes times this (smoke runs)")
    p.add_argument("--json", type=Path, help="where to write the results (default: none)")
    args = p.parse_args()
    device = device_or_exit(args.device, __file__)
    rows = []
    for images in (896, 1920):  # the student's unlabeled batch, the teacher's UDA batch
        rows += measure(device, images, args.repeats, args.scale)
    if args.json is not None:
        save(args.json, {"setup": vars(args) | {"json": str(args.json)}, "results": rows})


if __name__ == "__main__":
    main()
