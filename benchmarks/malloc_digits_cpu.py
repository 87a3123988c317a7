"""`metapl digits` with and without metapl.malloc's fixed glibc thresholds: wall and CPU time.

Runs `metapl digits --seeds 0-1 --steps 500` (by default) in fresh processes, the setting off
(glibc's adaptive thresholds, as before metapl.malloc) and on (what the command line does), in
turn for `--rounds` rounds, and saves each run's wall, user and system seconds (its process tree's,
workers included) with the accuracies, which must be the same for both:
python benchmarks/malloc_digits_cpu.py --json benchmarks/results/malloc_digits_cpu.json
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, positive_int, save  # noqa: E402

# `metapl` with keep_freed_memory replaced by a no-op when the first argument is "off"
LAUNCH = """
import sys
import metapl.cli as cli
if sys.argv.pop(1) == "off":
    cli.keep_freed_memory = lambda: False
raise SystemExit(cli.main(sys.argv[1:]))
"""


def one_run(setting: str, args: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", LAUNCH, setting, *args, "--out", tmp, "--quiet"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - start
        results = json.loads((Path(tmp) / "results.json").read_text())["results"]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "setting": setting,
        "wall_s": wall,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "accuracies": [[r["method"], r["seed"], r["accuracy"]] for r in results],
    }


def main() -> None:
    ap = parser_with_json(__doc__)
    ap.add_argument(
        "--rounds",
        type=positive_int,
        default=2,
        help="rounds, each running the command with the setting off, then on (default: 2)",
    )
    ap.add_argument(
        "--steps", type=int, default=500, help="--steps of metapl digits (default: 500)"
    )
    ap.add_argument("--seeds", default="0-1", help="--seeds of metapl digits (default: 0-1)")
    args = ap.parse_args()
    command = ["digits", "--seeds", args.seeds, "--steps", str(args.steps)]
    runs = []
    for _ in range(args.rounds):
        for setting in ("off", "on"):
            runs.append(one_run(setting, command))
            r = runs[-1]
            print(
                f"{setting}: wall {r['wall_s']:.1f} s, user {r['user_s']:.1f}, sys {r['sys_s']:.1f}"
            )
    same = all(r["accuracies"] == runs[0]["accuracies"] for r in runs)
    print(f"the same accuracies in every run: {same}")
    save(
        args.json,
        {"command": "metapl " + " ".join(command), "runs": runs, "same_accuracies": same},
    )


if __name__ == "__main__":
    main()
