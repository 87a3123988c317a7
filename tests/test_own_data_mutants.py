"""Gaps a mutation audit of the data modules without one found (metapl.data.own, own_npz, arrays,
folder, digits and twomoons): class order and names as the user gave them, hidden files beside
the class folders, and the conventions every reader promises. Files are tiny and written in
tmp_path in the real formats.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits, make_moons
from sklearn.model_selection import train_test_split

from metapl.data import folder as folder_module
from metapl.data.arrays import check_labels, describe, to_tensor_nchw
from metapl.data.digits import digits_split
from metapl.data.folder import list_images, unlabeled_folder
from metapl.data.own import folder_split, npz_split
from metapl.data.twomoons import make_twomoons
from metapl.errors import ConfigError, DataError

SIZE = 4


def _png(path: Path, value: int) -> Path:
    """A constant SIZE x SIZE PNG whose red channel is ``value`` (survives the resize)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (SIZE, SIZE), (value, 0, 0)).save(path)
    return path


def _own(root: Path, classes: tuple[str, ...]) -> Path:
    """labeled/<class>/a.png (red = 10 * position in ``classes``) and one unlabeled image."""
    for i, name in enumerate(classes):
        _png(root / "labeled" / name / "a.png", 10 * i)
    _png(root / "unlabeled" / "u.png", 200)
    return root


# --- metapl.data.own -----------------------------------------------------------------------------


def test_class_folders_sort_as_python_strings_upper_case_first(tmp_path: Path) -> None:
    """Labels follow Python's string order ("Zebra" < "apple"), as documented, so label i means
    the same class on every machine; a case-insensitive sort swapped the labels."""
    root = _own(tmp_path, ("Zebra", "apple"))  # Zebra red 0, apple red 10
    split = folder_split(root, SIZE)
    assert split.class_names == ("Zebra", "apple")
    reds = {int(y): int(x[0, 0, 0]) for x, y in zip(split.x_labeled, split.y_labeled)}
    assert reds == {0: 0, 1: 10}


def test_hidden_image_file_directly_in_labeled_is_skipped(tmp_path: Path) -> None:
    """A hidden file such as macOS's ``._a.png`` beside the class folders is skipped like every
    hidden file, not refused as an image without a class."""
    root = _own(tmp_path, ("cat", "dog"))
    _png(root / "labeled" / "._a.png", 1)
    _png(root / "labeled" / ".b.jpg", 2)
    split = folder_split(root, SIZE)
    assert split.class_names == ("cat", "dog") and len(split.y_labeled) == 2


def test_npz_class_names_keep_the_users_order(tmp_path: Path) -> None:
    """class_names name label i in the order given (["dog", "cat"]: 0 is dog), not sorted."""
    path = tmp_path / "data.npz"
    x = np.zeros((4, SIZE, SIZE, 3), np.uint8)
    np.savez(
        path,
        x_labeled=x,
        y_labeled=np.array([0, 1, 0, 1]),
        x_unlabeled=x,
        class_names=np.array(["dog", "cat"]),
    )
    assert npz_split(path, SIZE).class_names == ("dog", "cat")


# --- metapl.data.arrays --------------------------------------------------------------------------


def test_unreadable_file_whose_name_has_a_newline_is_a_one_line_error(tmp_path: Path) -> None:
    """The CLI prints a DataError as one line: a newline in a file name (legal on Linux) is
    joined into it, not passed on to split the message."""
    bad = tmp_path / "bad\nname.png"
    bad.write_bytes(b"not a png")
    images = unlabeled_folder(tmp_path, SIZE)
    with pytest.raises(DataError) as info:
        images[0]
    message = str(info.value)
    assert "\n" not in message and "bad name.png is not a readable image" in message


def test_describe_is_one_line_and_just_the_type_without_a_message() -> None:
    """describe() (used in messages the CLI prints as one line, e.g. metapl predict's) collapses
    whitespace, and an exception without text is only its type name, without a dangling ': '."""
    assert describe(OSError("disk\nfull\t here")) == "OSError: disk full here"
    assert describe(EOFError()) == "EOFError"
    assert describe(ValueError("  ")) == "ValueError"


def test_check_labels_accepts_an_empty_label_list() -> None:
    """An empty label list ([] unpickles to float64) is no labels, not 'malformed labels'."""
    labels = check_labels(np.asarray([]), 10, "batch", "labels 0..9")
    assert labels.dtype == np.int64 and labels.shape == (0,)


def test_check_labels_names_the_first_bad_label() -> None:
    """With several labels out of range the message points at the first, where a fix starts."""
    with pytest.raises(DataError, match=r"has label 11 at index 1, outside 0\.\.9"):
        check_labels(np.array([3, 11, 0, 12]), 10, "batch", "labels 0..9")


