"""Issue 5's goals, checked against the JSON files of `metapl bench` and train_throughput.py.

Reads files or folders (e.g. what `bash benchmarks/gpu_session.sh` left in $OUT: its bench_*.json
and train_throughput*.json) and prints one markdown row per goal: the measured value, the bar, met
or not. A bench file is judged on every goal; a train_throughput file, on real training's whole
step (<= 60 ms, >= 2.5x the peer) for each configuration it ran. Nothing is judged by eye or by
memory:
python benchmarks/goals.py FILE_OR_DIR ...   (e.g. benchmarks/results, or $OUT after gpu_session.sh)
The GPU bars are docs/design.md §3's (H200, WRN-28-2, labeled 128 / unlabeled 896, bf16); the
public peer's ~150 ms per step is its own loop, measured there, not here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PEER_MS = 150.0  # the public PyTorch peer, its own loop on an H200 (docs/design.md §3)


def _rows(bench: dict) -> dict[str, dict]:
    return {r["name"]: r for r in bench["results"]}


def goals(bench: dict, on_gpu: bool) -> list[tuple[str, str, str, bool]]:
    """(goal, measured, bar, met) for one `metapl bench` payload."""
    row = _rows(bench)
    ms = {name: r["ms"] for name, r in row.items()}
    exact, first, double = (
        ms["exact_mpl_step"],
        ms["first_order_mpl_step"],
        ms["double_backward_mpl_step"],
    )
    out = [
        ("exact / first-order", f"{exact / first:.2f}x", "<= 1.2x" if on_gpu else "<= 2x"),
        ("exact / double backward", f"{exact / double:.2f}x", "<= 0.25x" if on_gpu else "<= 0.5x"),
    ]
    met = [exact / first <= (1.2 if on_gpu else 2.0), exact / double <= (0.25 if on_gpu else 0.5)]
    if on_gpu:
        train = ms["train_step_exact_uda_mpl"]
        out += [
            ("exact step", f"{exact:.1f} ms", "<= 55 ms"),
            ("whole training step", f"{train:.1f} ms", "<= 60 ms"),
            ("throughput vs the public peer", f"{PEER_MS / train:.2f}x", ">= 2.5x"),
        ]
        met += [exact <= 55.0, train <= 60.0, PEER_MS / train >= 2.5]
        peak_exact, peak_first = (
            row["exact_mpl_step"]["peak_mib"],
            row["first_order_mpl_step"]["peak_mib"],
        )
        out.append(
            (
                "peak memory, exact vs first-order",
                f"{peak_exact:.0f} / {peak_first:.0f} MiB",
                "exact <= first-order",
            )
        )
        met.append(peak_exact <= peak_first)
    graphed = row.get("exact_mpl_step_labeled_graph")  # (metapl bench on a GPU)
    if on_gpu and graphed is not None:
        g_ms = graphed["ms"]
        out += [
            (
                "exact / first-order, labeled pass in a CUDA graph",
                f"{g_ms / first:.2f}x",
                "<= 1.2x",
            ),
            ("exact step, labeled pass in a CUDA graph", f"{g_ms:.1f} ms", "<= 55 ms"),
        ]
        met += [g_ms / first <= 1.2, g_ms <= 55.0]
        # the graph holds its pass's memory between replays, outside the allocated peak: the
        # memory held from the driver compares it with the first-order step's
        held = (
            graphed.get("peak_reserved_mib"),
            row["first_order_mpl_step"].get("peak_reserved_mib"),
        )
        if None not in held:
            out.append(
                (
                    "peak memory held (reserved), labeled graph vs first-order",
                    f"{held[0]:.0f} / {held[1]:.0f} MiB",
                    "exact <= first-order",
                )
            )
            met.append(held[0] <= held[1])
    numerics = bench.get("numerics") or {}
    if "cosine" in numerics:
        out.append(("teacher gradient vs float64 (cosine)", f"{numerics['cosine']:.4f}", ">= 0.99"))
        met.append(numerics["cosine"] >= 0.99)
    return [(g, m, b, ok) for (g, m, b), ok in zip(out, met)]


def throughput_goals(payload: dict) -> list[tuple[str, str, str, bool]]:
    """(goal, measured, bar, met) for each run of one train_throughput.py payload: real training's
    whole step, whose options (the labeled pass in a CUDA graph, a compiled teacher) the goal
    names, since the README quotes them with it."""
    out = []
    for run in payload["results"]:
        options = []
        if run.get("labeled_cuda_graph"):
            options.append("labeled pass in a CUDA graph")
        if run.get("compiled"):
            mode = run.get("compile_mode") or "default"
            options.append(f"{' and '.join(run['compiled'])} compiled ({mode})")
        how = f", {'; '.join(options)}" if options else ", eager"
        ms = run["ms_per_step"]
        out += [
            (
                f"real training step ({run['estimator']}{how})",
                f"{ms:.1f} ms",
                "<= 60 ms",
                ms <= 60.0,
            ),
            (
                f"throughput vs the public peer ({run['estimator']}{how})",
                f"{PEER_MS / ms:.2f}x",
                ">= 2.5x",
                PEER_MS / ms >= 2.5,
            ),
        ]
    return out


def _files(paths: list[Path]) -> list[Path]:
    """The files named, and each folder's bench_*.json and train_throughput*.json."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(path.glob("bench_*.json")) + sorted(path.glob("train_throughput*.json"))
        else:
            found.append(path)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        help="JSON files, or folders of bench_*.json and train_throughput*.json",
    )
    args = p.parse_args()
    files = _files(args.paths)
    if not files:
        raise SystemExit(
            f"goals.py: no bench_*.json or train_throughput*.json in "
            f"{', '.join(map(str, args.paths))}"
        )
    for path in files:
        payload = json.loads(path.read_text())
        machine = payload["machine"]
        if "setup" in payload:  # metapl bench
            on_gpu = machine.get("device", "").startswith("cuda")
            where = machine.get("gpu", machine["device"])
            # the --set keys (compile=true, ...): the goals hold for that configuration
            sets = [f"--set {k}={v}" for k, v in payload["setup"].get("overrides", {}).items()]
            print(f"{path.name} ({', '.join([where, payload['setup']['precision'], *sets])})\n")
            rows = goals(payload, on_gpu)
        else:  # train_throughput.py
            precisions = sorted({run["precision"] for run in payload["results"]})
            print(f"{path.name} ({machine.get('cuda') or 'cpu'}, {', '.join(precisions)})\n")
            if not machine.get("cuda"):  # (gpu_session.sh's SMOKE run on a CPU)
                print("not judged: measured on a CPU, and the bars are the H200's\n")
                continue
            rows = throughput_goals(payload)
        print("| goal | measured | bar | met |\n| --- | --- | --- | --- |")
        for goal, measured, bar, ok in rows:
            print(f"| {goal} | {measured} | {bar} | {'yes' if ok else 'no'} |")
        print()


if __name__ == "__main__":
    main()
