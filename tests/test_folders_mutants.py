"""Gaps a mutation audit of the image-folder readers found (metapl.data.imagenet, folder, own and
own_npz): the crop fraction reaching every decode, hidden files, the error context that subsets
keep, an empty test/ folder, and the .npz rules (suffix case, folder layout first, byte-string class
names, non-square images). Every test writes a few tiny images into tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fake_datasets import write_imagenet
from PIL import Image

from metapl.data.folder import FolderImages, unlabeled_folder
from metapl.data.imagenet import ImageFolder, LazyImages, decode_image, load_imagenet
from metapl.data.own import folder_split, npz_split
from metapl.data.own_npz import fit, read_npz
from metapl.errors import ConfigError, DataError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _target(path: Path, size: int = 40) -> Path:
    """A lossless PNG: a blue frame around a red centre square half the image's side."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:] = BLUE
    q = size // 4
    pixels[q : size - q, q : size - q] = RED
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_decode_image_crop_fraction_keeps_only_the_centre(tmp_path: Path) -> None:
    """crop_fraction 0.5 resizes the shorter side to resolution / 0.5 and keeps the centre half: the
    red centre fills the output. crop_fraction 1.0 keeps the whole image (blue corners)."""
    path = _target(tmp_path / "t.png")
    centre = decode_image(path, 8, crop_fraction=0.5).astype(int)
    whole = decode_image(path, 8, crop_fraction=1.0).astype(int)
    assert centre.shape == whole.shape == (8, 8, 3)
    assert (centre[..., 0] > 200).all() and (centre[..., 2] < 55).all()
    assert whole[0, 0, 2] > 200 and whole[0, 0, 0] < 55


def test_lazy_subset_keeps_resolution_and_crop_fraction(tmp_path: Path) -> None:
    """A subset (how every split selects its labeled/tuning images) decodes exactly as the parent."""
    path = _target(tmp_path / "t.png")
    images = LazyImages([str(path)], 8, crop_fraction=0.5)
    sub = images.subset([0])
    assert (sub.resolution, sub.crop_fraction) == (8, 0.5)
    np.testing.assert_array_equal(sub[0], images[0])


def test_lazy_images_index_like_an_array(tmp_path: Path) -> None:
    """Like the in-memory arrays: a numpy integer gives one [H, W, 3] image (samplers index with
    numpy ints), and a slice honours its step."""
    paths = [str(_target(tmp_path / f"t{i}.png", 8 + 4 * i)) for i in range(4)]
    images = LazyImages(paths, 8)
    one = images[np.int64(2)]
    assert one.shape == (8, 8, 3)
    np.testing.assert_array_equal(one, decode_image(paths[2], 8))
    every_other = images[1::2]
    assert every_other.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(every_other, np.stack([images[1], images[3]]))


def test_imagenet_val_uses_the_same_crop_fraction(tmp_path: Path) -> None:
    """load_imagenet's crop_fraction applies to val too: test images are cropped like the training
    images (the usual 0.875 evaluation crop)."""
    write_imagenet(tmp_path, {"n01": 1, "n02": 1}, {"n02": 1}, size=(16, 12))
    train, val = load_imagenet(tmp_path, resolution=8, crop_fraction=0.5)
    assert train.images.crop_fraction == val.images.crop_fraction == 0.5
    np.testing.assert_array_equal(val[0][0], decode_image(val.paths[0], 8, crop_fraction=0.5))


def test_imagenet_split_folder_that_is_a_file(tmp_path: Path) -> None:
    """``train`` as a file (a stray archive) is the one-line DataError of a missing split folder, not
    an OS error from listing it."""
    (tmp_path / "train").write_bytes(b"not a folder")
    with pytest.raises(DataError, match="is missing") as info:
        load_imagenet(tmp_path)
    assert str(tmp_path / "train") in str(info.value)


def test_imagenet_folder_skips_hidden_image_files(tmp_path: Path) -> None:
    """macOS resource forks (``._name.JPEG``) are hidden files, not images: listing them would add
    unreadable, mislabeled examples."""
    write_imagenet(tmp_path, {"n01": 2, "n02": 1}, {"n01": 1})
    (tmp_path / "train" / "n01" / "._n01_0000.JPEG").write_bytes(b"\x00\x05\x16\x07resource fork")
    train = ImageFolder(tmp_path / "train")
    assert len(train) == 3 and train.labels.tolist() == [0, 0, 1]
    assert not any(Path(p).name.startswith(".") for p in train.paths)


def test_unlabeled_folder_honours_crop_fraction(tmp_path: Path) -> None:
    """imagenet-full passes its crop_fraction to the unlabeled folder: its images (and subsets of
    them) must be decoded with it, like the labeled ImageNet images; a bad one is checked up front."""
    path = _target(tmp_path / "unlabeled" / "a" / "t.png")
    images = unlabeled_folder(tmp_path / "unlabeled", 8, crop_fraction=0.5)
    expected = decode_image(path, 8, crop_fraction=0.5)
    assert images.crop_fraction == 0.5
    np.testing.assert_array_equal(images[0], expected)
    np.testing.assert_array_equal(images.subset([0])[0], expected)
    assert not np.array_equal(expected, decode_image(path, 8, crop_fraction=1.0))
    with pytest.raises(ConfigError):
        unlabeled_folder(tmp_path / "unlabeled", 8, crop_fraction=0.0)


def test_folder_images_subset_keeps_the_folder_it_names(tmp_path: Path) -> None:
    """The error for an unreadable file names the user's folder (``where``), also when the file is
    read through a subset, as the labeled set is after the tuning rows are moved to its end."""
    bad = tmp_path / "labeled" / "cat" / "broken.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    images = FolderImages([str(bad)], 8, where="the labeled folder MINE")
    with pytest.raises(DataError, match="the labeled folder MINE"):
        images.subset([0])[0]


