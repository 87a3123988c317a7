"""metapl.train.data_identity.check_same_data_as_checkpoint: which checkpoints resume on which data,
and what the refusal names (the end-to-end run: tests/test_train_cli.py)."""

from __future__ import annotations

import pytest

from metapl.errors import CheckpointError
from metapl.train.data_identity import DATA_KEY, check_same_data_as_checkpoint

NOW = {"fingerprint": "a" * 64, "labeled": 1000, "unlabeled": 49000, "test": 10000}


def test_the_same_data_or_none_recorded_resumes():
    check_same_data_as_checkpoint({DATA_KEY: dict(NOW)}, NOW, "ck.pt")
    check_same_data_as_checkpoint({}, NOW, "ck.pt")  # an earlier metapl's checkpoint


def test_other_data_of_the_same_size_is_refused_as_other_files_pixels_or_labels():
    then = {**NOW, "fingerprint": "b" * 64}
    with pytest.raises(CheckpointError) as e:
        check_same_data_as_checkpoint({DATA_KEY: then}, NOW, "run/ck.pt")
    assert str(e.value).startswith(
        "run/ck.pt was written by a run on other data than this run loaded (as many images, "
        "1,000 labeled, 49,000 unlabeled and 10,000 test images, but other files, pixels or labels)"
    )
    assert str(e.value).endswith("train into another --out")


def test_other_sizes_are_named_then_and_now_and_a_damaged_record_as_unknown():
    then = {"fingerprint": "b" * 64, "labeled": 1000, "unlabeled": "?!", "test": 10000}
    with pytest.raises(
        CheckpointError,
        match=r"\(then 1,000 labeled, \? unlabeled and 10,000 "
        r"test images, now 1,000 labeled, 49,000 unlabeled and 10,000 test images\)",
    ):
        check_same_data_as_checkpoint({DATA_KEY: then}, NOW, "ck.pt")
