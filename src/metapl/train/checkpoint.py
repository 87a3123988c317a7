"""Checkpoints that survive a crash, RNG state capture, and the same-configuration resume check.

Atomic save: the state is written to a temporary file in the checkpoint's directory, flushed and
fsync'ed, and only then renamed onto ``path`` with ``os.replace`` (atomic on POSIX and Windows). The
checkpoint it replaces is first hard-linked (or, where links are unsupported, copied) to
``checkpoint.prev.pt``, itself through a temporary name and ``os.replace``. So at every instant
``path`` is a complete checkpoint, old or new, and after the first save ``.prev.pt`` is a complete
one too: a ``kill -9`` at any point leaves at worst a stray ``.<name>.*.tmp`` file, which the next
save removes and loading never reads.

Loading first checks the CRC-32 of every record of the file (torch.save's zip archive holds them,
but torch.load does not read them: a flipped bit in a weight loaded as another weight, and the run
resumed from it without a word), then uses ``torch.load(weights_only=True)``: a checkpoint holds
only tensors and plain containers (model, optimizer and scheduler state dicts, RNG states as uint8
tensors, a JSON-like config), so nothing in it needs arbitrary unpickling, and a tampered or
foreign file cannot run code.
:func:`save_checkpoint` checks that rule before writing, so breaking it fails at the first save
(naming the offending key) instead of at resume time.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import pickle
import random
import shlex
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metapl.atomic import move_into_place, temp_file_beside, temp_prefix
from metapl.errors import CheckpointError, first_line
from metapl.report import earlier_config_as_now

REQUIRED_KEYS = ("format_version", "step")
# The layout of a training run's checkpoint.pt (the engine writes it; train, predict and export
# read it). Bump it when the layout changes in a way an older reader would misread.
FORMAT_VERSION = 1
"""Keys every checkpoint must hold; anything else is up to the engine."""

FINGERPRINT_KEY = "config_fingerprint"
"""Where the engine stores :func:`config_fingerprint` in the checkpoint for :func:`check_resumable`."""

CONFIG_KEY = "config"
"""Where the engine may store the resolved config dict; used only to explain a mismatch."""

DEFAULT_IGNORE = (
    "steps",
    "checkpoint_every",
    "eval_every",
    "log_every",
    "device",
    "data_threads",
    "data_prefetch",
)
"""Config keys that may change between a run and its resume (length, cadence, hardware, how the
image files are read)."""

# Exactly these types unpickle under weights_only=True (checked with `type(x) in`, not isinstance,
# because subclasses such as numpy.float64 or an IntEnum would not).
_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_PLAIN_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set, torch.Size)


def prev_path(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    return Path(path).with_suffix(".prev.pt")


def _check_plain(obj: Any, where: str) -> None:
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_SCALARS:
        return
    if type(obj) in (dict, collections.OrderedDict):
        for key, value in obj.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if type(obj) in _PLAIN_CONTAINERS:
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint state {where} is a {type(obj).__module__}.{type(obj).__qualname__}; "
        "only tensors, numbers, strings and dict/list/tuple of them can be saved "
        "(they load with weights_only=True)"
    )


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Directories cannot be opened this way on Windows: skip there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keep_previous(path: Path) -> None:
    """Make ``prev_path(path)`` a complete copy of the current ``path`` without touching ``path``."""
    prev = prev_path(path)

    def link(tmp: Path) -> None:  # instant, and no extra disk space
        tmp.unlink()
        os.link(path, tmp)

    try:
        tmp = temp_file_beside(prev, link)  # a temporary name, then a rename
    except OSError:  # a file system without hard links: a copy
        tmp = temp_file_beside(prev, lambda t: shutil.copyfile(path, t))
    move_into_place(tmp, prev)


def _save_with_checksums(state: dict, path: Path) -> None:
    """``torch.save`` with the CRC-32 of every record, which :func:`_check_records` verifies, even
    if this process turned them off (``torch.serialization.set_crc32_options(False)``)."""
    was = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        # Through a Python file: a failed write (a full disk) then raises its OSError, under
        # torch's RuntimeError. Given a path, torch's C++ writer says only "unexpected pos".
        with open(path, "wb") as f:
            torch.save(state, f)
    finally:
        torch.serialization.set_crc32_options(was)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically, keeping the checkpoint it replaces as ``.prev.pt``.

    Raises ``TypeError`` if ``state`` holds anything but tensors and plain containers and
    ``ValueError`` if it lacks a key of :data:`REQUIRED_KEYS`: both are bugs in the caller.
    """
    path = Path(path)
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"refusing to write {path}: the state lacks {', '.join(missing)}")
    _check_plain(state, "state")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a save killed midway: only this function writes files with these prefixes.
    for prefix in (temp_prefix(path), temp_prefix(prev_path(path))):
        for stale in path.parent.glob(f"{prefix}*.tmp"):
            stale.unlink(missing_ok=True)

    tmp = temp_file_beside(path, lambda t: _save_with_checksums(state, t))
    try:
        if path.exists():
            _keep_previous(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    move_into_place(tmp, path)
    _fsync_dir(path.parent)


def _check_records(path: Path) -> None:
    """``ValueError`` when a record of the zip archive ``torch.save`` wrote does not match its
    CRC-32 (the file changed after it was written: a disk or a copy damaged it). A file that is no
    zip archive is left to ``torch.load`` to describe; one written without checksums (every CRC 0:
    ``set_crc32_options(False)``) cannot be checked."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if not any(record.CRC for record in records):
                return
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        return
    except Exception as error:  # a damaged header: an unknown compression method, a bad offset
        raise ValueError(f"its archive is damaged ({first_line(error, limit=120)})") from error
    if damaged is not None:
        record = damaged.split("/", 1)[-1]  # without the archive's folder (the temporary name)
        raise ValueError(
            f"its record {record} does not match its checksum: the file changed after it was "
            "written"
        )


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (torch.jit.save; `metapl export --format
    torchscript` writes one): its records include constants.pkl, as torch's own test has it.
    torch.load then printed a UserWarning before failing, and its error was cut off mid-sentence."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except Exception:  # not a zip archive, or a damaged one: torch.load describes it
        return False


def _read(path: Path, map_location: Any) -> dict:
    """Load and validate; raise ``ValueError`` with a short reason on any defect."""
    _check_records(path)
    if _is_torchscript(path):
        raise ValueError(
            "it is a TorchScript model, such as `metapl export` writes, not a checkpoint"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if not text.startswith("Weights only load failed"):
            raise ValueError(first_line(error, limit=120)) from error
        # torch's own text invites loading it with weights_only=False, i.e. running its code;
        # and it says the same of bytes that are no pickle at all, which only its unpickler's
        # own reason (after "WeightsUnpickler error:") tells apart: any reason about a global
        # (a class or function the pickle names, "GLOBAL os.getcwd" say) is a pickle of objects
        marker = "WeightsUnpickler error:"
        reason = text.split(marker, 1)[-1].strip().split("\n", 1)[0]
        if marker not in text or "global" in reason.lower():
            raise ValueError(
                "it holds Python objects, not only tensors: a torch.save of a model or "
                "optimizer, not a checkpoint metapl wrote"
            ) from error
        reason = reason.rstrip(".")
        raise ValueError(
            f"it is not a file torch.save wrote: {reason[:1].lower()}{reason[1:]}"
        ) from error
    except KeyError as error:  # torch's reader of old files met bytes that are no pickle
        # (b"hello": its message was only the key, "101")
        raise ValueError(
            f"it is not a file torch.save wrote: torch's reader failed on key {error}"
        ) from error
    except Exception as error:  # torch raises RuntimeError, EOFError, ...
        raise ValueError(first_line(error, limit=120)) from error
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a dict")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    # a count of steps taken (a hand-edited -5 resumed, and predict said "stopped at step -5")
    if "step" in state and (type(state["step"]) is not int or state["step"] < 0):
        raise ValueError(f"its step is {state['step']!r}, not a count of steps taken")
    return state


def load_checkpoint(
    path: Path, map_location: Any = "cpu", *, format_version: int | None = None
) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Every defect is a :class:`CheckpointError` with a one-line message naming the file: missing,
    corrupt or truncated (then also whether ``.prev.pt`` is usable, with the ``mv`` command to put it
    in place), missing :data:`REQUIRED_KEYS`, or (when ``format_version`` is given) another version.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        state = _read(path, map_location)
    except ValueError as error:
        prev = prev_path(path)
        if not prev.is_file():
            hint = (
                "there is no previous checkpoint to fall back to: delete it to start this run "
                "over, or train into another folder"
            )
        else:
            try:
                _read(prev, "cpu")
                hint = (
                    f"the previous checkpoint is intact; to resume from it run: "
                    f"mv {shlex.quote(str(prev))} {shlex.quote(str(path))}"
                )
            except ValueError:
                hint = (
                    f"the previous checkpoint {prev} is unreadable too: delete both to start this "
                    "run over, or train into another folder"
                )
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a metapl checkpoint ({error}); {hint}"
        ) from None
    if format_version is not None and state["format_version"] != format_version:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['format_version']!r}; this metapl "
            f"reads version {format_version}: use the metapl that wrote it, or train into "
            "another folder"
        )
    return state


# ----------------------------------------------------------------------------- random states


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """Every random state a training step can touch, as tensors and plain values.

    torch's global CPU state, every CUDA device's state (when CUDA is available), Python's
    ``random``, numpy's global ``RandomState`` (its MT19937 key as an int64 tensor, so the result
    loads with ``weights_only=True``) and ``generators[name].get_state()`` for each named generator.
    """
    # numpy's stub picks its legacy=False overload (a dict) for a call without arguments; the
    # default is legacy=True: the tuple (name, key, pos, has_gauss, gauss)
    key, pos, has_gauss, gauss = np.random.get_state()[1:]  # type: ignore[index]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def restore_rng(state: dict, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back the states recorded by :func:`capture_rng`.

    CUDA states are restored for the devices present in both the state and this machine (resuming
    on other hardware cannot be bit-exact anyway). Every generator in ``generators`` must have a
    recorded state, otherwise :class:`CheckpointError`; extra recorded generators are ignored.
    """
    generators = generators or {}
    recorded = state.get("generators", {})
    absent = sorted(set(generators) - set(recorded))
    if absent:
        raise CheckpointError(f"the checkpoint has no random state for {', '.join(absent)}")
    # set_state wants CPU uint8 tensors, whatever map_location the checkpoint was loaded with.
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["key"].cpu().numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    for name, generator in generators.items():
        generator.set_state(recorded[name].cpu())


