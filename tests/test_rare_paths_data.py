"""Data readers' defects that a coverage run of the whole suite found unexercised: a CIFAR-10 batch
whose labels are ragged, folders that cannot be listed, an SVHN file whose variables cannot be
listed, a precomputed-distributions sidecar that is no JSON, a system without posix_fallocate or
sched_getaffinity, and the image decoder's state in a forked child.

Root can list any folder, so a folder that cannot be listed is simulated (os.scandir refusing
that one path, as it does for another user's folder). Each test says what would break it."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from fake_datasets import _Py2BytesPickler, write_svhn_mat
from PIL import Image
from torch import nn

from metapl.data import cifar, decoding, folder, own, svhn
from metapl.errors import DataError
from metapl.reduced.precompute import load_distributions, precompute_distributions, sidecar_path


def refuse_listing(monkeypatch, refused: Path) -> None:
    """os.scandir raises PermissionError for ``refused`` and works for every other folder."""
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == refused:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def write_batch(path: Path, batch: dict) -> None:
    """A CIFAR-10 batch file (Python 2 pickle) holding ``batch`` as it is."""
    with path.open("wb") as f:
        _Py2BytesPickler(f, protocol=2).dump(batch)
    data = path.read_bytes().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(data)


def test_a_cifar_batch_with_ragged_labels_is_one_line(tmp_path):
    """Labels that numpy cannot make an array of (a ragged list) count as no labels: one line naming
    the file and the counts (`cifar.read_batch`). Would break: numpy's ValueError about an
    "inhomogeneous shape" as a traceback."""
    path = tmp_path / "data_batch_1"
    rows = np.zeros((2, 3072), dtype=np.uint8)
    write_batch(path, {b"data": rows, b"labels": [[1, 2], [3]]})
    with pytest.raises(DataError) as info:
        cifar.read_batch(path)
    assert str(info.value).startswith(f"{path} has 0 labels for 2 images: expected a pickled dict")


def test_an_unlabeled_subfolder_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch):
    """A subfolder of the unlabeled folder that cannot be listed: one line naming it and why
    (`folder.list_images`). Would break: a PermissionError traceback midway through the walk."""
    root = tmp_path / "unlabeled"
    (root / "locked").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "a.png")
    assert folder.list_images(root) == ["a.png"]
    refuse_listing(monkeypatch, root / "locked")
    with pytest.raises(DataError) as info:
        folder.list_images(root)
    assert str(info.value) == (
        f"{root / 'locked'} cannot be listed (PermissionError: [Errno 13] Permission denied: "
        f"'{root / 'locked'}')"
    )


def test_a_test_folder_of_your_own_data_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch):
    """Your own data's test/ folder that cannot be listed: one line naming it and why
    (`own._subfolders`). Would break: a PermissionError traceback after the labeled and unlabeled
    images were listed."""
    root = tmp_path / "data"
    for sub in ("labeled/cat", "labeled/dog", "unlabeled", "test/cat"):
        (root / sub).mkdir(parents=True)
    for i, sub in enumerate(("labeled/cat", "labeled/dog", "unlabeled", "test/cat")):
        Image.new("RGB", (4, 4), (i * 50, 0, 0)).save(root / sub / f"{i}.png")
    assert len(own.folder_split(root, resolution=4).y_test) == 1
    refuse_listing(monkeypatch, root / "test")
    with pytest.raises(DataError) as info:
        own.folder_split(root, resolution=4)
    assert str(info.value).startswith(f"{root / 'test'} cannot be listed (PermissionError: ")


def test_svhn_variables_are_listed_from_the_file_read_when_whosmat_fails(tmp_path, monkeypatch):
    """A .mat without X: the error lists the file's variables (scipy's whosmat); should whosmat fail
    on the file just read, the variables loadmat kept are listed instead (`svhn.read_mat`). Would
    break: whosmat's exception as a traceback in place of the one line."""
    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(path, {"images": np.zeros((2, 2), np.uint8), "y": np.ones((2, 1), np.uint8)})
    with pytest.raises(DataError, match=r"has variables \['images', 'y'\], not 'X' and 'y'"):
        svhn.read_mat(path)

    def broken(*args, **kwargs):
        raise ValueError("whosmat failed")

    monkeypatch.setattr(scipy.io, "whosmat", broken)
    with pytest.raises(DataError) as info:
        svhn.read_mat(path)
    assert str(info.value).startswith(f"{path} has variables ['y'], not 'X' and 'y': expected")
    write_svhn_mat(path, 3)  # a good file is read without whosmat
    assert svhn.read_mat(path)[0].shape == (3, 32, 32, 3)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(12, 4, 4, 1), dtype=np.uint8)


