"""Where one MPL step's time and memory go: per phase, per kernel, GPU busy vs idle (issue 5).

For each estimator (first-order, exact) at Table 3's batch (WRN-28-2, labeled 128, unlabeled 896,
two teacher views) on CIFAR-shaped random images, as `metapl bench` builds them:

- the step's median milliseconds after warm-up (CUDA events on a GPU, wall time on a CPU);
- each phase's device time and its memory (allocated before and after, and the peak inside it;
  on a CPU its wall time only):
  teacher forward, student update (forward+backward), student optimizer step, the labeled pass
  and its gradient v, the tangent pass J, the teacher's backward and optimizer step;
- the kernels that take the most device time (torch.profiler), and how much of the step's wall time
  the device is busy (the rest is the host launching work, or waiting on it);
- the whole training step's data part alone (``BatchSource.batch``: per-image RandAugment, views),
  and the engine's step with the batch made in the loop and made ahead on a thread;
- with ``--memory-origins`` (CUDA): the blocks of device memory held between steps, with the code
  that allocated them;
- with ``--variants compile_tangent``: the exact step with its tangent pass torch.compile'd (tried
  in session 35: slower, 108.9 ms a step);
- with ``--variants recompute_bn_stats``: the exact step with BatchNorm's tangent computing the
  batch statistics again, as before session 36, instead of reading the update pass's (what the
  saved statistics save, in the same process).

Writes one JSON (and a profiler table per estimator, as text) to ``--out``. On the H200:

    python benchmarks/profile_step.py --device cuda --precision bf16 --out $OUT

A CPU smoke run: ``--device cpu --precision fp32 --batch-size 2 --model small_cnn --repeats 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from machine import device_or_exit, positive_int, save  # noqa: E402

from metapl.atomic import write_text_atomically  # noqa: E402
from metapl.bench import synthetic_cifar_split  # noqa: E402
from metapl.mpl.jvp import JvpPaths  # noqa: E402
from metapl.mpl.step import MetaPseudoLabels  # noqa: E402
from metapl.train.batches_ahead import batches_for  # noqa: E402
from metapl.train.config import TrainConfig, apply_overrides  # noqa: E402
from metapl.train.data import BatchSource  # noqa: E402
from metapl.train.run import Run  # noqa: E402

PHASES: list[dict] = []  # filled by the wrappers while `recording` is on
PHASE_NAMES = {
    "teacher_forward",
    "student_update",
    "labeled_forward",
    "labeled_grad_v",
    "tangent_pass",
    "forward_ad_jvp",
    "backward",
    "student_optimizer",
    "teacher_optimizer",
}
recording = False


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _mib(n: int) -> float:
    return n / 2**20


def phase(name: str, dev: torch.device):
    """A wrapper factory: the wrapped call runs in a profiler range named ``name`` and, while
    ``recording``, its device time and memory are logged (a synchronization on each side: the
    per-phase numbers are for shares, the step's own time is measured without them)."""

    def wrap(fn):
        def wrapped(*args, **kwargs):
            if not recording:
                with record_function(name):
                    return fn(*args, **kwargs)
            if dev.type != "cuda":  # wall time only: the CPU's allocator counts nothing
                start_s = time.perf_counter()
                with record_function(name):
                    out = fn(*args, **kwargs)
                ms = 1000 * (time.perf_counter() - start_s)
                memory = {"mib_before": None, "mib_after": None, "mib_peak_inside": None}
                PHASES.append({"phase": name, "ms": ms, **memory})
                return out
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with record_function(name):
                out = fn(*args, **kwargs)
            end.record()
            torch.cuda.synchronize(dev)
            PHASES.append(
                {
                    "phase": name,
                    "ms": start.elapsed_time(end),
                    "mib_before": _mib(before),
                    "mib_after": _mib(torch.cuda.memory_allocated(dev)),
                    "mib_peak_inside": _mib(torch.cuda.max_memory_allocated(dev)),
                }
            )
            return out

        return wrapped

    return wrap


def instrument(dev: torch.device) -> None:
    """Wraps the step's phases (methods of MetaPseudoLabels and JvpPaths, Tensor.backward)."""
    M = MetaPseudoLabels
    M._teacher_forward = phase("teacher_forward", dev)(M._teacher_forward)
    M._student_update = phase("student_update", dev)(M._student_update)
    M._labeled_loss = phase("labeled_forward", dev)(M._labeled_loss)
    M._grad_of_trainable = staticmethod(phase("labeled_grad_v", dev)(M._grad_of_trainable))
    JvpPaths.from_tape = phase("tangent_pass", dev)(JvpPaths.from_tape)
    JvpPaths.forward_ad = phase("forward_ad_jvp", dev)(JvpPaths.forward_ad)
    torch.Tensor.backward = phase("backward", dev)(torch.Tensor.backward)


def wrap_optimizers(run: Run, dev: torch.device) -> None:
    mpl = run.method.mpl
    for name in ("student_optimizer", "teacher_optimizer"):
        optimizer = getattr(mpl, name)
        wrapped = phase(name, dev)(optimizer.step)
        # the learning-rate schedulers' mark on the step they wrapped: without it every
        # scheduler step warns that optimizer.step() "has been overridden"
        wrapped._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        optimizer.step = wrapped


def build(args, estimator: str, dev: torch.device):
    base = {
        "dataset": "cifar10-4k",
        "model": args.model,
        "method": "uda_mpl",
        "mpl_estimator": estimator,
        "device": dev.type,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "steps": 10_000,
        "warmup_steps": 10,
    }
    cfg = apply_overrides(TrainConfig(), base).validate()
    torch.manual_seed(0)
    split = synthetic_cifar_split(max(28 * args.batch_size, 1024), np.random.RandomState(0))
    run = Run(cfg, split, dev)
    source = BatchSource(split, cfg, run.method.views, dev)
    return run, source


def timed(fn, dev: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append(1000 * (time.perf_counter() - t0))
    return out


def busy_fraction(prof, wall_ms: float, steps: int) -> dict:
    """Device time of all kernels (and copies) against the steps' wall time. The profiler lists
    the ranges of record_function (the phases) as device events too: they are left out (counting
    them gave a "busy" share above 1 in session 35's first call)."""
    kernel_us = 0.0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.name in PHASE_NAMES:
            continue
        if getattr(e, "is_user_annotation", False) or e.name.startswith("Optimizer."):
            continue
        kernel_us += e.device_time if hasattr(e, "device_time") else e.cuda_time
    return {
        "device_ms_per_step": kernel_us / 1000 / steps,
        "wall_ms_per_step": wall_ms,
        "busy": kernel_us / 1000 / steps / wall_ms,
    }


def profile_estimator(args, estimator: str, dev: torch.device, out: Path, label: str = "") -> dict:
    global recording
    label = label or estimator
    run, source = build(args, estimator, dev)
    wrap_optimizers(run, dev)
    batch = source.batch(0)
    step = lambda: run.method.step(batch)  # noqa: E731
    for _ in range(args.warmup):
        step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ms = timed(step, dev, args.repeats)
    peak = _mib(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None
    # phases: one step, synchronized around each phase
    PHASES.clear()
    recording = True
    step()
    recording = False
    phases = list(PHASES)
    # the profiler over a few steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    n_prof = 3
    with profile(activities=activities) as prof:
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n_prof):
            step()
        _sync(dev)
        wall = 1000 * (time.perf_counter() - t0) / n_prof
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=60)
    by_host = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
    write_text_atomically(out / f"profile_{label}.txt", f"{table}\n\nby host time:\n{by_host}")
    busy = busy_fraction(prof, wall, n_prof) if dev.type == "cuda" else None
    print(f"\n== {label}: median {statistics.median(ms):.1f} ms, peak {peak} MiB, busy {busy}")
    for p in phases:
        memory = ""
        if p["mib_before"] is not None:
            memory = (
                f"  alloc {p['mib_before']:8.0f} -> {p['mib_after']:8.0f} MiB, "
                f"peak inside {p['mib_peak_inside']:8.0f}"
            )
        print(f"  {p['phase']:<20} {p['ms']:8.2f} ms{memory}")
    print(table[:1200])
    result = {
        "estimator": estimator,
        "label": label,
        "ms": statistics.median(ms),
        "ms_all": ms,
        "peak_mib": peak,
        "phases": phases,
        "busy": busy,
        "jvp": getattr(run.method.mpl._jvp_paths, "last_path", None),
    }
    # the data part of a training step alone
    i = iter(range(1, 10**9))
    data_ms = timed(lambda: source.batch(next(i)), dev, max(5, args.repeats // 2))
    result["data_ms"] = statistics.median(data_ms)
    # the engine's whole training step (data, step, schedules), no sync inside, as train runs it:
    # with the batch made in the loop, and made a step ahead on a thread (batches_for, on a GPU)
    n_adv = max(5, args.repeats)
    for name, batches in (
        ("advance_ms", source),
        ("advance_ahead_ms", batches_for(source, dev, 10**9)),
    ):
        for _ in range(2):
            run.advance(batches)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n_adv):
            run.advance(batches)
        _sync(dev)
        result[name] = 1000 * (time.perf_counter() - t0) / n_adv
        print(f"  engine step (Run.advance), {name}: {result[name]:.1f} ms")
        if batches is not source:
            batches.close()
    print(f"  data (BatchSource.batch) {result['data_ms']:.1f} ms")
    if estimator == "exact" and args.numerics:
        from metapl.bench import _numerics

        result["numerics"] = _numerics(run, batch, dev, args.precision, print)
    return result  # (the models are freed with this frame; main empties the cache)


def memory_origins(args, estimator: str, dev: torch.device) -> list[dict]:
    """The device memory held *between* steps (after a few), block by block, with the code that
    allocated each block (torch's memory history): what an estimator keeps beyond the models,
    their optimizers' state and the batch."""
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=200_000)
    try:
        run, source = build(args, estimator, dev)
        batch = source.batch(0)
        for _ in range(3):
            run.method.step(batch)
        _sync(dev)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    held: dict[tuple, dict] = {}
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated" or block["size"] < 2**20:
                continue
            frames = [
                f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}"
                for f in block.get("frames", [])
                if f["filename"].endswith(".py")
            ][:4]
            key = tuple(frames)
            entry = held.setdefault(key, {"frames": frames, "blocks": 0, "mib": 0.0})
            entry["blocks"] += 1
            entry["mib"] += _mib(block["size"])
    rows = sorted(held.values(), key=lambda e: -e["mib"])
    print(f"\n== {estimator}: device memory held between steps, blocks of 1 MiB or more")
    for e in rows[:15]:
        print(f"  {e['mib']:8.1f} MiB in {e['blocks']:3d} blocks: {' <- '.join(e['frames'])}")
    return rows[:30]


