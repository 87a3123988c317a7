"""Your own images as arrays: one ``.npz`` file written with ``numpy.savez`` (dataset ``npz``).

Where: ``--data-dir FILE.npz``, or ``--data-dir DIR`` with ``DIR/data.npz``. Dataset ``folder`` reads
the same file when ``--data-dir`` is a ``.npz`` or a folder with ``data.npz`` and no ``labeled/``, so
the ``folder-*`` presets serve both.

Keys (any other key is an error, so that a typo such as ``y_tests`` does not silently drop a set):

- ``x_labeled``, ``y_labeled``, ``x_unlabeled``: required;
- ``x_test``, ``y_test``: optional, both or neither; without them the run has no test accuracy;
- ``class_names``: optional 1-D string array ``[K]`` (``numpy.array(["cat", "dog"])``); without it
  the classes are named ``"0" .. "K-1"``. Either way they end up in ``OUT/classes.json``.

Images: **uint8**, ``[N, H, W]`` or ``[N, H, W, 1]`` (grayscale, repeated to RGB as PIL's
``convert("RGB")`` does for the folder reader) or ``[N, H, W, 3]`` (RGB); any ``H, W``, which may
differ between the sets. Images that are not already ``resolution x resolution`` are resized with
the folder reader's rule (shorter side bicubic to ``resolution``, centre crop: :func:`fit`), so a
picture gives the same pixels from a PNG file and from an array. Why uint8 only: float images come
in ``[0, 1]`` or ``[0, 255]``, and guessing wrong would train on garbage without an error.

Labels: any integer dtype, ``[N]``, in ``0 .. K-1``, where ``K = len(class_names)`` or else
``max(y_labeled) + 1``; every class needs at least one labeled image, and ``K >= 2``.

A file that is not a readable ``.npz``, a missing or unexpected key, a wrong dtype or shape and a
label out of range are each a one-line :class:`~metapl.errors.DataError` naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, overload

import numpy as np
from PIL import Image

from metapl.data.arrays import data_error, describe

REQUIRED = ("x_labeled", "y_labeled", "x_unlabeled")
OPTIONAL = ("x_test", "y_test", "class_names")
_HOW = "write it with numpy.savez(path, x_labeled=..., y_labeled=..., x_unlabeled=...)"


@overload
def resolve_npz(path: Path, strict: Literal[True]) -> Path: ...


@overload
def resolve_npz(path: Path, strict: bool) -> Path | None: ...


def resolve_npz(path: Path, strict: bool) -> Path | None:
    """The .npz that ``--data-dir`` names: the path itself when it ends in ``.npz``, else
    ``path/data.npz``. Not strict (dataset ``folder``): None unless that file exists and ``path`` has
    no ``labeled/`` folder, so a folder layout wins."""
    if path.suffix.lower() == ".npz":
        return path
    candidate = path / "data.npz"
    if not strict:
        return candidate if candidate.is_file() and not (path / "labeled").exists() else None
    if not candidate.is_file():
        raise data_error(
            f"{candidate} is missing: pass the .npz file itself as --data-dir, or name it data.npz "
            f"in {path}; {_HOW}"
        )
    return candidate


def fit(image: Image.Image, resolution: int) -> np.ndarray:
    """The folder reader's geometry (``decode_image``): shorter side bicubic to ``resolution``,
    centre square crop; uint8 ``[resolution, resolution, 3]``."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.uint8)


