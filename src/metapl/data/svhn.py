"""SVHN from the official cropped-digits files (format 2): train_32x32.mat, test_32x32.mat, extra_32x32.mat.

Each file is a MATLAB (v5) file with ``X``, uint8 ``[32, 32, 3, N]``, and ``y``, ``[N, 1]`` with labels
1..10 where 10 stands for the digit 0. The reader maps 10 -> 0 so labels are the digits 0..9, and
returns images uint8 NHWC ``[N, 32, 32, 3]`` (see :mod:`metapl.data.arrays`). Training order is the
file's order: the paper's "first 1,000 examples" are its first 1,000 columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from metapl.data.arrays import data_error, describe
from metapl.errors import ConfigError

NUM_CLASSES = 10
SUBSETS = ("train", "test", "extra")
_EXPECTED = (
    "the SVHN cropped digits (format 2) .mat files from http://ufldl.stanford.edu/housenumbers/ "
    "(train_32x32.mat, test_32x32.mat, extra_32x32.mat)"
)


def file_name(subset: str) -> str:
    """``"train"`` -> ``"train_32x32.mat"``."""
    if subset not in SUBSETS:
        raise ConfigError(f"unknown SVHN subset {subset!r}; expected one of {SUBSETS}")
    return f"{subset}_32x32.mat"


def read_mat(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat file -> (uint8 ``[N, 32, 32, 3]``, int64 digits ``[N]``), or a DataError naming it."""
    path = Path(path)
    what = f"expected 'X' uint8 [32, 32, 3, N] and 'y' [N, 1] with labels 1..10, from {_EXPECTED}"
    if not path.is_file():
        raise data_error(
            f"{path} is missing: expected {_EXPECTED} in {path.parent}; download it there "
            "or pass the folder that contains it as the data directory"
        )
    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as exc:  # scipy raises many types (ValueError, MatReadError, OSError, ...)
        raise data_error(
            f"{path} is truncated or not a MATLAB v5 file ({describe(exc)}): {what}; re-download it"
        ) from None
    if "X" not in mat or "y" not in mat:
        try:  # loadmat kept only X and y: list what the file holds
            keys = sorted(name for name, _, _ in scipy.io.whosmat(path))
        except Exception:  # noqa: BLE001  (it was just read: this should not fail)
            keys = sorted(k for k in mat if not k.startswith("__"))
        raise data_error(f"{path} has variables {keys}, not 'X' and 'y': {what}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise data_error(f"{path} has 'X' of shape {x.shape} and dtype {x.dtype}: {what}")
    n = x.shape[3]
    if y.shape not in ((n, 1), (n,)):
        raise data_error(f"{path} has 'y' of shape {y.shape} for {n} images: {what}")
    raw = np.asarray(y).reshape(-1)
    if raw.size and np.issubdtype(raw.dtype, np.floating) and np.array_equal(raw, np.round(raw)):
        raw = raw.astype(np.int64)  # MATLAB-written files may store whole numbers as double
    if raw.size and not np.issubdtype(raw.dtype, np.integer):
        raise data_error(f"{path} has 'y' of dtype {raw.dtype}: {what}")
    raw = raw.astype(np.int64)
    bad = (raw < 1) | (raw > 10)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise data_error(
            f"{path} has label {int(raw[first])} at index {first}, outside 1..10: {what}; re-download it"
        )
    labels = raw % 10  # 10 stands for the digit 0
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    return images, labels


def load_svhn(data_dir: Path | str, subset: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``<data_dir>/<subset>_32x32.mat`` -> (uint8 ``[N, 32, 32, 3]``, int64 digits 0..9 ``[N]``)."""
    return read_mat(Path(data_dir) / file_name(subset))