def test_check_labels_gives_int64_vectors_only() -> None:
    """Labels come back as int64 whatever integer type the file stored (the readers' convention),
    and a column of labels [N, 1] is malformed, not passed on."""
    labels = check_labels(np.array([1, 2], np.uint8), 10, "batch", "labels 0..9")
    assert labels.dtype == np.int64 and labels.tolist() == [1, 2]
    with pytest.raises(DataError, match=r"malformed labels \(shape \(3, 1\)"):
        check_labels(np.zeros((3, 1), np.int64), 10, "batch", "labels 0..9")


def test_to_tensor_nchw_refuses_five_dimensional_arrays() -> None:
    """Only [N, H, W, C] or one [H, W, C] image: a 5-D array is a ValueError naming its shape."""
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 2, 2, 3\)"):
        to_tensor_nchw(np.zeros((1, 1, 2, 2, 3), np.uint8))


# --- metapl.data.folder --------------------------------------------------------------------------


def test_unreadable_image_error_names_the_users_folder_for_numpy_indices_too(
    tmp_path: Path,
) -> None:
    """An index taken from a numpy array (np.int64, e.g. a top-K selection) reads like an int: the
    error names the unlabeled folder and PIL's complaint, not the ImageNet layout."""
    _png(tmp_path / "a.png", 1)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not a png")
    images = unlabeled_folder(tmp_path, SIZE)
    for index in (1, np.int64(1), np.array([0, 1])):
        with pytest.raises(DataError) as info:
            images[index]
        message = str(info.value)
        assert message.startswith(f"{bad} is not a readable image (UnidentifiedImageError"), index
        assert f"the unlabeled image folder {tmp_path}" in message, index
        assert "ImageNet" not in message and "re-save the file" in message, index


def test_hidden_folders_under_an_unlabeled_folder_are_skipped(tmp_path: Path) -> None:
    """Hidden folders (a .thumbnails/ cache, .git/) are skipped with everything in them."""
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / ".thumbnails" / "a.png", 2)
    _png(tmp_path / "sub" / ".cache" / "b.png", 3)
    assert unlabeled_folder(tmp_path, SIZE).paths == [str(tmp_path / "a.png")]


def test_a_folder_link_cycle_is_listed_once(tmp_path: Path) -> None:
    """A link back up the tree (sub/loop -> the folder itself) is followed once per real folder,
    so listing ends and each image appears once."""
    _png(tmp_path / "a.png", 1)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert unlabeled_folder(tmp_path, SIZE).paths == [str(tmp_path / "a.png")]


def test_a_dangling_link_named_like_an_image_is_no_image(tmp_path: Path) -> None:
    """Only regular files (or links to one) count: a broken link "gone.png" is not listed (it
    would fail every time it is read)."""
    _png(tmp_path / "a.png", 1)
    (tmp_path / "gone.png").symlink_to(tmp_path / "deleted.png")
    assert unlabeled_folder(tmp_path, SIZE).paths == [str(tmp_path / "a.png")]


def test_linked_folders_are_followed(tmp_path: Path) -> None:
    """A folder linked into the unlabeled folder (data kept on another disk) is read through the
    link, its images named by the link's path."""
    elsewhere = tmp_path / "elsewhere"
    _png(elsewhere / "x.png", 1)
    root = tmp_path / "unlabeled"
    _png(root / "a.png", 2)
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    images = unlabeled_folder(root, SIZE)
    assert images.paths == [str(root / "a.png"), str(root / "linked" / "x.png")]
    assert images[1][0, 0].tolist() == [1, 0, 0]


def test_unlabeled_folder_without_images_is_an_error(tmp_path: Path) -> None:
    """A folder with only hidden and non-image files is a one-line DataError, not an empty set."""
    _png(tmp_path / ".hidden.png", 1)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="has no images") as info:
        unlabeled_folder(tmp_path, SIZE)
    assert str(tmp_path) in str(info.value)


def test_unlabeled_dir_that_is_a_file_says_so(tmp_path: Path) -> None:
    """unlabeled_dir naming a file is "not a folder" with the option to check, not a low-level
    NotADirectoryError from listing it."""
    path = _png(tmp_path / "one.png", 1)
    with pytest.raises(DataError, match="is not a folder: expected a folder of PNG") as info:
        unlabeled_folder(path, SIZE)
    assert str(path) in str(info.value) and "check the unlabeled_dir option" in str(info.value)


# --- metapl.data.digits --------------------------------------------------------------------------


