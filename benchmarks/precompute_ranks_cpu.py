"""A large teacher's precompute shared by N gloo processes, against one process, on the CPU.

python benchmarks/precompute_ranks_cpu.py --json benchmarks/results/precompute_ranks_cpu.json

WRN-28-2 (the CIFAR presets' model, random weights) classifies random 32x32x3 images into a
distributions file with ``metapl.reduced.precompute.precompute_distributions``, batches of 128,
chunks of 4 batches, so a run takes several rounds. Timed: one process with 1 thread, one process
with as many threads as the worlds' total, and N = 2 processes of 1 thread each, which share the
rows (``ranks=``: each classifies its share of every round, rank 0 gathers them over gloo and writes
the file). Per setting: the wall time of the whole call (every process starts it together after
a barrier; the slowest one's time) and, for the processes, the time rank 0 spent outside its own
model calls (gathering, writing, waiting). The files of every setting are compared byte for byte.
On a machine with as many cores as processes this shows the protocol's cost; the gain it is for
(1/N of the images per GPU) needs GPUs and is not measured here.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, positive_int, save  # noqa: E402

from metapl.distributed import DataParallel  # noqa: E402
from metapl.models.registry import create_model  # noqa: E402
from metapl.reduced import precompute  # noqa: E402
from metapl.reduced.precompute import Ranks, precompute_distributions  # noqa: E402

BATCH, CHUNK = 128, 512


def images(n: int) -> np.ndarray:
    return np.random.RandomState(0).randint(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("wrn28_2", num_classes=10)


def timed_call(model, x, out: Path, ranks: Ranks | None = None) -> tuple[float, float]:
    """Wall seconds of the precompute and seconds spent in the model's batches."""
    in_model = [0.0]
    real = precompute._batch_probs

    def counted(*args):
        start = time.perf_counter()
        try:
            return real(*args)
        finally:
            in_model[0] += time.perf_counter() - start

    precompute._batch_probs = counted
    try:
        kwargs = {} if ranks is None else {"ranks": ranks}
        start = time.perf_counter()
        precompute_distributions(
            model, x, out, batch_size=BATCH, chunk_size=CHUNK, progress=False, **kwargs
        )
        return time.perf_counter() - start, in_model[0]
    finally:
        precompute._batch_probs = real


def worker(rank: int, world: int, n: int, folder: str, port: int, result: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=10))
    try:
        dp = DataParallel()
        ranks = Ranks(dp.rank, world, dp.gather_to_main, dp.broadcast_object)
        model, x = teacher(), images(n)
        dp.wait_for_main()
        wall, in_model = timed_call(model, x, Path(folder) / "ranks.npy", ranks)
        walls = dp.gather_to_main(wall)
        if rank == 0:
            result.update(wall=max(walls), rank0_in_model=in_model, rank0_other=wall - in_model)
        dp.wait_for_main()
    finally:
        dist.destroy_process_group()


def processes(world: int, n: int, folder: str, port: int) -> dict:
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(worker, args=(world, n, folder, port, result), nprocs=world, join=True)
        return dict(result)


def main() -> None:
    ap = parser_with_json(__doc__)
    ap.add_argument(
        "--images", type=int, default=4096, help="random images classified (default: 4096)"
    )
    ap.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="rounds, each running every setting once; the median over rounds is kept (default: 3)",
    )
    ap.add_argument("--world", type=int, default=2, help="processes that share the precompute")
    args = ap.parse_args()
    model, x = teacher(), images(args.images)
    rows: dict[str, list[dict]] = {"one_process_1_thread": [], "one_process_all_threads": []}
    rows[f"{args.world}_processes_1_thread_each"] = []
    same_bytes = True
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # the settings take turns, so a change of load hits all
            files = []
            for name, threads in (("one_process_1_thread", 1), ("one_process_all_threads", 0)):
                torch.set_num_threads(threads or args.world)
                out = Path(tmp, f"{name}{r}.npy")
                wall, in_model = timed_call(model, x, out)
                rows[name].append({"wall": wall, "in_model": in_model})
                files.append(out)
            folder = Path(tmp, f"ranks{r}")
            folder.mkdir()
            got = processes(args.world, args.images, str(folder), 29500 + r)
            rows[f"{args.world}_processes_1_thread_each"].append(got)
            files.append(folder / "ranks.npy")
            same_bytes &= len({f.read_bytes() for f in files}) == 1
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]['wall']:.2f} s" for k, v in rows.items()))
    results = [
        {
            "setting": name,
            "wall_s": statistics.median(t["wall"] for t in times),
            "wall_s_per_round": [t["wall"] for t in times],
            **(
                {
                    "rank0_in_model_s": statistics.median(t["rank0_in_model"] for t in times),
                    "rank0_outside_model_s": statistics.median(t["rank0_other"] for t in times),
                }
                if "rank0_other" in times[0]
                else {}
            ),
        }
        for name, times in rows.items()
    ]
    save(
        args.json,
        {
            "model": "wrn28_2",
            "images": args.images,
            "batch_size": BATCH,
            "chunk_size": CHUNK,
            "files_byte_identical": same_bytes,
            "results": results,
        },
    )
    for row in results:
        print(row)
    print("files byte-identical:", same_bytes)


if __name__ == "__main__":
    main()
