"""Checks that the ranks of a torchrun run work on the same things, made before the first step.

Each rank loads the data and looks for the checkpoint itself, and rank 0 alone writes the run
folder that every rank reads: ranks on machines with folders or dataset copies of their own would
train apart, or wait in collectives the others never make. Each check is a ConfigError on every
rank (docs/multi-gpu.md "Start-up").
"""

from __future__ import annotations

import hashlib

import numpy as np

from metapl.data.splits import SSLSplit
from metapl.distributed import DataParallel
from metapl.errors import ConfigError
from metapl.reduced.precompute import fingerprint_images


def check_same_data(dp: DataParallel, split: SSLSplit) -> None:
    """Under torchrun, a ConfigError on every rank unless every rank loaded rank 0's data: each
    trains on its slice of batches indexed into the images it loaded, so another copy of the
    dataset (a file more or less, other labels) would train on other images than the ones meant,
    or fail mid-run with an index out of range."""
    if not dp.enabled:
        return
    mine = _split_fingerprint(split)
    same = mine == dp.broadcast_object(mine)
    if not dp.any_rank(not same):
        return
    sizes = (
        f"{len(split.y_labeled)} labeled, {len(split.x_unlabeled)} unlabeled and "
        f"{len(split.y_test)} test images"
    )
    which = (
        f"rank {dp.rank} loaded {sizes}, which differ from rank 0's"
        if not same
        else f"rank {dp.rank} loaded rank 0's ({sizes}) and another rank other data"
    )
    raise ConfigError(
        f"the ranks loaded different data: {which}; every rank must read the same dataset (on "
        "several machines, identical copies)"
    )


def _split_fingerprint(split: SSLSplit) -> str:
    """sha256 identifying a split: its labels, its images (each set by
    :func:`~metapl.reduced.precompute.fingerprint_images`: hashed in full up to 512 MB, else by
    sampled rows and file names), the tuning rows and the class names."""
    digest = hashlib.sha256(b"metapl-split-v1\n")
    for images, labels in (
        (split.x_labeled, split.y_labeled),
        (split.x_unlabeled, None),
        (split.x_tune, split.y_tune),
        (split.x_test, split.y_test),
    ):
        digest.update(fingerprint_images(images).encode())
        if labels is not None:
            digest.update(f"|{labels.shape}|{labels.dtype}|".encode())
            digest.update(np.ascontiguousarray(labels).tobytes())
    rows = split.tune_in_unlabeled
    digest.update(
        repr(
            (
                split.num_classes,
                split.name,
                split.class_names,
                split.tune_in_labeled,
                None if rows is None else np.asarray(rows).tolist(),
            )
        ).encode()
    )
    return digest.hexdigest()


def check_ranks_agree(dp: DataParallel, seen: bool, what: str) -> None:
    """Under torchrun, a ConfigError on every rank unless all ranks or none see ``what``."""
    if not dp.enabled or not (dp.any_rank(seen) and dp.any_rank(not seen)):
        return
    here, there = ("sees", "does not") if seen else ("does not see", "does")
    raise ConfigError(
        f"the ranks see different run folders: rank {dp.rank} {here} {what} and another rank "
        f"{there}; every rank must see the same --out folder (on several machines, put it on a "
        "file system they share)"
    )
