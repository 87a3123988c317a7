"""Decoding image files for training: threads, and the next step decoded while this one trains.

python benchmarks/decode_cpu.py --json benchmarks/results/decode_cpu.json

Writes ImageNet-like JPEGs (500x375, quality 90, smooth content) into a temporary folder laid out as
a folder of your own (docs/own-data.md), read lazily as ImageNet always is, at 224 pixels. Measures:

1. ``decode``: milliseconds per image of a batch decoded by metapl.data.decoding with 1, 2, 4 ...
   threads, up to the usable cores (the thread counts in turn, round after round).
2. ``steps``: milliseconds per training step of BatchSource (8 labeled + 56 unlabeled images, the
   weak view only, so that augmentation costs little) followed by a stand-in for a GPU step: the
   host thread sleeps ``--gpu-ms`` (on a GPU it waits for the kernels it queued, using no CPU).
   Three ways: one thread and no decoding ahead (metapl before session 30), all threads and no
   decoding ahead, all threads with the next step decoded during this one (the default).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, positive_int, save  # noqa: E402

from metapl.data import decoding  # noqa: E402
from metapl.data.own import folder_split  # noqa: E402
from metapl.train.config import TrainConfig, apply_overrides  # noqa: E402
from metapl.train.data import BatchSource  # noqa: E402

RESOLUTION = 224


def photo(rng: np.random.RandomState) -> Image.Image:
    """A 500x375 picture with smooth shapes and some texture: JPEG sizes like ImageNet's."""
    coarse = rng.randint(0, 256, (12, 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC))
    grain = rng.randint(-12, 13, smooth.shape)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def write_folder(root: Path, unlabeled: int, labeled_per_class: int, seed: int = 0) -> None:
    rng = np.random.RandomState(seed)
    for cls in ("a", "b"):
        for i in range(labeled_per_class):
            path = root / "labeled" / cls / f"{i:04d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(rng).save(path, quality=90)
    (root / "unlabeled").mkdir(parents=True)
    for i in range(unlabeled):
        photo(rng).save(root / "unlabeled" / f"{i:05d}.JPEG", quality=90)


def thread_counts() -> list[int]:
    cores, counts, n = decoding.usable_cores(), [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return [*counts, cores]


def time_decoding(images, rounds: int) -> list[dict]:
    rows = np.arange(len(images))
    times: dict[int, list[float]] = {n: [] for n in thread_counts()}
    for _ in range(rounds):
        for n, out in times.items():
            decoding.set_threads(n)
            decoding.decode(images, rows[:8])  # the pool's threads start outside the timing
            start = time.perf_counter()
            decoding.decode(images, rows)
            out.append(1000 * (time.perf_counter() - start) / len(rows))
    return [
        {"threads": n, "ms_per_image": statistics.median(t), "ms_per_image_all": t}
        for n, t in times.items()
    ]


def time_steps(split, steps: int, rounds: int, gpu_ms: float) -> list[dict]:
    ways = {
        "1 thread, no decoding ahead": (1, False),
        "all threads, no decoding ahead": (0, False),
        "all threads, next step decoded ahead": (0, True),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(rounds):
        for name, (threads, ahead) in ways.items():
            decoding.set_threads(threads)
            overrides = {"dataset": "folder", "method": "uda", "batch_size": 8}
            overrides.update(image_size=RESOLUTION, data_prefetch=ahead, steps=10**6)
            cfg = apply_overrides(TrainConfig(), overrides).validate()
            source = BatchSource(split, cfg, ("unlabeled_weak",), torch.device("cpu"))
            first = r * steps * 2  # each round its own steps (all files are in the page cache)
            source.batch(first)  # not timed: the first step has nothing decoded ahead
            start = time.perf_counter()
            for step in range(first + 1, first + 1 + steps):
                source.batch(step)
                time.sleep(gpu_ms / 1000)  # the GPU's step: the host waits
            times[name].append(1000 * (time.perf_counter() - start) / steps)
            source.close()
    return [
        {"way": name, "ms_per_step": statistics.median(t), "ms_per_step_all": t}
        for name, t in times.items()
    ]


def main() -> None:
    ap = parser_with_json(__doc__)
    ap.add_argument("--images", type=int, default=256, help="unlabeled JPEGs written")
    ap.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="rounds, each timing every thread count and every way once; the median over "
        "rounds is kept (default: 3)",
    )
    ap.add_argument(
        "--steps", type=positive_int, default=8, help="timed steps per way and round (default: 8)"
    )
    ap.add_argument(
        "--gpu-ms",
        type=float,
        default=None,
        help="the stand-in GPU step (default: the step's decoding time on all threads)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)  # the weak augmentation's few ops: kept off the decoding cores
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_folder(root, args.images, labeled_per_class=16)
        split = folder_split(root, RESOLUTION, max_eager_bytes=0)
        decode = time_decoding(split.x_unlabeled, args.rounds)
        print(
            *(f"decode, {r['threads']} threads: {r['ms_per_image']:.2f} ms/image" for r in decode),
            sep="\n",
        )
        gpu_ms = args.gpu_ms if args.gpu_ms is not None else 64 * decode[-1]["ms_per_image"]
        steps = time_steps(split, args.steps, args.rounds, gpu_ms)
        print(*(f"step, {r['way']}: {r['ms_per_step']:.0f} ms" for r in steps), sep="\n")
    save(
        args.json,
        {
            "setup": {
                "images": "500x375 JPEG, quality 90, decoded to 224x224 (bicubic, centre crop)",
                "unlabeled_images": args.images,
                "batch": "8 labeled + 56 unlabeled, weak view only, torch 1 thread",
                "gpu_step_ms": gpu_ms,
                "rounds": args.rounds,
                "steps_per_round": args.steps,
                "median_of": "rounds",
            },
            "decode": decode,
            "steps": steps,
        },
    )


if __name__ == "__main__":
    main()