def _images(path: Path, key: str, x: np.ndarray, resolution: int) -> np.ndarray:
    """``x`` as uint8 ``[N, resolution, resolution, 3]`` (module docstring rules)."""
    shape = "uint8 [N, H, W], [N, H, W, 1] or [N, H, W, 3]"
    if x.dtype != np.uint8:
        raise data_error(
            f"{path}: {key} has dtype {x.dtype}, expected {shape}; convert it, e.g. "
            "(x * 255).round().astype(numpy.uint8) for floats in [0, 1]"
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or 0 in x.shape:
        raise data_error(f"{path}: {key} has shape {x.shape}, expected {shape} with N >= 1")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[1:3] == (resolution, resolution):
        return np.ascontiguousarray(x)
    return np.stack([fit(Image.fromarray(image), resolution) for image in x])


def _labels(path: Path, key: str, y: np.ndarray, n: int) -> np.ndarray:
    """``y`` as int64 ``[n]``, or a DataError; the range is checked by :func:`_in_range`."""
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise data_error(
            f"{path}: {key} has shape {y.shape} and dtype {y.dtype}, expected integer labels of "
            f"shape ({n},), one per image"
        )
    return y.astype(np.int64)


def _in_range(path: Path, key: str, y: np.ndarray, num_classes: int) -> np.ndarray:
    negative = np.flatnonzero(y < 0)
    if len(negative):  # before the range: with no class_names, K came from these very labels
        first = int(negative[0])
        raise data_error(
            f"{path}: {key}[{first}] is {int(y[first])}, a negative label: labels are class "
            "indices 0..K-1"
        )
    bad = y >= num_classes
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise data_error(
            f"{path}: {key}[{first}] is {int(y[first])}, outside 0..{num_classes - 1}: labels are "
            "class indices 0..K-1 (K = len(class_names) when given, else max(y_labeled) + 1)"
        )
    return y


def _class_names(path: Path, arrays: dict[str, np.ndarray], y_labeled: np.ndarray) -> list[str]:
    names = arrays.get("class_names")
    if names is None:
        largest = int(y_labeled.max())
        if largest >= len(y_labeled):  # K = largest + 1 classes cannot each have a labeled image
            first = int(np.argmax(y_labeled))
            raise data_error(
                f"{path}: y_labeled[{first}] is {largest}, but there are only {len(y_labeled)} "
                f"labeled images, so classes 0..{largest} cannot each have one: labels are class "
                "indices 0..K-1; renumber them, or give class_names"
            )
        return [str(c) for c in range(max(1, largest + 1))]
    if names.ndim != 1 or names.dtype.kind not in "US" or len(set(names.tolist())) != len(names):
        raise data_error(
            f"{path}: class_names has shape {names.shape} and dtype {names.dtype}, expected "
            "distinct strings [K], e.g. numpy.array(['cat', 'dog'])"
        )
    decoded = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    # `metapl predict` prints one line per image, with its class's name: an empty name printed
    # nothing, and a newline in one split that image's line in two
    for k, name in enumerate(decoded):
        if not name.strip() or not name.isprintable():
            raise data_error(
                f"{path}: class_names[{k}] is {name!r}; give each class a name that is not "
                "empty and has no newline or other control character"
            )
    return decoded


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz at ``path``; a DataError naming it if missing or malformed."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "is missing"
        raise data_error(f"{path} {what}: expected a .npz of your images; {_HOW}")
    with path.open("rb") as f:
        head = f.read(6)
    if not head.startswith((b"PK", b"\x93NUMPY")):  # numpy would then suggest unpickling it
        raise data_error(f"{path} is not a .npz file (not a zip archive of arrays): {_HOW}")
    try:
        content = np.load(path, allow_pickle=False)
        if not isinstance(content, np.lib.npyio.NpzFile):  # a .npy: one unnamed array
            raise ValueError(f"it holds one unnamed array of shape {np.shape(content)}")
        with content:
            return {key: content[key] for key in content.files}
    except Exception as exc:  # BadZipFile, ValueError (pickles, object arrays), OSError, EOFError
        raise data_error(f"{path} is not a readable .npz ({describe(exc)}): {_HOW}") from None


def read_npz(path: Path, resolution: int) -> tuple:
    """``(x_labeled, y_labeled, x_unlabeled, x_test, y_test, class_names)`` of the file at ``path``,
    checked and resized (module docstring rules)."""
    arrays = load_arrays(path)
    missing = [k for k in REQUIRED if k not in arrays]
    unknown = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        what = f"misses key {missing[0]!r}" if missing else f"has unexpected key {unknown[0]!r}"
        raise data_error(
            f"{path} {what}: expected keys {', '.join(REQUIRED)} and optionally "
            f"{', '.join(OPTIONAL)}; {_HOW}"
        )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise data_error(f"{path} has only one of x_test and y_test: give both, or neither")
    x_labeled = _images(path, "x_labeled", arrays["x_labeled"], resolution)
    y_labeled = _labels(path, "y_labeled", arrays["y_labeled"], len(x_labeled))
    names = _class_names(path, arrays, y_labeled)
    _in_range(path, "y_labeled", y_labeled, len(names))
    absent = sorted(set(range(len(names))) - set(y_labeled.tolist()))
    if absent or len(names) < 2:
        problem = f"class {absent[0]} has no labeled image" if absent else "there is one class"
        k = f"K = {len(names)}"
        if "class_names" not in arrays:  # a stray large label made K, not the user's classes
            largest = int(np.argmax(y_labeled))
            k += f": the largest label + 1, y_labeled[{largest}] = {int(y_labeled[largest])}"
        raise data_error(
            f"{path}: {problem}, but y_labeled must use every class 0..K-1 with K >= 2 "
            f"({k}); renumber the labels or fix class_names"
        )
    x_unlabeled = _images(path, "x_unlabeled", arrays["x_unlabeled"], resolution)
    if "x_test" in arrays:
        x_test = _images(path, "x_test", arrays["x_test"], resolution)
        y_test = _labels(path, "y_test", arrays["y_test"], len(x_test))
        _in_range(path, "y_test", y_test, len(names))
    else:
        x_test = np.zeros((0, resolution, resolution, 3), np.uint8)
        y_test = np.zeros(0, np.int64)
    return x_labeled, y_labeled, x_unlabeled, x_test, y_test, names
