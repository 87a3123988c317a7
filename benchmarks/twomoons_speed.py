"""Wall-clock time of the whole `metapl twomoons --seeds 0-9` (all methods), as a user runs it.

Runs the real command in a fresh process `--repeats` times and saves the times with the machine's
description: python benchmarks/twomoons_speed.py --json benchmarks/results/twomoons_cpu.json
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, save  # noqa: E402


def main() -> None:
    ap = parser_with_json(__doc__)
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            cmd = [
                sys.executable,
                "-m",
                "metapl",
                "twomoons",
                "--seeds",
                args.seeds,
                "--out",
                out,
                "--quiet",
            ]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
    result = {
        "results": [
            {
                "name": f"twomoons_seeds_{args.seeds}_all_methods",
                "command": " ".join(["metapl", "twomoons", "--seeds", args.seeds]),
                "seconds_median": statistics.median(times),
                "seconds": times,
            }
        ],
    }
    save(args.json, result)
    print(
        f"metapl twomoons --seeds {args.seeds}: median {statistics.median(times):.1f} s "
        f"over {len(times)} runs ({', '.join(f'{t:.1f}' for t in times)})"
    )


if __name__ == "__main__":
    main()
