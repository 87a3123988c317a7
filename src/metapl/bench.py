"""`metapl bench`: milliseconds and peak memory of each kind of step, on WRN-28-2 by default.

Times the median of ``repeats`` runs after ``warmup`` runs (CUDA: synchronized around each run, one
kind after another, and records peak memory with ``max_memory_allocated`` per kind; CPU: the kinds
in interleaved rounds, so that load changes on a shared machine hit all alike, then each kind's
peak of live tensor memory, built afresh under :class:`metapl.live_memory.LiveTensorMemory`). The
setup follows docs/design.md §3: labeled batch B, unlabeled 7B, the teacher seeing two unlabeled
views (UDA). JSON: ``{"machine": ..., "results": [{"name", "ms", "peak_mib", ...}], "numerics":
{"cosine", ...}}``; "numerics" compares the exact teacher gradient under the precision policy on the
device with a float64 CPU reference on the same weights and batch.
"""

from __future__ import annotations

import gc
import hashlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm import tqdm

from metapl.errors import ConfigError, WriteError
from metapl.live_memory import LiveTensorMemory
from metapl.progress import progress_bar
from metapl.report import check_not_a_folder_name, check_not_a_result, write_json_atomic

# Config keys `metapl bench --set` refuses, and why: the bench sets them itself (with its own
# options, or for each kind of step it times), or what a step costs does not depend on them (the
# data and the seed, the run's length and schedule, its evaluations, checkpoints and EMA copy,
# which the bench's steps never update): a --set of one would change nothing it measures, and
# say nothing.
BENCH_OPTION_KEYS = {
    "model": "--model",
    "device": "--device",
    "batch_size": "--batch-size",
    "precision": "--precision",
    "memory_format": "--memory-format",
}
BENCH_KIND_KEYS = ("method", "mpl_estimator", "mpl_jvp", "mpl_labeled_cuda_graph")
BENCH_UNREAD_KEYS = (
    "dataset", "data_dir", "seed", "tuning", "labels_per_class", "tune_per_class",
    "unlabeled_ratio", "unlabeled_dir", "unlabeled_per_class", "image_size", "large_teacher",
    "steps", "warmup_steps", "finetune_steps", "finetune_lr", "eval_every", "eval_batch_size",
    "log_every", "checkpoint_every", "sync_batchnorm", "preset", "ema_decay",
)  # fmt: skip


def check_bench_overrides(overrides: dict[str, str]) -> None:
    """Refuse ``--set`` keys the bench sets itself or never reads (one line each, named)."""
    for key in overrides:
        if key in BENCH_OPTION_KEYS:
            raise ConfigError(
                f"--set {key}=...: metapl bench sets {key} with {BENCH_OPTION_KEYS[key]}; use that"
            )
        if key in BENCH_KIND_KEYS:
            raise ConfigError(
                f"--set {key}=...: metapl bench sets {key} for each kind of step it times "
                "(it times them all): do not set it"
            )
        if key in BENCH_UNREAD_KEYS:
            raise ConfigError(
                f"--set {key}=...: what a step of the bench costs does not depend on {key} (the "
                "data, seed, run length, evaluations, checkpoints or EMA): do not set it"
            )


# CPU instructions for bf16 arithmetic: bf16's speed on a CPU depends on them, so a CPU bf16 result
# says little about another CPU unless the JSON names which of these the measuring one had.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> dict:
    """The CPU's model name and which of BF16_CPU_FLAGS it has (Linux's /proc/cpuinfo; elsewhere
    the model from ``platform`` and no flags)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break  # every core lists the same flags; the model name comes first
    except OSError:
        pass
    return {"cpu": model, "cpu_bf16_flags": [f for f in BF16_CPU_FLAGS if f in flags]}


def source_digest(root: Path | None = None) -> str:
    """SHA-256 (first 16 hex digits) of the Python files under ``root`` (the installed metapl
    package by default), path and bytes, in path order: names the code a result was measured with
    where a commit cannot (a copy of a working tree with uncommitted changes, as the GPU machine
    gets, reports its last commit)."""
    root = root or Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _machine(device: torch.device) -> dict:
    info = {
        "metapl_source_sha256": source_digest(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **cpu_description(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        # an earlier kind's run is freed only by the garbage collector (the method and its step
        # refer to each other): without this its models could count in this kind's peak
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    peak = reserved = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        # held from the driver, freed blocks included: a CUDA graph's memory between its replays
        # (its private pool) counts here, not in the allocated peak
        reserved = torch.cuda.max_memory_reserved(device) / 2**20
    return {
        "ms": statistics.median(times),
        "ms_all": times,
        "peak_mib": peak,
        "peak_reserved_mib": reserved,
    }


def _time_interleaved(
    fns: list[Callable[[], object]], warmup: int, repeats: int, bar: tqdm
) -> list[dict]:
    """CPU: every function once per round, round after round, so that a change in the machine's
    load (other processes, frequency) hits all of them alike and their ratios stay fair; timed
    one after another, separate runs of the same command drift by up to 10% on a shared machine.
    Peak memory comes after, from :func:`_cpu_peak_mib` (its dispatch mode would slow these)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
        bar.update()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(1000 * (time.perf_counter() - start))
        bar.update()
    return [
        {"ms": statistics.median(t), "ms_all": t, "peak_mib": None, "peak_reserved_mib": None}
        for t in times
    ]


