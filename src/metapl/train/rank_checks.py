"""Checks that the ranks of a torchrun run work on the same things, made before the first step.

Each rank loads the data and looks for the checkpoint itself, and rank 0 alone writes the run
folder that every rank reads: ranks on machines with folders or dataset copies of their own would
train apart, or wait in collectives the others never make. Each check is a ConfigError on every
rank (docs/multi-gpu.md "Start-up").
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from metapl.data.splits import SSLSplit
from metapl.distributed import DataParallel
from metapl.errors import ConfigError
from metapl.train.data_identity import split_fingerprint


def check_same_data(dp: DataParallel, split: SSLSplit, fingerprint: str | None = None) -> None:
    """Under torchrun, a ConfigError on every rank unless every rank loaded rank 0's data: each
    trains on its slice of batches indexed into the images it loaded, so another copy of the
    dataset (a file more or less, other labels) would train on other images than the ones meant,
    or fail mid-run with an index out of range. ``fingerprint``: the split's, if the caller has
    it (:func:`~metapl.train.data_identity.split_fingerprint`; ImageNet's takes 0.5 s)."""
    if not dp.enabled:
        return
    mine = split_fingerprint(split) if fingerprint is None else fingerprint
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


PATIENCE_S = 90.0
"""How long a rank that does not see a file another rank sees looks again before it reports it
(NFS clients trust their cache of missing names for up to 60 s by default)."""


def check_ranks_see(dp: DataParallel, path: Path, what: str) -> bool:
    """Whether ``path`` is there; under torchrun, a ConfigError on every rank unless all ranks see
    it or none does. A rank that does not see it while another does looks again for
    :data:`PATIENCE_S` seconds, listing each folder on the way first: a network file system's
    client may answer a lookup from its cache of names it found missing (NFS: for 30-60 s by
    default), which listing the folder refreshes."""
    seen = path.exists()
    if not dp.enabled or not _disagree(dp, seen):
        return seen
    if not seen:
        seen = _listed_within(path, PATIENCE_S)
    if not _disagree(dp, seen):
        return seen
    here, there = ("sees", "does not") if seen else ("does not see", "does")
    raise ConfigError(
        f"the ranks see different run folders: rank {dp.rank} {here} {what} and another rank "
        f"{there}; every rank must see the same --out folder (on several machines, put it on a "
        "file system they share)"
    )


def _disagree(dp: DataParallel, flag: bool) -> bool:
    # the same answer on every rank, so every rank makes the same collectives after it
    return dp.any_rank(flag) and not dp.all_ranks(flag)


def _listed_within(path: Path, patience: float) -> bool:
    """Whether ``path`` is there within ``patience`` seconds, each folder on the way listed
    before each look (a listing makes a network file system's client ask the server again)."""
    deadline = time.monotonic() + patience
    while True:
        _list_folders_to(path)
        if path.exists():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(1.0, patience))


def _list_folders_to(path: Path) -> None:
    """List each folder from the root down to ``path``'s own."""
    parts = Path(os.path.abspath(path)).parts
    for depth in range(1, len(parts)):
        with contextlib.suppress(OSError):  # no read permission (a lookup may still pass), gone
            os.listdir(Path(*parts[:depth]))
