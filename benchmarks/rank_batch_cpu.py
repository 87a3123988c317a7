"""One rank's batch under torchrun: drawn, augmented and sliced, against one process's whole batch.

python benchmarks/rank_batch_cpu.py --json benchmarks/results/rank_batch_cpu.json

The cifar10-4k-uda-mpl preset's batch (Table 3: 128 labeled, 7 x 128 = 896 unlabeled images of
32x32x3, weak view of both and strong view of the unlabeled, cutout 16) from random in-memory
images, on the CPU: milliseconds per ``BatchSource.batch`` for one process (the whole batch) and for
rank 0 of N = 2, 4, 8 (its share). Until this script's commit every rank augmented the whole batch
and kept its share, which cost each rank the one-process time; now each rank augments its share
alone, with the whole batch's random draws (metapl.augment.rng.Share), so the shares still
concatenate to the one-process batch (tests/test_decoding.py, tests/test_torchrun.py). The worlds
take turns within each round; a world's time is the median over rounds of its median over steps.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, positive_int, save  # noqa: E402

from metapl.data.splits import SSLSplit  # noqa: E402
from metapl.train.data import BatchSource  # noqa: E402
from metapl.train.presets import load_preset  # noqa: E402

PRESET = "cifar10-4k-uda-mpl"
VIEWS = ("unlabeled_weak", "unlabeled_strong")  # UDA+MPL's (metapl.methods.mpl)
WORLDS = (1, 2, 4, 8)


def random_split(labeled: int, unlabeled: int) -> SSLSplit:
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (labeled + unlabeled, 32, 32, 3), dtype=np.uint8)
    labels = rng.randint(0, 10, labeled).astype(np.int64)
    empty = images[:0]
    return SSLSplit(
        images[:labeled], labels, images[labeled:], empty, labels[:0], empty, labels[:0], 10, "rnd"
    )


def time_worlds(split: SSLSplit, steps: int, rounds: int) -> list[dict]:
    cfg = load_preset(PRESET)
    times: dict[int, list[float]] = {world: [] for world in WORLDS}
    cpu = torch.device("cpu")
    for r in range(rounds):
        for world in WORLDS:
            source = BatchSource(split, cfg, VIEWS, cpu, shard=(0, world))
            first = r * (steps + 1)
            source.batch(first)  # warm-up
            per_step = []
            for step in range(first + 1, first + 1 + steps):
                start = time.perf_counter()
                source.batch(step)
                per_step.append(1000 * (time.perf_counter() - start))
            times[world].append(statistics.median(per_step))
    one = statistics.median(times[1])
    return [
        {
            "world_size": world,
            "rank_images": (cfg.batch_size + cfg.batch_size * cfg.unlabeled_ratio) // world,
            "ms_per_batch": statistics.median(t),
            "ms_per_batch_per_round": t,
            "vs_one_process": statistics.median(t) / one,
        }
        for world, t in times.items()
    ]


def main() -> None:
    ap = parser_with_json(__doc__)
    ap.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="rounds, each timing every world in turn; the median over rounds is kept (default: 3)",
    )
    ap.add_argument(
        "--steps",
        type=positive_int,
        default=10,
        help="timed batches per world and round (default: 10)",
    )
    args = ap.parse_args()
    split = random_split(labeled=4000, unlabeled=4096)
    results = time_worlds(split, args.steps, args.rounds)
    for r in results:
        print(
            f"world {r['world_size']}: rank 0's batch of {r['rank_images']} images "
            f"{r['ms_per_batch']:.1f} ms ({r['vs_one_process']:.2f}x one process)"
        )
    save(
        args.json,
        {
            "setup": {
                "preset": PRESET,
                "views": VIEWS,
                "images": "random uint8 32x32x3, in memory",
                "torch_threads": torch.get_num_threads(),
                "rounds": args.rounds,
                "steps_per_round": args.steps,
                "median_of": "rounds (each the median over its steps)",
            },
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