def _cpu_peak_mib(make_step: Callable[[], Callable[[], object]], warmup: int) -> float:
    """CPU: the peak of live tensor memory in one step of a kind, counting its models, optimizer
    state and data (built inside the count, as they are on the GPU's device), after ``warmup``
    steps (the first steps' checks and traces, and optimizer state made at the first step)."""
    gc.collect()  # an earlier kind's run: freed before this one's storages are counted
    with LiveTensorMemory("cpu") as live:
        step = make_step()
        for _ in range(warmup):
            step()
        live.reset_peak()
        step()
        return live.peak_mib


def step_settings(
    method: str,
    model: str,
    device: str,
    batch_size: int,
    precision: str,
    memory_format: str,
) -> dict[str, object]:
    """The config keys of one kind of step as `metapl bench` builds it (on
    :func:`synthetic_cifar_split`'s CIFAR-shaped data; a long run with a short warm-up, whose
    schedule the bench never steps: the learning rate stays at its first, non-zero value), for
    ``apply_overrides(TrainConfig(), ...)``."""
    return {
        "dataset": "cifar10-4k",
        "model": model,
        "method": method,
        "device": device,
        "batch_size": batch_size,
        "precision": precision,
        "memory_format": memory_format,
        "steps": 10_000,
        "warmup_steps": 10,
    }


