"""The large teacher's class distributions for every image, computed once and kept on disk.

ReducedMPL (Figure 5) never holds the large teacher next to the student: its softmax outputs for all
training images are written here to a float32 ``[N, C]`` ``.npy`` file that training memory-maps.
For ImageNet that is hours of inference, so the file is built to survive interruption and to refuse
being read against the wrong model or images:

* **Sidecar.** ``out_path.with_suffix(".json")`` records the model and data fingerprints, ``N``,
  ``C``, the temperature, ``completed_rows`` and :data:`FORMAT_VERSION`. It is always replaced
  atomically (temporary file, fsync, ``os.replace``).
* **Resume rule.** Rows are written chunk by chunk; after each chunk the memmap is flushed (msync)
  *before* ``completed_rows`` is advanced, so the sidecar never claims rows that are not on disk.
  A rerun with matching fingerprints and temperature continues at ``completed_rows``; a finished
  file is returned without running the model. On a fresh start the sidecar (claiming 0 rows) is
  written *before* the ``.npy`` is created, so an ``.npy`` without a sidecar is never ours and is
  never overwritten.
* **Exact resumes.** Batches always cover the global grid ``[i * batch_size, (i + 1) * batch_size)``
  and chunks are rounded up to whole batches, so a resumed run feeds the model the very batches an
  uninterrupted run would (for the same ``batch_size``), and the file is bit-identical.
* **Staleness.** :func:`load_distributions` compares the recorded fingerprints with the given
  model/images and names which one changed.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metapl.atomic import fsync_file, write_error, write_json_atomically
from metapl.data.arrays import data_error, describe, to_tensor_nchw
from metapl.errors import ConfigError, DataError, MetaplWarning
from metapl.progress import progress_bar
from metapl.rank_failure import RankFailure, meet, stop_on

FORMAT_VERSION = 1
"""Version of the ``.npy`` + sidecar layout; a file of another version is refused."""

FULL_HASH_LIMIT = 512 * 2**20
"""numpy image arrays up to this many bytes are hashed in full by :func:`fingerprint_images`."""

NUM_SAMPLES = 256
"""Rows hashed by :func:`fingerprint_images` when the images are too large (or too slow) to hash."""

_SIDECAR_KEYS = (
    "format_version",
    "model_fingerprint",
    "data_fingerprint",
    "num_images",
    "num_classes",
    "temperature",
    "completed_rows",
)
_HASH_CHUNK_BYTES = 64 * 2**20  # bounds the copy made while hashing a (memory-mapped) array


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar of a distributions file: ``teacher.npy`` -> ``teacher.json``."""
    return Path(path).with_suffix(".json")


# --------------------------------------------------------------------------------------------------
# Fingerprints


def fingerprint_model(model: nn.Module) -> str:
    """sha256 over the model's ``state_dict``: sorted names, shapes, dtypes and tensor bytes.

    Buffers (e.g. BatchNorm running statistics) are included since eval-mode outputs depend on them.
    Architecture choices that own no tensors (an activation function, say) are not seen; neither
    is a wrapper that renames keys (``module.``/``_orig_mod.`` prefixes) treated as the same model.
    """
    digest = hashlib.sha256(b"metapl-model-v1\n")
    for name, value in sorted(model.state_dict().items()):
        if not isinstance(value, torch.Tensor):  # a module's extra_state: hash what it says
            digest.update(f"{name}|{value!r}\n".encode())
            continue
        tensor = value.detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            # A uint8 view gives the raw bytes for every dtype, bfloat16 included (numpy lacks it).
            # numpy's stub makes ndarray a Buffer only on Python >= 3.12
            digest.update(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]
    return digest.hexdigest()


def _sample_rows(n: int, num_samples: int) -> np.ndarray:
    """Evenly spaced row indices, always including the first and the last."""
    if n <= num_samples:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, num_samples).round().astype(np.int64))


