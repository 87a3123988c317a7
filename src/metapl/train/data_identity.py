"""Which data a run trains on: a fingerprint of its split, for the checks that compare two
(every rank of a torchrun run against rank 0's, :mod:`metapl.train.rank_checks`; a resumed run
against its checkpoint, :func:`check_same_data_as_checkpoint`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from metapl.data.splits import SSLSplit
from metapl.errors import CheckpointError
from metapl.reduced.precompute import fingerprint_images

DATA_KEY = "data"
"""Where the engine stores :func:`data_record` in the checkpoint."""


def data_record(split: SSLSplit) -> dict:
    """What a checkpoint records of its run's data: the split's fingerprint, and its sizes to
    name in a refusal."""
    return {
        "fingerprint": split_fingerprint(split),
        "labeled": len(split.y_labeled),
        "unlabeled": len(split.x_unlabeled),
        "test": len(split.y_test),
    }


def check_same_data_as_checkpoint(saved: dict, record: dict, path: Path | str) -> None:
    """A :class:`CheckpointError` unless the checkpoint ``saved`` was written by a run on the data
    of ``record`` (:func:`data_record`). Why: the split and every batch are functions of the data
    (its files, their order, the labels), so a file deleted or added between a run's stop and its
    resume would change which images are labeled halfway through, without a word. A checkpoint
    written before metapl recorded its data has nothing to compare and resumes."""
    then = saved.get(DATA_KEY)
    if not isinstance(then, dict) or then.get("fingerprint") == record["fingerprint"]:
        return
    sizes = ("labeled", "unlabeled", "test")

    def described(r: dict) -> str:  # (a damaged record names what it lacks as ?)
        n = [f"{r[k]:,}" if isinstance(r.get(k), int) else "?" for k in sizes]
        return f"{n[0]} labeled, {n[1]} unlabeled and {n[2]} test images"

    same = all(then.get(k) == record[k] for k in sizes)
    change = (
        f"as many images, {described(record)}, but other files, pixels or labels"
        if same
        else f"then {described(then)}, now {described(record)}"
    )
    raise CheckpointError(
        f"{path} was written by a run on other data than this run loaded ({change}): its "
        "split and batches would change halfway through; resume with the data as it was, or "
        "train into another --out"
    )


def split_fingerprint(split: SSLSplit) -> str:
    """sha256 identifying a split: its labels, its images, the tuning rows and the class names.
    Images in memory count by :func:`~metapl.reduced.precompute.fingerprint_images` (hashed in
    full up to 512 MB, else sampled rows); image files by their paths (:func:`_images_identity`),
    not their decoded pixels, which another machine's decoder may round differently."""
    digest = hashlib.sha256(b"metapl-split-v1\n")
    for images, labels in (
        (split.x_labeled, split.y_labeled),
        (split.x_unlabeled, None),
        (split.x_tune, split.y_tune),
        (split.x_test, split.y_test),
    ):
        digest.update(_images_identity(images).encode())
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


def _images_identity(images) -> str:
    """Images in memory by their pixels; image files by their paths below the dataset's folder
    (``root``, where the reader has one; else the class folder and the file name)."""
    paths = getattr(images, "paths", None)
    if not isinstance(paths, list):
        return fingerprint_images(images)
    shape = tuple(getattr(images, "shape", (len(paths),)))
    root = getattr(images, "root", None)
    # the paths the readers make are the root's, then the rest: cut by string first (ImageNet's
    # 1.28 million Path objects took 8 s at every start of a run)
    prefix = None if root is None else os.path.join(str(root), "")
    names = "\n".join(
        p[len(prefix) :].replace(os.sep, "/")
        if prefix is not None and isinstance(p, str) and p.startswith(prefix)
        else _below(Path(p), root)
        for p in paths
    )
    return hashlib.sha256(f"files|{shape}\n{names}".encode()).hexdigest()


def _below(path: Path, root) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return "/".join(path.parts[-2:])