def synthetic_cifar_split(n: int, rng: np.random.RandomState):
    """CIFAR-shaped random data (uint8 NHWC images, as the readers return them): ``n`` labeled
    images that are also the unlabeled set, and 64 test images. For timing, not for accuracy."""
    from metapl.data.splits import SSLSplit

    images = rng.randint(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.randint(0, 10, n).astype(np.int64)
    return SSLSplit(
        images, labels, images, images[:0], labels[:0], images[:64], labels[:64], 10, "synthetic"
    )


def _numerics(run, batch, device: torch.device, precision: str, progress) -> dict:
    from metapl.mpl.numerics import agreement_with_float64

    n_l = min(len(batch.y_labeled), 64)
    sliced = (batch.x_labeled[:n_l], batch.y_labeled[:n_l], batch.x_unlabeled_strong[: 7 * n_l])
    s_opt = run.method.optimizers["student"]
    agreement: dict[str, Any] = agreement_with_float64(  # plus the batch and precision below
        run.method.models["teacher"],
        run.method.models["student"],
        lambda params: type(s_opt)(params, **s_opt.defaults),
        sliced,
        device,
        autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
        temperature=run.cfg.mpl_temperature,
    )
    agreement.update(batch_labeled=n_l, batch_unlabeled=7 * n_l, precision=precision)
    progress(
        f"{'exact gradient vs float64 (cosine)':<34} {agreement['cosine']:9.6f}   "
        f"relative error {agreement['relative_error']:.2e}"
    )
    return agreement


def _ratios(results: list[dict]) -> dict[str, float]:
    """The time ratios issue 5's goals are stated in (exact vs first-order and vs double backward;
    peak memory of exact vs first-order where it is measured)."""
    row = {r["name"]: r for r in results}
    ms = {name: r["ms"] for name, r in row.items()}
    out = {
        "exact_over_first_order": ms["exact_mpl_step"] / ms["first_order_mpl_step"],
        "exact_over_double_backward": ms["exact_mpl_step"] / ms["double_backward_mpl_step"],
        "forward_ad_over_tape": ms["exact_mpl_step_forward_ad"] / ms["exact_mpl_step"],
    }
    if "exact_mpl_step_labeled_graph" in ms:  # (a GPU's)
        graphed = ms["exact_mpl_step_labeled_graph"]
        out["labeled_graph_over_first_order"] = graphed / ms["first_order_mpl_step"]
    peaks = row["exact_mpl_step"]["peak_mib"], row["first_order_mpl_step"]["peak_mib"]
    if None not in peaks:
        out["exact_over_first_order_peak_memory"] = peaks[0] / peaks[1]
    return out


def _reads(cfg: Any, key: str) -> bool:
    """Whether a kind's configuration reads ``--set`` key ``key``."""
    return cfg.ignored_key(key) is None


def _check_json_path(text: str | os.PathLike) -> None:
    """``--json``: a file name whose folder exists or can be created (missing folders are made)."""
    if not str(text).strip():  # Path("") is the current folder
        raise ConfigError("--json is empty; give a file name")
    path = Path(text)
    if path.is_dir():
        raise ConfigError(f"--json {path} is a folder; give a file name")
    check_not_a_folder_name(text, "--json")
    check_not_a_result(path, "--json")  # a run's results.json, say, replaced by these timings
    for existing in path.parents:
        if existing.exists():
            if not existing.is_dir():
                raise ConfigError(f"--json {path}: {existing} is a file, not a folder")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise ConfigError(f"--json {path}: {existing} is not writable")
            try:  # root passes os.access where nothing can be created (/proc, a read-only mount)
                tempfile.TemporaryDirectory(dir=existing).cleanup()
            except OSError as e:
                raise ConfigError(
                    f"--json {path}: cannot write in {existing} ({e.strerror}); choose another --json"
                ) from None
            return


def run_bench(
    device: str = "cpu",
    batch_size: int | None = None,
    precision: str = "fp32",
    memory_format: str = "auto",
    model: str = "wrn28_2",
    repeats: int = 20,
    warmup: int = 3,
    json_path: Path | None = None,
    progress: Callable[[str], None] = print,
    show_progress: bool = True,
    overrides: dict[str, str] | None = None,
) -> dict:
    """Times every kind of step (module docstring); ``overrides``: config keys (``--set``) for
    every kind of step that reads them, e.g. ``{"compile": "true"}``."""
    from metapl.train.batches_ahead import BatchesAhead, batches_for
    from metapl.train.config import TrainConfig, apply_overrides
    from metapl.train.data import BatchSource
    from metapl.train.engine import resolve_device
    from metapl.train.model_checks import check_compile_works, check_models_fit
    from metapl.train.run import Run

    user = dict(overrides or {})
    check_bench_overrides(user)
    if json_path is not None:  # checked now, not after minutes of timing
        _check_json_path(json_path)
    dev = resolve_device(device)
    on_gpu = dev.type == "cuda"
    batch_size = batch_size or (128 if on_gpu else 4)
    torch.manual_seed(0)
    rng = np.random.RandomState(0)
    n_l, n_u = batch_size, 7 * batch_size

    applied: set[str] = set()  # the --set keys some kind of step reads
    why_not: dict[str, str] = {}  # why a kind does not read one (the first kind that does not)

    def config(method: str, **extra) -> TrainConfig:
        """A kind's configuration, with the --set keys it reads (a key for the teacher alone,
        or for the first-order step's baseline, leaves the others as they are)."""
        settings = step_settings(method, model, dev.type, batch_size, precision, memory_format)
        base = {**settings, **extra}  # (the supervised step's batch_size among them)
        full = apply_overrides(TrainConfig(), {**base, **user}).validate()
        reads = {k: v for k, v in user.items() if full.ignored_key(k) is None}
        applied.update(reads)
        for key in user.keys() - reads.keys():
            why_not.setdefault(key, cast(str, full.ignored_key(key)))
        return apply_overrides(TrainConfig(), {**base, **reads}).validate()

    # Every kind's configuration, before anything is built: a --set key that none reads, or a
    # bad value, is the one line of a mistake in the input, not an error after minutes.
    kind_configs = {
        "student_supervised_step": config("supervised", batch_size=n_u),
        "teacher_uda_step": config("uda"),
        "first_order_mpl_step": config("uda_mpl", mpl_estimator="first_order"),
        "exact_mpl_step": config("uda_mpl"),
        "exact_mpl_step_forward_ad": config("uda_mpl", mpl_jvp="forward_ad"),
        "double_backward_mpl_step": config("uda_mpl", mpl_estimator="double_backward"),
    }
    if on_gpu:  # (CUDA graphs)
        kind_configs["exact_mpl_step_labeled_graph"] = config(
            "uda_mpl", mpl_labeled_cuda_graph=True
        )
    unread = sorted(user.keys() - applied)
    if unread:
        key = unread[0]
        raise ConfigError(f"--set {key}=...: no kind of step reads it ({why_not[key]})")
    compiled = kind_configs["exact_mpl_step"].compile
    if compiled:  # a missing C++ compiler: one line now, not a traceback at the first step
        check_compile_works(dev)
    # Compiled code allocates its buffers outside the dispatcher where LiveTensorMemory counts
    # them: a CPU count would leave them out, so there is none.
    count_peaks = not on_gpu and not compiled

    split = synthetic_cifar_split(max(4 * n_u, 1024), rng)

    def method_and_batch(cfg: TrainConfig):
        run = Run(cfg, split, dev)
        check_models_fit(run, option="--model NAME (an image model: 3 channels, 32x32)")
        if cfg.compile:  # the models whose step allows it, as `metapl train` compiles them
            run.compile_models()
        source = BatchSource(split, cfg, run.method.views, dev)
        return run, source, source.batch(0)

    # The first kind is built before the progress bar: a --model that is unknown or cannot take the
    # images is then the one line of a mistake in the input, not a line after a bar.
    supervised = kind_configs["student_supervised_step"]
    first_kind = method_and_batch(supervised)
    # GPU: each kind is timed as soon as it is built, alone in memory but for the exact run (peak
    # memory is per kind); CPU: all are built first and timed in interleaved rounds, then each is
    # built again, alone, for its peak memory (``makers``).
    benches: list[tuple[str, Callable[[], object] | dict, dict]] = []
    makers: dict[str, Callable[[], Callable[[], object]]] = {}
    kinds = 8 if on_gpu else 7  # (the labeled pass in a CUDA graph: on a GPU only)
    bar = progress_bar(
        # CPU: a kind's peak memory (a few steps) counts as one more round
        total=kinds if on_gpu else warmup + repeats + (kinds if count_peaks else 0),
        unit="kind" if on_gpu else "round",
        desc="metapl bench",
        disable=not show_progress,
        dynamic_ncols=True,
    )

    def add(name: str, fn: Callable[[], object], meta: dict) -> None:
        if on_gpu:
            benches.append((name, _time(fn, dev, warmup, repeats), meta))
            bar.update()
        else:
            benches.append((name, fn, meta))

    def stepper(built: tuple) -> Callable[[], object]:
        run, _, batch = built
        return lambda: run.method.step(batch)

    def bench(name: str, cfg: TrainConfig, built: tuple | None = None, **meta) -> tuple:
        built = built or method_and_batch(cfg)
        add(name, stepper(built), meta)
        if count_peaks:
            makers[name] = lambda: stepper(method_and_batch(cfg))
        return built

    # 1. the student's supervised update alone, on the unlabeled-sized batch (built above)
    bench("student_supervised_step", supervised, first_kind, images=n_u)
    # 2. the teacher's UDA step: labeled + two unlabeled views
    bench("teacher_uda_step", kind_configs["teacher_uda_step"], images=n_l + 2 * n_u)
    # 3-4. UDA+MPL, first-order and exact
    bench("first_order_mpl_step", kind_configs["first_order_mpl_step"])
    exact_run, source, exact_batch = bench("exact_mpl_step", kind_configs["exact_mpl_step"])
    if on_gpu:  # the same step with its labeled pass replayed from a CUDA graph (host launches)
        graphed, _, _ = bench(
            "exact_mpl_step_labeled_graph",
            kind_configs["exact_mpl_step_labeled_graph"],
            labeled_cuda_graph=True,
        )
        graphed_path = graphed.method.mpl.last_labeled_path
        del graphed  # (its graph's memory, before the next kind is built)
    # the same step with J by forward-mode AD (a second student forward): what the tape saves
    bench("exact_mpl_step_forward_ad", kind_configs["exact_mpl_step_forward_ad"], jvp="forward_ad")
    # 5. the same exact UDA+MPL step with the teacher's MPL gradient by double backward
    bench("double_backward_mpl_step", kind_configs["double_backward_mpl_step"])

    def training_steps(run: Run, source: BatchSource) -> Callable[[], object]:
        batches = batches_for(source, dev, last_step=10**9)
        if batches is not source:  # a worker thread (GPU), stopped at the end
            closing.append(batches)
        steps = iter(range(1, 10**9))
        return lambda: run.method.step(batches.batch(next(steps)))

    def fresh_training_steps() -> Callable[[], object]:
        run, source, _ = method_and_batch(kind_configs["exact_mpl_step"])
        return training_steps(run, source)

    closing: list[BatchesAhead] = []
    # 6. a whole training step as `metapl train` takes it: per-image RandAugment + data loading +
    # the exact UDA+MPL step; on a GPU the next step's batch is made on a background thread
    add("train_step_exact_uda_mpl", training_steps(exact_run, source), {})
    if count_peaks:
        makers["train_step_exact_uda_mpl"] = fresh_training_steps

    assert len(benches) == kinds, "update `kinds` (the progress bar's length)"
    # add() stored each kind's timing on the GPU, the function to time on the CPU
    if on_gpu:
        timings = cast(list[dict], [timing for _, timing, _ in benches])
    else:
        bar.set_postfix_str(f"{len(benches)} kinds of step per round")
        fns = cast(list[Callable[[], object]], [fn for _, fn, _ in benches])
        timings = _time_interleaved(fns, warmup, repeats, bar)
        if count_peaks:
            bar.set_postfix_str("peak memory, one kind at a time")
            for (name, _, _), timing in zip(benches, timings):
                timing["peak_mib"] = _cpu_peak_mib(makers[name], warmup=2)
                bar.update()
    for batches in closing:
        batches.close()
    bar.close()
    results = []
    for (name, _, meta), timing in zip(benches, timings):
        results.append({"name": name, **timing, **meta})
        peak = "-" if timing["peak_mib"] is None else f"{timing['peak_mib']:.0f} MiB"
        progress(f"{name:<34} {timing['ms']:9.2f} ms   peak {peak}")
    row = next(r for r in results if r["name"] == "exact_mpl_step")
    row["jvp"] = exact_run.method.mpl.last_jvp_path  # "tape" unless the student cannot
    if on_gpu:  # "graph" unless the capture failed (a warning said why)
        graph_row = next(r for r in results if r["name"] == "exact_mpl_step_labeled_graph")
        graph_row["labeled_path"] = graphed_path
    if not on_gpu and not count_peaks:
        progress("peak memory not counted: compiled code allocates where the count does not see")
    ratios = _ratios(results)
    progress("  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    payload = {
        "machine": _machine(dev),
        "setup": {
            "model": model,
            "batch_labeled": n_l,
            "batch_unlabeled": n_u,
            "precision": precision,
            "memory_format": memory_format,
            "channels_last": supervised.channels_last(dev),
            # --set keys, as given, and which kinds of step read them
            "overrides": user,
            "overrides_read_by": {
                key: [name for name, c in kind_configs.items() if _reads(c, key)] for key in user
            },
            "repeats": repeats,
            "warmup": warmup,
            "timing": "one kind after another" if on_gpu else "interleaved rounds",
            # what "peak_mib" counts: the caching allocator's peak, or live tensor storages only
            # (no operator's scratch space: a lower bound), each kind built alone
            "peak_memory": "torch.cuda.max_memory_allocated"
            if on_gpu
            else "live tensor storages (metapl.live_memory), one step after 2"
            if count_peaks
            else "not counted: compiled code allocates where metapl.live_memory does not see",
        },
        "results": results,
        "ratios": ratios,
        "numerics": None,
    }
    # The timings are saved before the numerics check, whose float64 reference runs on the CPU: a
    # run stopped at its time limit there (gpu_session.sh) keeps them.
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(json_path), payload)
    # Numerics: the exact teacher gradient under this precision policy vs float64 on the CPU, on
    # the same weights and the same batch (at most 64 + 448 images: the reference runs on the CPU).
    payload["numerics"] = _numerics(exact_run, exact_batch, dev, precision, progress)
    if json_path is not None:
        try:
            write_json_atomic(Path(json_path), payload)
        except WriteError as err:  # "the file there before" is this run's, not an earlier one
            raise err.advised(" (this run's timings, saved before the numerics check)") from err
    return payload