def _relative_names(paths: list) -> str:
    # The last two components (class folder / file name): listing order and membership matter,
    # but moving the dataset to another directory must not make the file stale.
    return "\n".join("/".join(str(p).replace("\\", "/").rsplit("/", 2)[-2:]) for p in paths)


def fingerprint_images(
    images: Any, *, full_hash_limit: int = FULL_HASH_LIMIT, num_samples: int = NUM_SAMPLES
) -> str:
    """sha256 identifying an image collection (a uint8 NHWC numpy array or a lazy reader).

    Trade-off: a numpy array of at most ``full_hash_limit`` bytes (CIFAR-10: 150 MB) is hashed in
    full, so any changed pixel is seen. Anything larger, or a lazy reader such as
    :class:`metapl.data.imagenet.LazyImages` (hashing ImageNet would decode 1.28M JPEGs), is
    identified by its shape, dtype and ``num_samples`` evenly spaced rows (first and last included):
    a different dataset, a reordering or a different resolution/crop is caught; an edit confined to
    rows between the samples is not. A reader with a ``paths`` list also hashes every file's
    ``class/name`` (cheap, and it catches added, removed or renamed files).
    """
    n = len(images)
    digest = hashlib.sha256(b"metapl-images-v1\n")
    if isinstance(images, np.ndarray) and images.nbytes <= full_hash_limit:
        digest.update(f"full|{images.shape}|{images.dtype}\n".encode())
        rows = max(1, _HASH_CHUNK_BYTES // max(1, images[:1].nbytes))
        for start in range(0, n, rows):
            block = np.ascontiguousarray(images[start : start + rows])
            # numpy's stub makes ndarray a Buffer only on Python >= 3.12
            digest.update(block)  # type: ignore[arg-type]
        return digest.hexdigest()

    sample = np.ascontiguousarray(images[_sample_rows(n, num_samples)])
    shape = tuple(getattr(images, "shape", (n, *sample.shape[1:])))
    digest.update(f"sampled|{num_samples}|{shape}|{sample.dtype}\n".encode())
    paths = getattr(images, "paths", None)
    if isinstance(paths, list):
        digest.update(_relative_names(paths).encode())
    # numpy's stub makes ndarray a Buffer only on Python >= 3.12
    digest.update(sample)  # type: ignore[arg-type]
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Sidecar


def _read_sidecar(path: Path) -> dict:
    """The validated sidecar of distributions file ``path``, or a one-line DataError."""
    side = sidecar_path(path)
    redo = f"delete {path} and {side.name} and run precompute_distributions again"
    if not side.is_file():
        raise data_error(
            f"{path} has no sidecar {side.name}: it was not written by precompute_distributions "
            f"or the sidecar was deleted; {redo}"
        )
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise data_error(f"{side} is unreadable ({describe(exc)}); {redo}") from None
    if not isinstance(meta, dict) or any(key not in meta for key in _SIDECAR_KEYS):
        raise data_error(f"{side} lacks the keys {', '.join(_SIDECAR_KEYS)}; {redo}")
    if meta["format_version"] != FORMAT_VERSION:
        raise data_error(
            f"{side} has format version {meta['format_version']!r}, this metapl reads "
            f"{FORMAT_VERSION}; {redo}"
        )
    counts = [meta[key] for key in ("num_images", "num_classes", "completed_rows")]
    if any(type(v) is not int for v in counts) or not (
        meta["num_images"] >= 1
        and meta["num_classes"] >= 1
        and 0 <= meta["completed_rows"] <= meta["num_images"]
    ):
        raise data_error(f"{side} has inconsistent row counts {counts}; {redo}")
    return meta


def _differences(recorded: dict, expected: dict) -> list[str]:
    """What of model / data / temperature differs between a sidecar and this call."""
    changed = []
    if recorded["model_fingerprint"] != expected["model_fingerprint"]:
        changed.append("model")
    if (
        recorded["data_fingerprint"] != expected["data_fingerprint"]
        or recorded["num_images"] != expected["num_images"]
    ):
        changed.append("data")
    if recorded["temperature"] != expected["temperature"]:
        changed.append(f"temperature ({recorded['temperature']}, not {expected['temperature']})")
    return changed


# --------------------------------------------------------------------------------------------------
# Precompute


def _resume_point(out_path: Path, expected: dict) -> tuple[np.memmap | None, int]:
    """The open ``.npy`` (or None: create it) and the first row still to compute; the ``.npy`` is
    writable only when rows are left to compute."""
    if not sidecar_path(out_path).exists():
        if out_path.exists():
            raise data_error(
                f"{out_path} exists but has no sidecar {sidecar_path(out_path).name}, so it was not "
                "written by precompute_distributions (or its sidecar was deleted); delete it or "
                "choose another output path"
            )
        return None, 0
    recorded = _read_sidecar(out_path)
    changed = _differences(recorded, expected)
    if changed:
        raise data_error(
            f"{out_path} belongs to another {' and '.join(changed)} "
            f"({recorded['completed_rows']} of {recorded['num_images']} rows done): delete it and "
            f"{sidecar_path(out_path).name}, or choose another output path"
        )
    expected["num_classes"] = recorded["num_classes"]
    if recorded["completed_rows"] == 0:
        return None, 0  # nothing claimed: (re)create the .npy
    try:
        # Checked read-only first: numpy's "r+" mode silently zero-extends a truncated file.
        probs = np.load(out_path, mmap_mode="r")
        shape = (recorded["num_images"], recorded["num_classes"])
        if probs.shape != shape or probs.dtype != np.float32:
            raise ValueError(f"shape {probs.shape} {probs.dtype}, expected {shape} float32")
        if recorded["completed_rows"] < recorded["num_images"]:  # rows left to write
            del probs
            probs = np.load(out_path, mmap_mode="r+")
        # A finished file stays read-only: under torchrun the other ranks read rank 0's files
        # (docs/multi-gpu.md: they write nothing), and a file that is not ours to write may be
        # read-only.
    except Exception as exc:  # missing, truncated, foreign: its rows are lost either way
        warnings.warn(
            f"{out_path} is unreadable ({describe(exc)}); starting over from row 0",
            MetaplWarning,
            stacklevel=3,
        )
        return None, 0
    return probs, recorded["completed_rows"]


def _create(out_path: Path, meta: dict, num_classes: int) -> np.memmap:
    """A fresh ``[N, C]`` float32 ``.npy``; the sidecar claiming 0 rows is written first."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta.update(num_classes=num_classes, completed_rows=0)
    write_json_atomically(sidecar_path(out_path), meta)
    probs = None
    try:
        # Inside: numpy writes the header (and the last byte) before it maps the file, and a full
        # disk refuses those too; the header alone was left behind, under a bare OSError.
        probs = np.lib.format.open_memmap(
            out_path, mode="w+", dtype=np.float32, shape=(meta["num_images"], num_classes)
        )
        _reserve_disk_space(out_path)
        fsync_file(out_path)  # the header, written outside the mapped region
    except OSError as exc:
        del probs  # unmapped before the file goes
        out_path.unlink(missing_ok=True)
        sidecar_path(out_path).unlink(missing_ok=True)
        raise write_error(out_path, exc) or exc from exc
    return probs


def _reserve_disk_space(path: Path) -> None:
    """Give the (sparse) ``.npy`` its disk blocks now. A write through a memory map to a full
    disk is a SIGBUS that kills the process without a word; reserved, the full disk is an OSError
    here, before any row is written (after the first round is computed: the model's output gives
    the number of classes)."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: left sparse
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it
            raise
    finally:
        os.close(fd)


def _batch_probs(
    model: nn.Module,
    images: Any,
    rows: range,
    device: torch.device,
    temperature: float,
    autocast_dtype: torch.dtype | None,
) -> np.ndarray:
    """softmax(model(images[rows]) / temperature) as float32 numpy ``[B, C]``."""
    x = to_tensor_nchw(images[np.arange(rows.start, rows.stop)]).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != len(rows):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"the model must return logits [batch, classes]; it returned {got}")
    # Softmax in float32 whatever the autocast dtype: the file is read as calibrated probabilities.
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if not torch.isfinite(probs).all():
        raise data_error(
            f"the model gave non-finite probabilities for images {rows.start}..{rows.stop - 1} "
            "(overflow under float16 autocast? try bfloat16 or none); nothing was written for them"
        )
    return probs.cpu().numpy()


