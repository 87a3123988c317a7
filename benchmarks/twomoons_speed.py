"""Wall-clock time of the whole `metapl twomoons --seeds 0-9` (all methods), as a user runs it.

Runs the real command in a fresh process `--repeats` times for each number of PyTorch threads in
`--threads` ("auto": the command's default, which counts the cores other work leaves idle), on an
idle machine and beside each number of busy processes in `--load` (pure-Python loops, one core
each: other work sharing the cores), and saves the times with the machine's description:
python benchmarks/twomoons_speed.py --json benchmarks/results/twomoons_cpu.json

The runs alternate (every setting once per round) so that a change in the machine's own load hits
all settings alike.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, positive_int, save  # noqa: E402

BUSY_LOOP = "while True: pass"


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def _threads(text: str) -> list[str]:
    """Thread counts as given ("auto" or a number), checked."""
    parts = text.split(",")
    for part in parts:
        if part != "auto" and not (part.isdigit() and int(part) >= 1):
            raise ValueError(part)
    return parts


def time_command(seeds: str, threads: str, load: int) -> float:
    """Seconds of one `metapl twomoons` run with ``threads`` beside ``load`` busy processes."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(load)]
    try:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "metapl", "twomoons", "--seeds", seeds, "--out", out]
            cmd += [] if threads == "auto" else ["--threads", threads]
            cmd += ["--quiet"]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - start
    finally:
        for process in busy:
            process.kill()
            process.wait()


def main() -> None:
    ap = parser_with_json(__doc__)
    ap.add_argument(
        "--seeds", default="0-9", help="--seeds of metapl twomoons, e.g. 0,3,7 (default: 0-9)"
    )
    ap.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="rounds, each running every --threads and --load setting once; the median is "
        "kept (default: 3)",
    )
    ap.add_argument(
        "--threads",
        type=_threads,
        default=["1", "2", "auto"],
        help="torch thread counts to compare, comma-separated (default: 1,2,auto)",
    )
    ap.add_argument(
        "--load",
        type=_ints,
        default=[0, 2],
        help="busy processes beside it, comma-separated counts (default: 0,2)",
    )
    args = ap.parse_args()
    settings = [(threads, load) for load in args.load for threads in args.threads]
    times: dict[tuple[str, int], list[float]] = {setting: [] for setting in settings}
    for _ in range(args.repeats):
        for threads, load in settings:
            times[threads, load].append(time_command(args.seeds, threads, load))
            print(f"threads {threads}, busy processes {load}: {times[threads, load][-1]:.1f} s")
    results = [
        {
            "name": f"twomoons_seeds_{args.seeds}_all_methods_threads{threads}_load{load}",
            "command": f"metapl twomoons --seeds {args.seeds}"
            + ("" if threads == "auto" else f" --threads {threads}"),
            "threads": threads,
            "busy_processes": load,
            "seconds_median": statistics.median(times[threads, load]),
            "seconds": times[threads, load],
        }
        for threads, load in settings
    ]
    save(args.json, {"results": results})
    for row in results:
        print(
            f"{row['command']} beside {row['busy_processes']} busy processes: median "
            f"{row['seconds_median']:.1f} s over {args.repeats} runs"
        )


if __name__ == "__main__":
    main()
