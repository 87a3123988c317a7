"""CIFAR-10 from the official "python version" files (cifar-10-python.tar.gz, extracted).

Layout: ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (``data_dir`` may also be the
``cifar-10-batches-py`` folder itself). Each file is a Python 2 pickle of a dict with ``b"data"``,
a uint8 array ``[n, 3072]`` whose rows are the R, G and B planes of a 32x32 image, each plane row-major,
and ``b"labels"``, a list of n ints in 0..9. Training order is data_batch_1 .. data_batch_5, rows in
file order: the paper's "first 4,000 examples" are the first 4,000 rows of that concatenation.

Images come back uint8 NHWC ``[N, 32, 32, 3]`` (see :mod:`metapl.data.arrays`).

The pickles are read by an unpickler that only builds dicts, lists, bytes, ints and numpy arrays, so
a tampered file cannot run code on load.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

from metapl.data.arrays import check_labels, data_error, describe

NUM_CLASSES = 10
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
_EXPECTED = (
    "the CIFAR-10 python version (cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, extracted)"
)
_ROW = 3 * 32 * 32

# numpy's array-rebuilding function, whatever module it lives in for this numpy version; the real
# files name it numpy.core.multiarray._reconstruct (numpy 1.x, Python 2).
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]


def _from_buffer(buffer, dtype, shape, order):
    """What numpy's protocol-5 pickles (``numpy.save``-free re-pickles under Python 3.8+) rebuild
    an array with; written out here so that only this, not numpy's private function, is allowed."""
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


_ALLOWED = {
    ("numpy.core.numeric", "_frombuffer"): _from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _from_buffer,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 pickles of bytes (protocol < 3) go through _codecs.encode.
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: anything else is a malformed batch file."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}") from None


def find_dir(data_dir: Path | str) -> Path:
    """The folder holding the batch files: ``data_dir/cifar-10-batches-py`` or ``data_dir`` itself."""
    root = Path(data_dir)
    if (root / TRAIN_FILES[0]).exists() or root.name == FOLDER:
        return root
    return root / FOLDER


def _missing(path: Path, root: Path) -> Exception:
    hint = ""
    if (root / "cifar-10-python.tar.gz").exists():
        hint = f" (found cifar-10-python.tar.gz: extract it with `tar xzf cifar-10-python.tar.gz -C {root}`)"
    return data_error(
        f"{path} is missing: expected {_EXPECTED} in {root}{hint}; pass the folder that contains "
        f"{FOLDER} as the data directory"
    )


def read_batch(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 ``[n, 32, 32, 3]``, int64 ``[n]``); DataError naming it if unreadable."""
    path = Path(path)
    what = f"expected a pickled dict with b'data' (uint8 [n, 3072]) and b'labels' (n ints) from {_EXPECTED}"
    try:
        with path.open("rb") as f:
            # Python 2 pickles: encoding="bytes" keeps str objects (keys, array buffers) as bytes.
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise _missing(
            path, path.parent.parent if path.parent.name == FOLDER else path.parent
        ) from None
    except Exception as exc:  # any unpickling failure means a truncated or foreign file
        raise data_error(
            f"{path} is truncated or not a CIFAR-10 batch ({describe(exc)}): {what}; "
            "re-download and extract the archive"
        ) from None
    if not isinstance(batch, dict):
        raise data_error(f"{path} holds a {type(batch).__name__}, not a dict: {what}")
    # Accept str keys too, for batches re-pickled under Python 3.
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        keys = sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in batch)
        raise data_error(f"{path} has keys {keys}, not 'data' and 'labels': {what}")
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _ROW
    ):
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise data_error(f"{path} has 'data' of shape {shape} and dtype {dtype}: {what}")
    try:
        label_array = np.asarray(labels)
    except Exception:  # a ragged or odd object in place of the label list
        label_array = np.asarray([], dtype=object)
    if label_array.shape != (data.shape[0],):
        raise data_error(f"{path} has {label_array.size} labels for {data.shape[0]} images: {what}")
    label_array = check_labels(label_array, NUM_CLASSES, path, f"labels 0..9 from {_EXPECTED}")
    # Rows are [R plane | G plane | B plane], each 32x32 row-major: NCHW, then to NHWC.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, label_array


def load_cifar10(data_dir: Path | str, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The training set (data_batch_1..5, in order) or the test set (test_batch).

    Returns uint8 images ``[N, 32, 32, 3]`` and int64 labels ``[N]``.
    """
    folder = find_dir(data_dir)
    names = TRAIN_FILES if train else (TEST_FILE,)
    parts = [read_batch(folder / name) for name in names]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return images, labels