@dataclasses.dataclass(frozen=True)
class Ranks:
    """The processes that precompute one file together (torchrun, docs/multi-gpu.md). Each round
    of rows is split into whole batches of the global grid, each rank classifies its contiguous
    share, and rank 0 alone writes them: the file and its resume rule are those of one process,
    and so are its bytes (the model sees the same batches)."""

    rank: int
    world_size: int
    gather: Callable[[Any], list | None]
    """Every rank's object, in rank order, on rank 0; None on the others."""
    broadcast: Callable[[Any], Any]
    """Rank 0's object, on every rank."""


ONE_PROCESS = Ranks(0, 1, gather=lambda obj: [obj], broadcast=lambda obj: obj)


def _batches(rows: range, batch_size: int) -> list[range]:
    """``rows`` cut on the global grid ``[i * batch_size, (i + 1) * batch_size)``."""
    cuts = [rows.start, *range((rows.start // batch_size + 1) * batch_size, rows.stop, batch_size)]
    return [range(a, b) for a, b in zip(cuts, [*cuts[1:], rows.stop])]


def _share(batches: list[range], rank: int, world_size: int) -> list[range]:
    """Rank ``rank``'s contiguous share of a round's batches (the first ranks take one more)."""
    size, extra = divmod(len(batches), world_size)
    first = rank * size + min(rank, extra)
    return batches[first : first + size + (rank < extra)]


def precompute_distributions(
    model: nn.Module,
    images: Any,
    out_path: Path,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
    ranks: Ranks = ONE_PROCESS,
) -> np.memmap:
    """Write ``softmax(model(x) / temperature)`` for every image to ``out_path``; resume if partial.

    ``images``: anything that indexes with an integer array into uint8 NHWC batches (a numpy array
    or :class:`metapl.data.imagenet.LazyImages`). ``model`` must already be on ``device``; it runs
    in eval mode under ``torch.inference_mode`` and its train/eval mode is restored afterwards.
    ``chunk_size`` (rounded up to whole batches; default 32 batches) is how many rows each process
    classifies between flushes, i.e. the most work an interruption loses. See the module docstring
    for the resume rule. ``ranks``: the processes that share the work (every one calls this with
    the same arguments); one by default. Returns the finished file as a read-only memmap (via
    :func:`load_distributions`).
    """
    if batch_size < 1 or (chunk_size is not None and chunk_size < 1):
        raise ConfigError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    out_path, device = Path(out_path), torch.device(device)
    n = len(images)
    if n == 0:
        raise data_error(f"no images to precompute distributions for (output {out_path})")
    chunk = -(-(chunk_size or 32 * batch_size) // batch_size) * batch_size
    meta: dict[str, Any] = {  # the sidecar's JSON
        "format_version": FORMAT_VERSION,
        "model_fingerprint": fingerprint_model(model),
        "data_fingerprint": fingerprint_images(images),
        "num_images": n,
        "num_classes": None,
        "temperature": float(temperature),
        "completed_rows": 0,
    }
    fingerprints = {k: meta[k] for k in ("model_fingerprint", "data_fingerprint")}
    writer = ranks.rank == 0
    # Rank 0 alone reads the file before it is finished: another machine's rank that looked for
    # it before it existed might not see it afterwards for a while (a network file system's cache
    # of missing names). Every rank raises rank 0's error, if any (a foreign or stale file).
    probs, done, refused = None, 0, None
    if writer:
        try:
            probs, done = _resume_point(out_path, meta)
        except DataError as exc:
            refused = str(exc)
    done, refused = ranks.broadcast((done, refused))
    if refused is not None:
        raise DataError(refused)
    if done == n:
        del probs
        return load_distributions(out_path, **fingerprints)

    was_training = model.training
    model.eval()
    bar = progress_bar(
        total=n,
        initial=done,
        disable=not (progress and writer),
        unit="img",
        desc=f"precompute {out_path.name}",
        dynamic_ncols=True,
    )
    try:
        with torch.inference_mode():
            # A rank that fails still meets the others at the round's gather and verdict, so that
            # every rank stops with the failure, not waiting at the next round's gather. Rank 0
            # writes a round after its verdict (the others classify the next one meanwhile); a
            # failed write is the next verdict, or the last one's after the loop.
            own_error: Exception | None = None
            failed_write: RankFailure | None = None
            where = f"the precompute of {out_path}"  # in another rank's error
            start = done
            while start < n:
                # A round is world_size chunks; its end lies on the chunk grid, and its batches on
                # the batch grid, whatever row a resume starts from.
                stop = min((start // chunk + ranks.world_size) * chunk, n)
                mine = _share(
                    _batches(range(start, stop), batch_size), ranks.rank, ranks.world_size
                )
                share: tuple[int, np.ndarray] | RankFailure | None = None
                if own_error is None:
                    try:
                        share = _classify(
                            model, images, mine, device, temperature, autocast_dtype, bar
                        )
                    except Exception as exc:
                        if ranks.world_size == 1:
                            raise
                        own_error, share = exc, RankFailure.of(ranks.rank, exc)
                parts = meet(ranks.gather, share, own_error)
                verdict = failed_write
                if parts is not None and verdict is None:
                    verdict = next((p for p in parts if isinstance(p, RankFailure)), None)
                stop_on(own_error, meet(ranks.broadcast, verdict, own_error), where)
                if parts is not None:  # rank 0: the round's rows to disk, then the sidecar
                    try:
                        shares = [p for p in parts if p is not None]
                        probs = _write_round(out_path, meta, probs, shares, range(start, stop))
                        probs.flush()  # rows on disk first, then the sidecar may claim them
                        meta["completed_rows"] = stop
                        write_json_atomically(sidecar_path(out_path), meta)
                        bar.update(stop - start - sum(len(r) for r in mine))  # the others' rows
                    except Exception as exc:
                        if ranks.world_size == 1:
                            raise
                        own_error, failed_write = exc, RankFailure.of(0, exc)
                start = stop
            # The last verdict: rank 0's write of the last round; after it, the file is finished
            # for every rank to read.
            stop_on(own_error, meet(ranks.broadcast, failed_write, own_error), where)
    finally:
        model.train(was_training)
        bar.close()
    del probs  # close the writable mapping before handing out a read-only one
    return load_distributions(out_path, **fingerprints)


def _classify(
    model: nn.Module,
    images: Any,
    mine: list[range],
    device: torch.device,
    temperature: float,
    autocast_dtype: torch.dtype | None,
    bar,
) -> tuple[int, np.ndarray] | None:
    """This rank's share of a round: its first row and its rows' distributions (None: no rows)."""
    rows_out: list[np.ndarray] = []
    for rows in mine:
        out = _batch_probs(model, images, rows, device, temperature, autocast_dtype)
        if rows_out and out.shape[1] != rows_out[0].shape[1]:
            raise ConfigError(
                f"the model returned {out.shape[1]} classes for images "
                f"{rows.start}..{rows.stop - 1}, {rows_out[0].shape[1]} before"
            )
        rows_out.append(out)
        bar.update(len(rows))
    return (mine[0].start, np.concatenate(rows_out)) if mine else None


def _write_round(
    out_path: Path,
    meta: dict,
    probs: np.memmap | None,
    parts: list[tuple[int, np.ndarray]],
    expected: range,
) -> np.memmap:
    """The ranks' rows of one round written into the file, created now if no round was before.
    The sidecar will claim ``expected``: the shares must cover exactly those rows, or nothing is
    written (ranks that disagreed on the round would otherwise leave unwritten rows claimed)."""
    covered = [(first, first + len(rows)) for first, rows in parts]
    if [a for a, _ in covered] != [expected.start, *(b for _, b in covered[:-1])] or (
        covered[-1][1] != expected.stop
    ):
        raise RuntimeError(
            f"the ranks' shares {covered} do not cover rows {expected.start}..{expected.stop - 1} "
            f"of {out_path}; nothing of them was written"
        )
    for first, rows in parts:
        if probs is None:
            probs = _create(out_path, meta, rows.shape[1])
        elif rows.shape[1] != probs.shape[1]:
            raise ConfigError(
                f"the model returned {rows.shape[1]} classes, {out_path} holds {probs.shape[1]}"
            )
        probs[first : first + len(rows)] = rows
    assert probs is not None  # every round has rows
    return probs


# --------------------------------------------------------------------------------------------------
# Load


def load_distributions(
    path: Path,
    *,
    model: nn.Module | None = None,
    images: Any = None,
    model_fingerprint: str | None = None,
    data_fingerprint: str | None = None,
) -> np.memmap:
    """The finished distributions file as a read-only float32 ``[N, C]`` memmap.

    Given ``model``/``images`` (or their precomputed fingerprints), refuses a stale file: one
    computed by another model or for other images. Every defect is a one-line DataError naming the
    file: missing, no or bad sidecar, stale, truncated or corrupt ``.npy``, or incomplete (an
    interrupted precompute: run it again to finish).
    """
    if model is not None and model_fingerprint is not None:
        raise ConfigError("pass model or model_fingerprint to load_distributions, not both")
    if images is not None and data_fingerprint is not None:
        raise ConfigError("pass images or data_fingerprint to load_distributions, not both")
    path = Path(path)
    if not path.is_file():
        raise data_error(
            f"distributions file {path} does not exist: run precompute_distributions first"
        )
    meta = _read_sidecar(path)
    if model is not None:
        model_fingerprint = fingerprint_model(model)
    if images is not None:
        data_fingerprint = fingerprint_images(images)
    changed = [
        what
        for what, given, key in (
            ("model", model_fingerprint, "model_fingerprint"),
            ("data", data_fingerprint, "data_fingerprint"),
        )
        if given is not None and given != meta[key]
    ]
    if changed:
        raise data_error(
            f"{path} is stale: the {' and the '.join(changed)} changed since it was precomputed; "
            f"delete it and {sidecar_path(path).name} and run precompute_distributions again"
        )
    shape = (meta["num_images"], meta["num_classes"])
    try:
        probs = np.load(path, mmap_mode="r")
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError, UnpicklingError ...
        raise data_error(
            f"{path} is truncated or corrupt ({describe(exc)}): delete it and "
            f"{sidecar_path(path).name} and run precompute_distributions again"
        ) from None
    if probs.shape != shape or probs.dtype != np.float32:
        raise data_error(
            f"{path} holds {probs.dtype} {probs.shape}, its sidecar says float32 {shape}: delete it "
            f"and {sidecar_path(path).name} and run precompute_distributions again"
        )
    if meta["completed_rows"] < meta["num_images"]:
        raise data_error(
            f"{path} is incomplete: precompute was interrupted at row {meta['completed_rows']} of "
            f"{meta['num_images']}; run it again to finish"
        )
    return probs