# ----------------------------------------------------------------------------- resume check


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if isinstance(obj, torch.device | torch.dtype):
        return str(obj)
    # Anything else has no stable text form (reprs may carry memory addresses): refuse.
    raise TypeError(f"config value of type {type(obj).__qualname__} cannot be fingerprinted")


def _strip(config: Any, ignore: frozenset[str]) -> Any:
    if isinstance(config, Mapping):
        return {k: _strip(v, ignore) for k, v in config.items() if str(k) not in ignore}
    if isinstance(config, list | tuple):
        return [_strip(v, ignore) for v in config]
    return config


def config_fingerprint(config: dict, ignore: Iterable[str] = DEFAULT_IGNORE) -> str:
    """sha256 (hex) of ``config`` as canonical JSON, without the keys named in ``ignore``.

    A name in ``ignore`` is dropped at every nesting level, so the rule holds whether the config is
    flat or grouped (``{"train": {"steps": ...}}``). Tuples hash like lists; paths and enums by
    their text and value.
    """
    stripped = _strip(config, frozenset(ignore))
    text = json.dumps(stripped, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, Mapping):
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: config}


def _describe_difference(old: dict, new: dict, ignore: Iterable[str]) -> str:
    ignore = frozenset(ignore)
    old_flat, new_flat = _flatten(_strip(old, ignore)), _flatten(_strip(new, ignore))
    missing = object()
    changes = []
    for key in sorted(old_flat.keys() | new_flat.keys()):
        before, after = old_flat.get(key, missing), new_flat.get(key, missing)
        if json.dumps(before, default=repr) != json.dumps(after, default=repr):
            show = [("unset" if v is missing else repr(v)) for v in (before, after)]
            changes.append(f"{key}: {show[0]} -> {show[1]}")
    if len(changes) > 4:
        changes = changes[:4] + [f"and {len(changes) - 4} more"]
    return ", ".join(changes)