def test_digits_split_is_the_documented_recipe() -> None:
    """The module docstring's recipe, step by step: a seed's split must not change between
    versions (results and checkpoints are tied to it). Test = a stratified train_test_split of 497
    images; K labeled per class from the rest with RandomState(seed), in index order; the T tuning
    images per class drawn next from the unlabeled pool (index order) and appended; rows are the
    8x8 images row-major, intensities 0..16 scaled to 0..255 and rounded."""
    x, y = load_digits(return_X_y=True)
    seed, k, t = 7, 4, 2
    split = digits_split(seed, k, tune_per_class=t)
    rest, test = train_test_split(np.arange(len(y)), test_size=497, stratify=y, random_state=seed)
    rng = np.random.RandomState(seed)
    labeled = rest[
        np.sort(
            np.concatenate([rng.choice(np.flatnonzero(y[rest] == c), k, False) for c in range(10)])
        )
    ]
    pool = np.setdiff1d(rest, labeled)
    tune = pool[
        np.sort(
            np.concatenate([rng.choice(np.flatnonzero(y[pool] == c), t, False) for c in range(10)])
        )
    ]

    def pixels(rows: np.ndarray) -> np.ndarray:
        return np.round(x[rows] * 255 / 16).astype(np.uint8).reshape(-1, 8, 8, 1)

    assert len(test) == 497 and split.y_test.tolist() == y[test].tolist()
    np.testing.assert_array_equal(split.x_test, pixels(test))
    np.testing.assert_array_equal(split.x_labeled, pixels(np.concatenate([labeled, tune])))
    np.testing.assert_array_equal(split.x_tune, pixels(tune))
    np.testing.assert_array_equal(split.x_unlabeled, pixels(np.setdiff1d(pool, tune)))
    assert split.y_labeled.dtype == np.int64 and split.num_classes == 10
    assert split.name == "digits-4pc-2tune-seed7"
    assert split.x_test.dtype == np.uint8 and split.x_test.max() == 255  # 16 -> 255, no wrap


def test_digits_test_set_is_stratified_and_differs_by_seed() -> None:
    """Every class keeps its share of the 497 test images (within one), and seeds split
    differently."""
    y = load_digits().target
    a, b = digits_split(1, 5), digits_split(2, 5)
    expected = np.bincount(y) * 497 / len(y)
    assert np.all(np.abs(np.bincount(a.y_test, minlength=10) - expected) <= 1)
    assert not np.array_equal(a.x_test, b.x_test)


def _bound(call, phrase: str) -> int:
    """The largest value a ConfigError for an out-of-range value names as allowed."""
    with pytest.raises(ConfigError, match=phrase) as info:
        call()
    return int(re.search(rf"{phrase} (\d+)", str(info.value)).group(1))  # type: ignore[union-attr]


def test_digits_labels_and_tune_per_class_bounds_are_exact() -> None:
    """labels_per_class in 1..smallest-1 (some of every class stays unlabeled) and tune_per_class
    in 0..smallest-K-1: each bound named in the error is itself accepted, one more refused."""
    top = _bound(lambda: digits_split(0, 10**6), "between 1 and")
    assert len(digits_split(0, top).y_labeled) == 10 * top
    for bad in (0, top + 1):
        with pytest.raises(ConfigError, match="labels_per_class must be between 1 and"):
            digits_split(0, bad)
    tune_top = _bound(lambda: digits_split(0, 5, 10**6), "between 0 and")
    assert len(digits_split(0, 5, tune_top).y_tune) == 10 * tune_top
    with pytest.raises(ConfigError, match="tune_per_class must be between 0 and"):
        digits_split(0, 5, tune_top + 1)


# --- metapl.data.twomoons ------------------------------------------------------------------------


def test_twomoons_is_figure_1s_data() -> None:
    """2,000 float32 points of make_moons(noise=0.1, random_state=seed), 1,000 per moon; 3 distinct
    labeled points per class drawn with RandomState(seed), sorted; every other point unlabeled."""
    seed = 11
    data = make_twomoons(seed)
    x, y = make_moons(n_samples=2000, noise=0.1, random_state=seed)
    assert data.x.dtype == np.float32 and data.y.dtype == np.int64
    np.testing.assert_array_equal(data.x, x.astype(np.float32))
    assert data.y.tolist() == y.tolist() and np.bincount(data.y).tolist() == [1000, 1000]
    rng = np.random.RandomState(seed)
    drawn = [rng.choice(np.flatnonzero(y == c), 3, replace=False) for c in (0, 1)]
    assert data.labeled.tolist() == np.sort(np.concatenate(drawn)).tolist()
    assert len(set(data.labeled.tolist())) == 6
    assert sorted([*data.labeled.tolist(), *data.unlabeled.tolist()]) == list(range(2000))


def test_a_folder_with_two_names_is_listed_the_same_whatever_the_listing_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real folder b/ and a link a/ -> b/: its images are listed once, under the name a walk in
    sorted order meets first (a/), not under whichever os.scandir happened to return first (its
    order differs between file systems), so indices agree between machines. Was: the listing
    followed os.scandir's order."""
    _png(tmp_path / "b" / "x.png", 1)
    (tmp_path / "a").symlink_to(tmp_path / "b", target_is_directory=True)
    natural = list_images(tmp_path)
    scandir = os.scandir

    class Reversed:
        """os.scandir with its entries in the opposite order."""

        def __init__(self, path: Path) -> None:
            self.inner = scandir(path)

        def __enter__(self):
            return iter(list(self.inner.__enter__())[::-1])

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

    monkeypatch.setattr(folder_module.os, "scandir", Reversed)
    assert list_images(tmp_path) == natural == ["a/x.png"]