def no_saved_bn_stats(out) -> None:
    """The ``recompute_bn_stats`` variant's stand-in for ``tangent_ops.saved_bn_stats`` (a named
    function: the record graph's code cannot call a lambda)."""
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--device",
        default="cuda",
        choices=("cpu", "cuda"),
        help="where the step runs (default: cuda)",
    )
    p.add_argument(
        "--precision",
        default="bf16",
        choices=("fp32", "bf16"),
        help="the config key precision: bf16 autocast or fp32 (default: bf16)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="labeled batch; the unlabeled one is 7x (default: 128)",
    )
    p.add_argument(
        "--model",
        default="wrn28_2",
        help="registry model of teacher and student, e.g. small_cnn (default: wrn28_2)",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=20,
        help="N: timed steps per estimator; data part max(5, N/2), engine step max(5, N) "
        "(default: 20)",
    )
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed steps before the timed ones (default: 5)"
    )
    p.add_argument(
        "--estimators",
        default="first_order,exact",
        help="comma-separated mpl_estimator values (default: first_order,exact)",
    )
    p.add_argument(
        "--variants",
        default="none",
        help="experiments after the estimators, comma-separated: compile_tangent, "
        "recompute_bn_stats (or none)",
    )
    p.add_argument("--numerics", action="store_true", help="exact runs: cosine with float64")
    p.add_argument(
        "--memory-origins", action="store_true", help="CUDA: what holds memory between steps"
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for profile_step.json and the profiler tables (created if missing)",
    )
    args = p.parse_args()
    dev = device_or_exit(args.device, __file__)
    args.out.mkdir(parents=True, exist_ok=True)
    instrument(dev)
    results = []
    for estimator in args.estimators.split(","):
        results.append(profile_estimator(args, estimator, dev, args.out))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "recompute_bn_stats" in args.variants.split(","):
        from metapl.mpl import tangent_ops

        saved = tangent_ops.saved_bn_stats
        # (read when the record graph is built: this run's tape is built after the patch)
        tangent_ops.saved_bn_stats = no_saved_bn_stats
        try:
            results.append(profile_estimator(args, "exact", dev, args.out, "exact_recompute_bn"))
        finally:
            tangent_ops.saved_bn_stats = saved
    if "compile_tangent" in args.variants.split(","):
        from metapl.mpl.tangent import TangentTape

        TangentTape.tangent = torch.compile(TangentTape.tangent)
        try:
            results.append(profile_estimator(args, "exact", dev, args.out, "exact_compile_tangent"))
        except Exception as e:  # noqa: BLE001 (an experiment: its failure is a finding)
            print(f"compile_tangent failed: {type(e).__name__}: {str(e)[:2000]}")
    held = {}
    if dev.type == "cuda" and args.memory_origins:
        held = {e: memory_origins(args, e, dev) for e in args.estimators.split(",")}
    setup = vars(args) | {"out": str(args.out)}
    save(args.out / "profile_step.json", {"setup": setup, "results": results, "held": held})


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