def check_resumable(
    ckpt: dict,
    fingerprint: str,
    path: Path | str,
    *,
    config: dict | None = None,
    ignore: Iterable[str] = DEFAULT_IGNORE,
    defaults: Mapping | None = None,
    paths: Iterable[str] = (),
    advice: str = "use a new --out or the same options",
) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` was written by a run with this configuration
    (the message ends with ``advice``).

    Compares ``ckpt[FINGERPRINT_KEY]`` with ``fingerprint``. When both ``config`` and
    ``ckpt[CONFIG_KEY]`` are available, the message lists the differing options (dotted names)
    instead of the two hashes.

    ``defaults``: top-level options a checkpoint's config may lack because a later version added
    them, with the value that keeps the old behaviour. A checkpoint that lacks such an option
    resumes if the run sets it to that value (a run folder survives an upgrade of metapl).

    ``paths``: top-level options that name a file or folder (needs ``config``). Where the
    checkpoint's value and this run's name the same one (``rd/x`` then, ``/home/me/rd/x`` now: the
    same command from another folder, or with an absolute ``--out``), they count as equal.
    """
    saved = ckpt.get(FINGERPRINT_KEY)
    if saved == fingerprint:
        return
    old_config = ckpt.get(CONFIG_KEY)
    if (defaults or paths) and isinstance(old_config, Mapping):
        merged = earlier_config_as_now(old_config, config or {}, defaults, paths)
        if merged != old_config:
            ckpt = {**ckpt, CONFIG_KEY: merged}
            if config_fingerprint(merged, ignore) == fingerprint:
                return
    if saved is None:
        details = "it records no configuration fingerprint"
    else:
        details = ""
        with contextlib.suppress(Exception):  # a best-effort explanation must not hide the error
            if config is not None and isinstance(ckpt.get(CONFIG_KEY), Mapping):
                details = _describe_difference(ckpt[CONFIG_KEY], config, ignore)
        details = details or f"fingerprint {str(saved)[:12]} != {fingerprint[:12]}"
    raise CheckpointError(
        f"{path} was written by a run with a different configuration ({details}); {advice}"
    )