def _own_folder(root: Path) -> Path:
    for i, name in enumerate(("labeled/a/x.png", "labeled/b/y.png", "unlabeled/u.png")):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(path)
    return root


def test_own_test_folder_without_class_folders_is_an_error(tmp_path: Path) -> None:
    """A test/ folder with no class folders is a mistake (one-line DataError), not a silently empty
    test set that would report no test accuracy."""
    root = _own_folder(tmp_path)
    (root / "test").mkdir()
    (root / "test" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="has no class folders") as info:
        folder_split(root, resolution=8)
    assert str(root / "test") in str(info.value) and "\n" not in str(info.value)


def _npz_arrays(**changes) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(0)
    arrays = {
        "x_labeled": rng.randint(0, 256, (4, 8, 8, 3)).astype(np.uint8),
        "y_labeled": np.array([0, 1, 0, 1]),
        "x_unlabeled": rng.randint(0, 256, (3, 8, 8, 3)).astype(np.uint8),
    }
    arrays.update(changes)
    return arrays


def test_npz_suffix_in_any_letter_case(tmp_path: Path) -> None:
    """``--data-dir DATA.NPZ`` names the file itself, whatever the suffix's letter case."""
    path = tmp_path / "MINE.NPZ"
    with path.open("wb") as f:
        np.savez(f, **_npz_arrays())
    for loader in (npz_split, folder_split):
        split = loader(path, resolution=8)
        assert split.name == "npz" and len(split.y_labeled) == 4


def test_folder_layout_wins_over_a_data_npz(tmp_path: Path) -> None:
    """Dataset ``folder`` reads DIR/data.npz only when DIR has no labeled/: with both, the folder
    layout is the data (module docstring of own_npz)."""
    root = _own_folder(tmp_path)
    np.savez(root / "data.npz", **_npz_arrays())
    split = folder_split(root, resolution=8)
    assert split.name == "folder" and split.class_names == ("a", "b")
    assert len(split.y_labeled) == 2


def test_npz_byte_string_class_names_are_decoded(tmp_path: Path) -> None:
    """class_names saved as a bytes array (dtype S) name the classes 'cat' and 'dog', not "b'cat'"."""
    path = tmp_path / "data.npz"
    np.savez(path, **_npz_arrays(class_names=np.array([b"cat", b"dog"])))
    assert read_npz(path, 8)[-1] == ["cat", "dog"]


def test_npz_non_square_images_with_matching_height_are_resized(tmp_path: Path) -> None:
    """Only images already resolution x resolution skip the resize: [N, 8, 12] at resolution 8 must be
    centre-cropped to 8x8 like any other size (fit), not passed through as 8x12."""
    x = np.random.RandomState(1).randint(0, 256, (4, 8, 12)).astype(np.uint8)
    path = tmp_path / "data.npz"
    np.savez(path, **_npz_arrays(x_labeled=x))
    x_labeled = read_npz(path, 8)[0]
    assert x_labeled.shape == (4, 8, 8, 3)
    expected = fit(Image.fromarray(np.repeat(x[0][..., None], 3, axis=-1)), 8)
    np.testing.assert_array_equal(x_labeled[0], expected)


# --- a second audit (metapl.data.imagenet): what test_readers.py and the tests above let through


def test_lazy_images_crop_fraction_just_above_one_is_refused() -> None:
    """crop_fraction is in (0, 1]: 1.001 would resize the shorter side *below* the resolution."""
    with pytest.raises(ConfigError, match="crop_fraction in"):
        LazyImages([], 8, crop_fraction=1.001)
    assert LazyImages([], 8, crop_fraction=1.0).crop_fraction == 1.0


def test_lazy_images_empty_selection_is_an_empty_batch(tmp_path: Path) -> None:
    """No indices (an empty slice or integer array) give a [0, H, W, 3] uint8 batch, as an array
    would, not a numpy error from stacking nothing."""
    images = LazyImages([str(_target(tmp_path / "t.png"))], 8)
    for index in (np.array([], dtype=np.int64), slice(1, 1), []):
        empty = images[index]
        assert empty.shape == (0, 8, 8, 3) and empty.dtype == np.uint8


def test_imagenet_hidden_class_folder_is_no_class(tmp_path: Path) -> None:
    """A hidden folder in train/ (``.ipynb_checkpoints``, say) holding an image is not a class:
    the class list, and so every label, is the visible folders'."""
    write_imagenet(tmp_path, {"n01": 1, "n02": 1}, {"n01": 1})
    hidden = tmp_path / "train" / ".ipynb_checkpoints"
    hidden.mkdir()
    Image.new("RGB", (6, 4)).save(hidden / "x.JPEG", format="JPEG")
    train, _ = load_imagenet(tmp_path)
    assert train.classes == ["n01", "n02"] and train.labels.tolist() == [0, 1]


def test_imagenet_folder_named_like_an_image_is_not_one(tmp_path: Path) -> None:
    """Only files are images: a sub-folder called ``extra.JPEG`` in a class folder is skipped (it
    would be an example that fails to decode, mid-training)."""
    write_imagenet(tmp_path, {"n01": 1, "n02": 1}, {"n01": 1})
    (tmp_path / "train" / "n01" / "extra.JPEG").mkdir()
    train, _ = load_imagenet(tmp_path)
    assert len(train) == 2 and [Path(p).name for p in train.paths] == [
        "n01_0000.JPEG",
        "n02_0000.JPEG",
    ]
