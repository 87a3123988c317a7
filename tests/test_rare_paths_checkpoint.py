"""Checkpoint, resume and training-loop guards that a coverage run of the whole suite found
unexercised: a folder that cannot be opened for its fsync, a damaged zip header, an unpickling
error in torch's other wording, the resume fingerprint of sets and torch values, an interrupt
that crosses a process boundary, a metrics log used after close, and the batch-size guard of a
data-parallel shard.

Each test says what would break it."""

from __future__ import annotations

import csv
import errno
import os
import pickle
import stat
import struct
from pathlib import Path

import pytest
import torch

from metapl.data.digits import digits_split
from metapl.errors import CheckpointError
from metapl.train import guards
from metapl.train.checkpoint import (
    REQUIRED_KEYS,
    config_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from metapl.train.config import TrainConfig
from metapl.train.data import BatchSource
from metapl.train.metrics_log import MetricsLogger
from metapl.train.stopping import Interrupted


def a_state() -> dict:
    return {**{key: 0 for key in REQUIRED_KEYS}, "w": torch.arange(3.0)}


def test_a_folder_that_cannot_be_opened_for_its_fsync_does_not_fail_the_save(tmp_path, monkeypatch):
    """Where a folder cannot be opened (Windows: os.open of a directory fails), the rename's fsync
    is skipped and the checkpoint is still saved whole (`_fsync_dir` returns where os.open fails).
    Would break: every save failing there, after the file was in place."""
    real_open = os.open

    def no_folders(path, flags, *args, **kwargs):
        if Path(path).is_dir():
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_folders)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, a_state())
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3.0))


def test_a_folder_whose_fsync_fails_does_not_fail_the_save(tmp_path, monkeypatch):
    """Some file systems refuse fsync on a folder (EINVAL): the checkpoint, already renamed into
    place, is kept, and the save succeeds (`_fsync_dir` lets the fsync's OSError pass). Would break:
    a save reported failed (and a run stopped) though its file was complete."""
    real_fsync = os.fsync
    refused = []

    def no_folder_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folder_fsync)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, a_state())
    monkeypatch.undo()
    assert refused, "the folder was never fsynced"
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3.0))


def test_a_damaged_zip_header_is_one_line_naming_the_damage(tmp_path):
    """A record whose compression method is unknown (a damaged central directory): zipfile raises
    NotImplementedError, not BadZipFile; it is a CheckpointError saying the archive is damaged
    (`checkpoint._check_records`, on any error but BadZipFile). Would break: a NotImplementedError
    traceback."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, a_state())
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")  # the first central directory record
    struct.pack_into("<H", data, central + 10, 99)  # its compression method
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == (
        f"checkpoint {path} is corrupt or not a metapl checkpoint (its archive is damaged (That "
        "compression method is not supported)); there is no previous checkpoint to fall back to: "
        "delete it to start this run over, or train into another folder"
    )


def test_an_unpickling_error_in_other_words_than_torchs_is_its_first_line(tmp_path, monkeypatch):
    """torch 2.x words every weights-only failure "Weights only load failed..."; an
    UnpicklingError worded otherwise (another torch version) is reported by its first line
    (`checkpoint._read`; torch.load patched to raise it). Would break: taken for a pickle of
    Python objects, or the whole multi-line text in the one-line error."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, a_state())

    def fails(*args, **kwargs):
        raise pickle.UnpicklingError("invalid load key, 'x'.\nsecond line of torch's text")

    monkeypatch.setattr(torch, "load", fails)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(
        f"checkpoint {path} is corrupt or not a metapl checkpoint (invalid load key, 'x'.); "
    ), message
    assert "second line" not in message and "Python objects" not in message


