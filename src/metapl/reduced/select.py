"""Unlabeled-data selection: the top-K images per class by the large teacher's confidence.

Section 4.2: "we use the pre-trained teacher to assign class distributions to images ... and then
keep K images with highest probabilities for each class" (K = 50,000 CIFAR-10, 35,000 SVHN, 12,800
ImageNet). Semantics implemented here, following Noisy Student's data balancing:

* For each class ``c`` **all** images are ranked by ``probs[:, c]`` (not only those whose argmax is
  ``c``) and the first ``k`` are kept. An image may therefore be kept for several classes; such
  duplicates are kept by default (each copy is a training example of its class). ``unique=True``
  keeps each image once, for the class where its probability is highest among the classes that
  selected it (ties: the lower class index); the other classes then keep fewer than ``k``.
* Ranking is by ``(-probability, image index)``: ties go to the lower index, so the selection is
  deterministic whatever the partitioning algorithm does.
* ``k > N`` cannot fill a class. ``balance="none"`` keeps the ``N`` ranked images;
  ``balance="duplicate"`` repeats a class's ranked selection cyclically up to ``k`` (Noisy Student
  duplicates images of classes with too few). The same applies to classes left short by
  ``unique=True``; a class left with no image stays empty.

Results are int64 image indices grouped by class (class 0's selection first), each class in rank
order, with the class each index was selected for.

Memory: ``probs`` may be a read-only memmap of ``[1.28M, 1000]`` float32 (5 GB). Columns of a C-order
array are strided, so reading one class column touches every page of the file; instead a block of
classes (``block_bytes``, default 256 MB) is copied into RAM in one row-order pass, and each column
of the block is then ranked with ``np.partition`` in O(N).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from metapl.data.arrays import data_error
from metapl.errors import ConfigError

Balance = Literal["none", "duplicate"]
BALANCE_MODES = ("none", "duplicate")

BLOCK_BYTES = 256 * 2**20
"""How many bytes of class columns are copied from ``probs`` at a time."""


def _top_k_column(column: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries, ordered by (-value, index)."""
    n = len(column)
    if k >= n:
        return np.argsort(-column, kind="stable")
    kth = np.partition(column, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(column > kth)  # fewer than k of them
    tied = np.flatnonzero(column == kth)[: k - len(above)]  # ties at the cut: lowest indices
    chosen = np.sort(np.concatenate([above, tied]))
    # Stable sort of index-ordered candidates: equal values stay in index order.
    return chosen[np.argsort(-column[chosen], kind="stable")]


def _per_class_top(probs: np.ndarray, take: int, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """``[C, take]`` ranked indices and their scores, reading ``probs`` a block of classes at a time."""
    n, num_classes = probs.shape
    indices = np.empty((num_classes, take), dtype=np.int64)
    scores = np.empty((num_classes, take), dtype=probs.dtype)
    per_block = max(1, block_bytes // max(1, n * probs.dtype.itemsize))
    for c0 in range(0, num_classes, per_block):
        c1 = min(c0 + per_block, num_classes)
        block = np.array(probs[:, c0:c1])  # one sequential pass over the (memory-mapped) rows
        for j in range(c1 - c0):
            column = block[:, j]
            if not np.isfinite(column).all():
                row = int(np.flatnonzero(~np.isfinite(column))[0])
                raise data_error(
                    f"the class probabilities are not finite (row {row}, class {c0 + j}): "
                    "precompute them again"
                )
            top = _top_k_column(column, take)
            indices[c0 + j] = top
            scores[c0 + j] = column[top]
    return indices, scores


def _keep_best_class(indices: np.ndarray, scores: np.ndarray) -> list[np.ndarray]:
    """Per class, its selection without images that score higher for another class."""
    num_classes, take = indices.shape
    flat, flat_scores = indices.ravel(), scores.ravel()
    classes = np.repeat(np.arange(num_classes), take)
    # lexsort: last key first -> by image, then highest score, then lowest class.
    order = np.lexsort((classes, -flat_scores, flat))
    first = np.ones(len(order), dtype=bool)
    first[1:] = flat[order[1:]] != flat[order[:-1]]
    keep = np.zeros(len(order), dtype=bool)
    keep[order[first]] = True
    keep_by_class = keep.reshape(num_classes, take)
    return [indices[c][keep_by_class[c]] for c in range(num_classes)]


def top_k_assignments(
    probs: np.ndarray,
    k: int,
    *,
    unique: bool = False,
    balance: Balance = "none",
    block_bytes: int = BLOCK_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, assigned_class)``: the top-``k`` images of every class, grouped by class.

    ``probs`` is ``[N, C]`` (numpy array or memmap). See the module docstring for ``unique``,
    ``balance`` and the tie-breaking rule. Both results are int64 and of equal length.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k (images kept per class) must be an integer >= 1, got {k!r}")
    if balance not in BALANCE_MODES:
        raise ConfigError(f"balance must be one of {', '.join(BALANCE_MODES)}, got {balance!r}")
    if getattr(probs, "ndim", None) != 2 or not np.issubdtype(probs.dtype, np.floating):
        raise data_error(
            f"class probabilities must be a float [N, C] array, got "
            f"{getattr(probs, 'dtype', type(probs).__name__)} {getattr(probs, 'shape', '')}"
        )
    n, num_classes = probs.shape
    if n == 0 or num_classes == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)

    indices, scores = _per_class_top(probs, min(int(k), n), block_bytes)
    per_class = _keep_best_class(indices, scores) if unique else list(indices)
    if balance == "duplicate":
        per_class = [np.resize(sel, k) if 0 < len(sel) < k else sel for sel in per_class]
    counts = [len(sel) for sel in per_class]
    assigned = np.repeat(np.arange(num_classes, dtype=np.int64), counts)
    return np.concatenate(per_class).astype(np.int64, copy=False), assigned


def top_k_per_class(
    probs: np.ndarray,
    k: int,
    *,
    unique: bool = False,
    balance: Balance = "none",
    block_bytes: int = BLOCK_BYTES,
) -> np.ndarray:
    """The int64 image indices of :func:`top_k_assignments`, grouped by class."""
    return top_k_assignments(probs, k, unique=unique, balance=balance, block_bytes=block_bytes)[0]
