"""The image convention shared by every reader, and the checks they all make.

Convention: images are ``uint8`` numpy arrays in **NHWC** order, ``[N, H, W, 3]`` RGB (digits: one
gray channel, ``[N, 8, 8, 1]``), one array per split (CIFAR-10, SVHN) or a lazy view with the same
indexing (ImageNet, :class:`metapl.data.imagenet.LazyImages`). NHWC is what PIL decodes and what the files hold once
un-planed, and uint8 keeps CIFAR-10 + SVHN-extra in memory at a quarter of float32. Labels are
``int64`` numpy arrays ``[N]`` in ``0 .. num_classes - 1``.

Models and augmentation take float32 tensors in NCHW in ``[0, 1]``: :func:`to_tensor_nchw` is the one
conversion, done per batch so the dataset itself never lives in float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from metapl.errors import DataError


def data_error(message: str) -> DataError:
    """A :class:`DataError` whose message is one line (the CLI prints it as one line)."""
    return DataError(" ".join(message.split("\n")).strip())


def describe(exc: BaseException) -> str:
    """A short one-line description of a low-level read failure, to append to a message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def to_tensor_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` (or one ``[H, W, C]`` image) -> float32 ``[N, C, H, W]`` in ``[0, 1]``."""
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise TypeError(f"to_tensor_nchw expects uint8 images, got {array.dtype}")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"to_tensor_nchw expects [N, H, W, C] images, got shape {array.shape}")
    # permute is a view; the float conversion makes the one copy, dense but in the permuted
    # (channels_last) strides.
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div_(255.0)


def check_labels(
    labels: np.ndarray, num_classes: int, source: Path | str, expected: str
) -> np.ndarray:
    """Labels as int64 ``[N]`` in ``0 .. num_classes - 1``, or a DataError naming ``source``."""
    array = np.asarray(labels)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise data_error(
            f"{source} has malformed labels (shape {array.shape}, dtype {array.dtype}): "
            f"expected {expected}; re-download or re-extract the file"
        )
    array = array.astype(np.int64, copy=False)
    bad = (array < 0) | (array >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise data_error(
            f"{source} has label {int(array[first])} at index {first}, outside 0..{num_classes - 1}: "
            f"expected {expected}; re-download or re-extract the file"
        )
    return array
