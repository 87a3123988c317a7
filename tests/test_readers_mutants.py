"""Gaps a mutation audit of the dataset readers found: cases the main reader tests (test_readers.py)
let through. Each test writes tiny files in exactly the official formats into tmp_path.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from fake_datasets import random_images, write_cifar_batch
from test_readers import raises_naming

from metapl.data import cifar, splits, svhn
from metapl.errors import ConfigError


def _rows(images: np.ndarray) -> np.ndarray:
    """NHWC images -> CIFAR rows [n, 3072] (R, G, B planes, each row-major)."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


# --- CIFAR-10 -------------------------------------------------------------------------------------


def test_cifar_folder_itself_missing_first_batch_names_the_right_path(tmp_path: Path) -> None:
    """Pointed at ``cifar-10-batches-py`` itself, a missing data_batch_1 is reported in *that* folder
    (not in a doubled ``cifar-10-batches-py/cifar-10-batches-py``): find_dir recognises the folder by
    its name even when its first batch is gone."""
    folder = tmp_path / "cifar-10-batches-py"
    for name in cifar.TRAIN_FILES[1:]:
        write_cifar_batch(folder / name, random_images(2, 0), np.array([0, 1]))
    assert cifar.find_dir(folder) == folder
    message = raises_naming(str(folder / "data_batch_1"), cifar.load_cifar10, folder)
    assert "cifar-10-batches-py/cifar-10-batches-py" not in message


def test_cifar_more_labels_than_images_is_refused(tmp_path: Path) -> None:
    """A batch with more labels than image rows is malformed, not silently truncated or misaligned."""
    path = tmp_path / cifar.FOLDER / cifar.TEST_FILE
    path.parent.mkdir()
    batch = {b"data": _rows(random_images(2, 0)).copy(), b"labels": [0, 1, 2]}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    message = raises_naming("test_batch", cifar.load_cifar10, tmp_path, train=False)
    assert "3 labels for 2 images" in message


def test_cifar_reads_python3_repickle_with_str_keys(tmp_path: Path) -> None:
    """Batches re-pickled under Python 3 may have str keys ('data', 'labels'); they read the same."""
    images = random_images(3, 5)
    path = tmp_path / cifar.FOLDER / cifar.TEST_FILE
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"data": _rows(images).copy(), "labels": [4, 0, 9]}, protocol=4))
    x, y = cifar.load_cifar10(tmp_path, train=False)
    np.testing.assert_array_equal(x, images)
    assert y.tolist() == [4, 0, 9]


def test_cifar_protocol5_fortran_ordered_rows_keep_their_pixels(tmp_path: Path) -> None:
    """A protocol-5 re-pickle of a Fortran-ordered data array is rebuilt with numpy's ``_frombuffer``
    and order 'F': the reader's stand-in must honour the order, or every image is scrambled."""
    images = random_images(4, 6)
    data = np.asfortranarray(_rows(images))
    assert not data.flags.c_contiguous
    path = tmp_path / cifar.FOLDER / cifar.TEST_FILE
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [1, 2, 3, 4]}, protocol=5))
    x, _ = cifar.load_cifar10(tmp_path, train=False)
    np.testing.assert_array_equal(x, images)


@pytest.mark.parametrize(
    "data",
    [np.zeros(3072, np.uint8), np.zeros((2, 3072, 1), np.uint8)],
    ids=["1-d", "3-d"],
)
def test_cifar_data_of_wrong_rank_is_a_data_error(tmp_path: Path, data: np.ndarray) -> None:
    """'data' must be 2-D [n, 3072]: a 1-D or 3-D array is a malformed batch (a one-line DataError),
    not an IndexError or a silently reshaped set of images."""
    path = tmp_path / cifar.FOLDER / cifar.TEST_FILE
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1]}, protocol=2))
    message = raises_naming("test_batch", cifar.load_cifar10, tmp_path, train=False)
    assert "has 'data' of shape" in message


# --- SVHN -----------------------------------------------------------------------------------------


def test_svhn_y_with_extra_columns_is_refused(tmp_path: Path) -> None:
    """'y' must be [N, 1] (or [N]): a [N, 2] label matrix has the right row count but twice the
    labels, and must not be flattened into 2N labels for N images."""
    contents = {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 2), np.uint8)}
    scipy.io.savemat(tmp_path / "train_32x32.mat", contents)
    message = raises_naming("train_32x32.mat", svhn.load_svhn, tmp_path)
    assert "'y' of shape (2, 2)" in message


def test_svhn_images_must_be_32x32(tmp_path: Path) -> None:
    """The cropped digits are 32x32: an X of [64, 64, 3, N] is not format 2 and is refused."""
    contents = {"X": np.zeros((64, 64, 3, 2), np.uint8), "y": np.ones((2, 1), np.uint8)}
    scipy.io.savemat(tmp_path / "train_32x32.mat", contents)
    message = raises_naming("train_32x32.mat", svhn.load_svhn, tmp_path)
    assert "'X' of shape (64, 64, 3, 2)" in message


def test_svhn_unknown_subset_is_a_config_error(tmp_path: Path) -> None:
    """A subset other than train/test/extra is a configuration mistake, reported as such (naming the
    valid ones), not as a missing file."""
    with pytest.raises(ConfigError, match="unknown SVHN subset 'valid'"):
        svhn.load_svhn(tmp_path, "valid")


# --- splits ---------------------------------------------------------------------------------------


def test_split_with_no_labeled_images_says_so(tmp_path: Path) -> None:
    """num_labeled=0 is refused as such, before any file is read, not with a num_tune message about
    a tuning set the user never asked for."""
    for loader in (splits.cifar10_4k, splits.svhn_1k):
        with pytest.raises(ConfigError, match="num_labeled must be at least 1, got 0"):
            loader(
                tmp_path, num_labeled=0, **({"num_tune": 0} if loader is splits.cifar10_4k else {})
            )