def test_a_sidecar_that_is_not_json_is_one_line_and_nothing_is_overwritten(model, images, tmp_path):
    """A precomputed-distributions sidecar that is no JSON (truncated by a crash, hand-edited): one
    line saying how to redo it, when loading and when resuming; neither file is touched
    (`precompute._read_sidecar`). Would break: a JSONDecodeError traceback, or the .npy
    rewritten."""
    path = tmp_path / "teacher.npy"
    precompute_distributions(model, images, path, batch_size=4, progress=False)
    side = sidecar_path(path)
    side.write_text('{"format_version": 1, "num_im')
    before = path.read_bytes(), side.read_bytes()
    message = (
        rf"{side} is unreadable \(JSONDecodeError: .*\); delete {path} and {side.name} and run "
        "precompute_distributions again"
    )
    with pytest.raises(DataError, match=message):
        load_distributions(path)
    with pytest.raises(DataError, match=message):
        precompute_distributions(model, images, path, batch_size=4, progress=False)
    assert (path.read_bytes(), side.read_bytes()) == before


@pytest.mark.parametrize("text", ["[]", '{"format_version": 1}'], ids=["a-list", "keys-missing"])
def test_a_sidecar_without_its_keys_is_one_line(model, images, tmp_path, text):
    """A sidecar that is JSON but not an object of the expected keys: one line listing the keys it
    must hold (`precompute._read_sidecar`). Would break: a KeyError or TypeError traceback."""
    path = tmp_path / "teacher.npy"
    precompute_distributions(model, images, path, batch_size=4, progress=False)
    side = sidecar_path(path)
    side.write_text(text)
    with pytest.raises(DataError) as info:
        load_distributions(path)
    assert str(info.value) == (
        f"{side} lacks the keys format_version, model_fingerprint, data_fingerprint, num_images, "
        f"num_classes, temperature, completed_rows; delete {path} and {side.name} and run "
        "precompute_distributions again"
    )


def test_without_posix_fallocate_the_distributions_are_written_all_the_same(
    model, images, tmp_path, monkeypatch
):
    """macOS and Windows have no posix_fallocate: the .npy stays sparse and the rows are written as
    everywhere (`precompute._reserve_disk_space`). Would break: an AttributeError there."""
    monkeypatch.delattr(os, "posix_fallocate")
    path = tmp_path / "teacher.npy"
    out = precompute_distributions(model, images, path, batch_size=4, progress=False)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        expected = torch.softmax(model(x), dim=-1).numpy()
    np.testing.assert_allclose(np.load(path), expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(out, np.load(path))
    assert json.loads(sidecar_path(path).read_text())["completed_rows"] == 12


def test_without_sched_getaffinity_every_core_counts(monkeypatch):
    """Off Linux there is no sched_getaffinity: the usable cores are os.cpu_count()
    (`decoding.usable_cores`), and CPU runs take threads from them less the busy ones
    (`cpu_threads.idle_cores_threads`). Would break: an AttributeError on macOS and Windows."""
    from metapl import cpu_threads

    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert decoding.usable_cores() == 6
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda: 2.2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert cpu_threads.idle_cores_threads() == 4  # round(6 - 2.2)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert decoding.usable_cores() == 1


def test_a_forked_child_forgets_its_parents_decoding_pool(monkeypatch):
    """After a fork the child holds the parent's pool object without its threads: it drops it and
    takes a fresh lock, to make its own pool at its first decode (`decoding._forget_pool_in_child`,
    run by os.register_at_fork in the child; called directly here). Would break: a forked worker's
    first decode waiting forever on threads that are not there, or on a lock held at the fork."""
    held = threading.Lock()
    held.acquire()  # as if a thread of the parent held it at the fork
    monkeypatch.setattr(decoding, "_pool", object())
    monkeypatch.setattr(decoding, "_pool_threads", 8)
    monkeypatch.setattr(decoding, "_lock", held)
    decoding._forget_pool_in_child()
    assert decoding._pool is None and decoding._pool_threads == 0
    assert decoding._lock is not held and decoding._lock.acquire(blocking=False)
    decoding._lock.release()