def test_sets_and_torch_values_have_a_stable_fingerprint():
    """A set in a config hashes as its sorted items, whatever its order, and a torch.device or dtype
    as its text (both in `checkpoint._json_default`): the resume check compares fingerprints across
    processes, where set order and object identity differ. Would break: a resume refused as "a
    different configuration", or a TypeError."""
    letters = "hgfedcba"  # a set's order follows the string hashes, which differ per process
    assert config_fingerprint({"s": set(letters)}) == config_fingerprint({"s": sorted(letters)})
    assert config_fingerprint({"s": frozenset({3, 1})}) == config_fingerprint({"s": [1, 3]})
    assert config_fingerprint({"d": torch.device("cpu"), "t": torch.float32}) == (
        config_fingerprint({"d": "cpu", "t": "torch.float32"})
    )
    assert config_fingerprint({"d": torch.device("cpu")}) != config_fingerprint({"d": "cuda"})
    with pytest.raises(TypeError, match="config value of type object cannot be fingerprinted"):
        config_fingerprint({"x": object()})


@pytest.mark.parametrize("checkpointed", [None, 6])
def test_an_interrupt_crosses_a_process_boundary_whole(checkpointed):
    """Interrupted is rebuilt from its fields when pickled (a worker's error reaching the main
    process, `Interrupted.__reduce__`): same step, total, last checkpoint and message. Would break:
    a TypeError on unpickling (its __init__ takes three arguments, not the message)."""
    stop = Interrupted(7, 10, checkpointed)
    again = pickle.loads(pickle.dumps(stop))
    assert type(again) is Interrupted
    assert (again.step, again.total_steps, again.checkpointed) == (7, 10, checkpointed)
    assert str(again) == str(stop)


def test_the_metrics_log_refuses_a_row_after_close(tmp_path):
    """A log after close is a bug of the caller, and says so, leaving metrics.csv as it was
    (`MetricsLogger.log`'s check of a closed file). Would break: an "I/O operation on closed file"
    from deep inside csv."""
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": 0.5})
    before = (tmp_path / "metrics.csv").read_bytes()
    with pytest.raises(ValueError, match=r"^MetricsLogger\.log after close$"):
        log.log(2, {"loss": 0.25})
    assert (tmp_path / "metrics.csv").read_bytes() == before
    with (tmp_path / "metrics.csv").open(newline="") as f:
        assert list(csv.reader(f))[1:] == [["1", "loss", "0.5"]]


def test_a_value_that_is_finite_after_all_is_described_as_not_finite():
    """_describe names the kinds of non-finite values; called on a value that holds none (a flag
    raised for a value since overwritten), it still says something true (`guards._describe`
    says "is not finite"). Would break: an empty description, "is " with nothing after it."""
    assert guards._describe(torch.tensor([1.0, 2.0])) == "is not finite"
    assert guards._describe(3.0) == "is not finite"
    assert guards._describe(torch.tensor(float("nan"))) == "is nan"
    assert guards._describe(torch.tensor([1.0, float("-inf"), float("nan")])) == (
        "contains -inf and nan"
    )


def test_a_data_parallel_shard_needs_a_batch_size_its_world_divides():
    """Each rank draws its contiguous slice of every batch: a batch of 10 over 3 ranks cannot be cut
    evenly, a ValueError naming both (`BatchSource`'s batch_size check). Would break: ranks training
    on slices of unequal sizes, or a rank dropping examples."""
    cfg = TrainConfig(method="supervised", batch_size=10)
    split = digits_split(0, 5)
    with pytest.raises(ValueError, match=r"^batch_size 10 is not divisible by 3$"):
        BatchSource(split, cfg, (), torch.device("cpu"), shard=(0, 3))
    halves = [BatchSource(split, cfg, (), torch.device("cpu"), shard=(r, 2)) for r in (0, 1)]
    whole = BatchSource(split, cfg, (), torch.device("cpu")).batch(0)
    sliced = [h.batch(0) for h in halves]
    assert [len(b.y_labeled) for b in sliced] == [5, 5]
    assert torch.equal(torch.cat([b.y_labeled for b in sliced]), whole.y_labeled)
