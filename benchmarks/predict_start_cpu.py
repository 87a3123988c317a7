"""Wall-clock time of `metapl predict` (3 images) and `metapl export` (TorchScript) on a tiny run.

Trains `digits-supervised` for 5 steps into a temporary folder, then runs each command in a fresh
process `--repeats` times, alternating, and saves the times with the machine's description:
python benchmarks/predict_start_cpu.py --json benchmarks/results/predict_start_cpu.json

On so small a model the time is the commands' start: importing torch and loading the run.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, positive_int, save  # noqa: E402


def metapl(*args: str) -> float:
    """Seconds of one `metapl ARGS` in a fresh process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "metapl", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = parser_with_json(__doc__)
    ap.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help="runs of each command, alternating; the median is kept (default: 5)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run, out = Path(tmp) / "run", Path(tmp) / "model.pt"
        metapl("train", "--preset", "digits-supervised", "--steps", "5", "--out", str(run))
        pixels, _ = load_digits(return_X_y=True)
        images = []
        for i in range(3):
            images.append(str(Path(tmp) / f"{i}.png"))
            image = np.round(pixels[i] * 255 / 16).astype(np.uint8).reshape(8, 8)
            Image.fromarray(image).save(images[-1])
        commands = {
            "predict_3_images": ["predict", "--run", str(run), *images],
            "export_torchscript": ["export", "--run", str(run), "--format", "torchscript"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, argv in commands.items():
                out.unlink(missing_ok=True)
                extra = ["--output", str(out)] if name.startswith("export") else []
                times[name].append(metapl(*argv, *extra))
    results = [
        {
            "name": name,
            "command": "metapl " + " ".join(commands[name][:1]) + " (digits-supervised, 5 steps)",
            "seconds_median": statistics.median(seconds),
            "seconds": seconds,
        }
        for name, seconds in times.items()
    ]
    save(args.json, {"results": results})
    for row in results:
        print(f"{row['name']}: median {row['seconds_median']:.2f} s over {args.repeats} runs")


if __name__ == "__main__":
    main()
