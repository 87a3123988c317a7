"""CPU time of the batch augmentations, one or more metapl source trees compared call by call.

Times `flip_and_crop` (reflect padding of 4, flip probability 0.5) and `StrongAugment` (2 ops,
magnitude 10, cutout; the digits presets' 3 pixels at 8x8, Table 3's 16 at 32x32) on random
batches of the digits and CIFAR shapes, with one torch thread. Each `--src NAME=PATH` is a
metapl `src` folder (a checkout of another commit, say); every round runs each source once, in
its own process and in turn, so a change in the machine's load hits them alike; a source's time
for a case is the median over rounds of its median over `--calls` calls:
python benchmarks/augment_cpu.py --src before=/tmp/old/src --src after=src \
    --json benchmarks/results/augment_cpu.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, positive_int, save  # noqa: E402

# name: (batch shape, cutout side of StrongAugment)
CASES = {
    "digits_450x1x8x8": ((450, 1, 8, 8), 3),
    "cifar_64x3x32x32": ((64, 3, 32, 32), 16),
    "cifar_448x3x32x32": ((448, 3, 32, 32), 16),
}

# Run in a fresh process with one source on its path: prints {case/function: median µs}.
WORKER = """
import json, sys, time
import torch
from metapl.augment import StrongAugment, flip_and_crop
torch.set_num_threads(1)
cases, calls = json.loads(sys.argv[1]), int(sys.argv[2])
timings = {}
for name, (shape, side) in cases.items():
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    strong = StrongAugment(num_ops=2, max_magnitude=10, cutout=side)
    functions = {
        "flip_and_crop": lambda g: flip_and_crop(images, 4, 0.5, "reflect", g),
        "strong_augment": lambda g: strong(images, g),
    }
    for fn_name, fn in functions.items():
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):  # warm-up
            fn(generator)
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            fn(generator)
            samples.append((time.perf_counter() - start) * 1e6)
        samples.sort()
        timings[f"{name}/{fn_name}"] = samples[len(samples) // 2]
print(json.dumps(timings))
"""


def run_source(path: str, calls: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(path).resolve()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(CASES), str(calls)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def main() -> None:
    ap = parser_with_json(__doc__)
    ap.add_argument("--src", action="append", required=True, help="NAME=PATH of a metapl src")
    ap.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="rounds, each running every --src once in turn; a case's time is their median "
        "(default: 3)",
    )
    ap.add_argument(
        "--calls",
        type=positive_int,
        default=60,
        help="timed calls per case and augmentation in each round, after 3 warm-up calls; "
        "the round keeps their median (default: 60)",
    )
    args = ap.parse_args()
    sources = dict(s.split("=", 1) for s in args.src)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
    for _ in range(args.rounds):
        for name, path in sources.items():
            rounds[name].append(run_source(path, args.calls))
    keys = list(next(iter(rounds.values()))[0])
    results = [
        {
            "name": key,
            "source": name,
            "us": statistics.median(r[key] for r in rounds[name]),
            "us_per_round": [r[key] for r in rounds[name]],
        }
        for key in keys
        for name in sources
    ]
    for r in results:
        print(f"{r['name']:45s} {r['source']:10s} {r['us']:10.0f} µs")
    save(
        args.json,
        {"sources": sources, "rounds": args.rounds, "calls": args.calls, "results": results},
    )


if __name__ == "__main__":
    main()
