"""Gaps a hand-made mutation audit of the paper's splits (metapl.data.splits) found: cases that
test_readers.py, test_full_splits.py and test_imagenet_fractions.py let through. A tuning split
read as "none", a final run tested on its tuning images, a split with nothing left to label, the
unlabeled folder's crop, and a tuning view that kept stale indices.

Each test writes tiny files in the official formats under pytest's temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fake_datasets import write_cifar10, write_imagenet, write_svhn, write_svhn_mat
from PIL import Image

from metapl.data import cifar, folder, splits, svhn
from metapl.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"), per_batch=6, test=4)  # 30 training


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    """5 training images (3 + 2) and 2 validation images."""
    root = tmp_path_factory.mktemp("imagenet")
    return write_imagenet(root, {"n01": 3, "n02": 2}, {"n01": 1, "n02": 1})


def test_a_negative_num_tune_is_refused_not_taken_for_no_tuning_split(cifar_root):
    """cifar10-4k with num_tune=-1 made an empty tuning slice: a search would then fail later with
    "no tuning split" (or a caller's typo pass unnoticed). Would break: _check_sizes checking only
    the upper bound."""
    with pytest.raises(ConfigError, match=r"num_tune must be in 0\.\.num_labeled-1, got -1 of 10"):
        splits.cifar10_4k(cifar_root, num_labeled=10, num_tune=-1)


def test_the_full_cifar10_and_svhn_splits_test_on_the_test_files_images(cifar_root, tmp_path):
    """Final runs of Section 4.2 report accuracy on test_batch and test_32x32.mat, never on their
    reserved tuning images. Would break: _full_split's x_test taken from the training images (the
    labels still the test file's, so only the images tell)."""
    split = splits.cifar10_full(cifar_root, num_tune=5)
    x_test, y_test = cifar.load_cifar10(cifar_root, train=False)
    np.testing.assert_array_equal(split.x_test, x_test)
    np.testing.assert_array_equal(split.y_test, y_test)

    write_svhn(tmp_path, train=12, test=3)
    write_svhn_mat(tmp_path / "extra_32x32.mat", 4, seed=2)
    split = splits.svhn_full(tmp_path, num_tune=5)
    x_test, y_test = svhn.load_svhn(tmp_path, "test")
    np.testing.assert_array_equal(split.x_test, x_test)
    np.testing.assert_array_equal(split.y_test, y_test)


def test_imagenet_full_whose_tuning_fraction_rounds_to_every_image_is_refused(imagenet_root):
    """5 training images and tune_fraction 0.95: round(4.75) = 5 reserved for tuning would leave no
    labeled image (a final run training on nothing). Would break: the size check asking for
    n_tune images instead of n_tune + 1."""
    with pytest.raises(
        DataError, match=r"has only 5 images, but imagenet-full needs 6.*tune_fraction"
    ):
        splits.imagenet_full(imagenet_root, tune_fraction=0.95, resolution=8)
    split = splits.imagenet_full(imagenet_root, tune_fraction=0.7, resolution=8)  # 4 of 5
    assert len(split.y_tune) == 4 and len(split.y_labeled) == 1


def test_imagenet_full_crops_the_unlabeled_folder_like_the_labeled_images(imagenet_root, tmp_path):
    """crop_fraction applies to the unlabeled folder too (a YFCC100M subset in the paper), so that
    labeled and unlabeled images are framed alike. Would break: the folder read at crop 1.0."""
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    image = np.zeros((16, 16, 3), np.uint8)
    image[4:12, 4:12] = 255  # a white square in a black border: the crop shows no border
    Image.fromarray(image).save(unlabeled / "square.png")
    split = splits.imagenet_full(
        imagenet_root, resolution=8, crop_fraction=0.5, unlabeled_dir=unlabeled
    )
    assert isinstance(split.x_unlabeled, folder.FolderImages)
    assert split.x_unlabeled.crop_fraction == 0.5
    expected = folder.unlabeled_folder(unlabeled, 8, 0.5)[0]
    np.testing.assert_array_equal(split.x_unlabeled[0], expected)
    assert split.x_unlabeled[0].min() > 200  # all of it inside the white square


def test_the_tuning_view_keeps_no_indices_into_the_unlabeled_set_it_replaced(cifar_root):
    """cifar10-4k's tune_in_unlabeled points into the full unlabeled set; the tuning view's
    unlabeled set is another array, so indices kept there would name other images. Would break:
    dataclasses.replace without tune_in_unlabeled=None."""
    split = splits.cifar10_4k(cifar_root, num_labeled=10, num_tune=3)
    assert split.tune_in_unlabeled.tolist() == [7, 8, 9]
    view = split.tuning_view()
    assert view.tune_in_unlabeled is None
    x_train = cifar.load_cifar10(cifar_root)[0]
    np.testing.assert_array_equal(view.x_unlabeled, np.delete(x_train, [7, 8, 9], axis=0))


def test_an_unknown_split_option_lists_the_options_after_data_dir(cifar_root):
    """The error lists what the split's loader takes besides its data folder (given separately,
    as --data-dir). Would break: data_dir listed among the options, as if it could be one."""
    with pytest.raises(ConfigError) as info:
        splits.load_split("cifar10-4k", cifar_root, num_labels=5)
    assert str(info.value) == (
        "split 'cifar10-4k' has no option 'num_labels'; it takes num_labeled, num_tune"
    )


def test_a_file_given_as_the_data_folder_of_a_folder_split_is_named_as_such(cifar_root):
    """cifar10-4k reads a folder: a file in its place is a one-line DataError saying so, before its
    reader looks for batches beside it. Would break: only the npz-reading splits' exception
    applied to every split."""
    batch = cifar_root / "cifar-10-batches-py" / "data_batch_1"
    with pytest.raises(DataError, match=f"--data-dir {batch} is a file; it takes the folder"):
        splits.load_split("cifar10-4k", batch)
