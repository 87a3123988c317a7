"""The full-dataset splits of Section 4.2 and the unlabeled image folder reader, on tiny real-format files.

Sizes are small stand-ins for the paper's (4,000 / 7,300 reserved, 40 of 1,024 shards): every reserved
count is a parameter whose default is the paper's value, checked separately.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from fake_datasets import write_cifar10, write_svhn_mat
from PIL import Image

from metapl.data import cifar, folder, imagenet, splits, svhn
from metapl.data.imagenet import LazyImages
from metapl.errors import ConfigError, DataError


def raises_naming(parts: tuple[str, ...], fn, *args, **kwargs) -> str:
    """Calls fn, expects a one-line DataError whose message contains every one of ``parts``."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message
    return message


# --- unlabeled image folder -----------------------------------------------------------------------


def _save(path: Path, mode: str, color, fmt: str, size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)


def _palette(path: Path) -> None:
    image = Image.new("P", (10, 14), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


# Relative path -> the RGB value every pixel must decode to (PNG is lossless; JPEG within +-2).
EXPECTED = {
    "Z_top.PNG": (1, 2, 3),  # upper case sorts before lower case
    "a-sibling.jpeg": (40, 140, 240),  # '-' sorts before '/': string order of relative paths
    "a/b/c/deep_gray.png": (77, 77, 77),
    "a/b/rgba.png": (90, 80, 70),  # alpha dropped
    "a/palette.png": (10, 200, 30),
    "b/photo.JPG": (200, 100, 50),
    "b/x.Jpeg": (120, 120, 120),  # grayscale JPEG
}


@pytest.fixture
def unlabeled_dir(tmp_path: Path) -> Path:
    root = tmp_path / "unlabeled"
    # Written in an order unrelated to the expected one.
    _save(root / "b" / "x.Jpeg", "L", 120, "JPEG")
    _save(root / "a" / "b" / "rgba.png", "RGBA", (90, 80, 70, 10), "PNG")
    _palette(root / "a" / "palette.png")
    _save(root / "a-sibling.jpeg", "RGB", (40, 140, 240), "JPEG", size=(30, 8))
    _save(root / "a" / "b" / "c" / "deep_gray.png", "L", 77, "PNG", size=(9, 40))
    _save(root / "b" / "photo.JPG", "RGB", (200, 100, 50), "JPEG")
    _save(root / "Z_top.PNG", "RGB", (1, 2, 3), "PNG")
    # Not images, or hidden: skipped.
    (root / "notes.txt").write_text("not an image")
    (root / "b" / "x.gif").write_bytes(b"GIF89a")
    _save(root / ".hidden.png", "RGB", (9, 9, 9), "PNG")
    _save(root / ".cache" / "thumb.png", "RGB", (9, 9, 9), "PNG")
    (root / "b" / "._photo.JPG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "a" / "b" / "c" / "loop").symlink_to(root / "a")  # a cycle: each real folder once
    return root


def test_unlabeled_folder_nested_mixed_modes(unlabeled_dir: Path) -> None:
    images = folder.unlabeled_folder(unlabeled_dir, resolution=6)
    assert isinstance(images, LazyImages) and isinstance(images, folder.FolderImages)
    assert images.paths == [str(unlabeled_dir / r) for r in EXPECTED]
    assert folder.list_images(unlabeled_dir) == list(EXPECTED)
    assert len(images) == len(EXPECTED) and images.shape == (len(EXPECTED), 6, 6, 3)
    batch = images[np.arange(len(EXPECTED))]
    assert batch.dtype == np.uint8 and batch.shape == (len(EXPECTED), 6, 6, 3)
    for i, (name, color) in enumerate(EXPECTED.items()):
        np.testing.assert_allclose(
            batch[i], np.broadcast_to(color, (6, 6, 3)), atol=2, err_msg=name
        )
        np.testing.assert_array_equal(images[i], batch[i])
    assert images[1:3].shape == (2, 6, 6, 3)
    sub = images.subset([4, 0])
    assert isinstance(sub, folder.FolderImages) and sub.paths == [images.paths[4], images.paths[0]]
    # Deterministic: the same list on a second read.
    assert folder.unlabeled_folder(unlabeled_dir, resolution=6).paths == images.paths


def test_unlabeled_folder_follows_linked_folders(unlabeled_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    _save(outside / "linked.png", "RGB", (5, 6, 7), "PNG")
    (unlabeled_dir / "m_link").symlink_to(outside)
    assert "m_link/linked.png" in folder.list_images(unlabeled_dir)


def test_unlabeled_folder_resize_and_crop(tmp_path: Path) -> None:
    _save(tmp_path / "u" / "wide.png", "RGB", (10, 20, 30), "PNG", size=(64, 32))
    a = folder.unlabeled_folder(tmp_path / "u", resolution=16)
    b = folder.unlabeled_folder(tmp_path / "u", resolution=16, crop_fraction=0.5)
    np.testing.assert_array_equal(a[0], imagenet.decode_image(a.paths[0], 16))
    np.testing.assert_array_equal(b[0], imagenet.decode_image(a.paths[0], 16, 0.5))
    with pytest.raises(ConfigError):
        folder.unlabeled_folder(tmp_path / "u", resolution=0)


def test_unlabeled_folder_missing_or_not_a_folder(tmp_path: Path) -> None:
    raises_naming(("missing", "nowhere"), folder.unlabeled_folder, tmp_path / "nowhere", 32)
    (tmp_path / "file.png").write_bytes(b"x")
    raises_naming(("not a folder",), folder.unlabeled_folder, tmp_path / "file.png", 32)


def test_unlabeled_folder_without_images(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "readme.txt").write_text("no images here")
    _save(root / ".hidden.png", "RGB", (1, 1, 1), "PNG")
    message = raises_naming(("no images", str(root)), folder.unlabeled_folder, root, 32)
    assert ".png" in message and ".jpg" in message and ".jpeg" in message


def test_unlabeled_folder_unreadable_image_named_at_read_time(unlabeled_dir: Path) -> None:
    bad = unlabeled_dir / "b" / "broken.png"
    bad.write_bytes(b"this is not a png")
    good = unlabeled_dir / "a" / "palette.png"
    truncated = unlabeled_dir / "b" / "truncated.jpg"
    _save(truncated, "RGB", (3, 3, 3), "JPEG", size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:200])
    images = folder.unlabeled_folder(unlabeled_dir, 8)  # listing does not decode
    for path in (bad, truncated):
        i = images.paths.index(str(path))
        raises_naming(
            (str(path), "not a readable image", str(unlabeled_dir)), images.__getitem__, i
        )
        raises_naming((str(path),), images.__getitem__, np.array([0, i]))
    assert images[images.paths.index(str(good))].shape == (8, 8, 3)


# --- full-dataset splits --------------------------------------------------------------------------


def test_paper_reserved_counts_are_the_defaults() -> None:
    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    assert default(splits.cifar10_full, "num_tune") == 4000
    assert default(splits.svhn_full, "num_tune") == 7300
    assert default(splits.imagenet_full, "tune_fraction") == 40 / 1024
    assert round(1_281_167 * 40 / 1024) == 50_046  # leaves ~1.23M labeled, as the paper says
    for name in ("cifar10-full", "svhn-full", "imagenet-full"):
        assert default(splits.SPLITS[name], "unlabeled_dir") is None


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"), per_batch=10, test=5)  # 50 training


@pytest.mark.parametrize("num_tune", [8, 0])
def test_cifar10_full(cifar_root: Path, num_tune: int) -> None:
    split = splits.load_split("cifar10-full", cifar_root, num_tune=num_tune)
    x, y = cifar.load_cifar10(cifar_root)
    assert split.name == "cifar10-full" and split.num_classes == 10
    # Section 4.2 reserves the tuning examples: final runs never train on them
    np.testing.assert_array_equal(split.x_labeled, x[num_tune:])
    np.testing.assert_array_equal(split.y_labeled, y[num_tune:])
    np.testing.assert_array_equal(split.x_tune, x[:num_tune])
    np.testing.assert_array_equal(split.y_tune, y[:num_tune])
    np.testing.assert_array_equal(split.x_unlabeled, x[num_tune:])  # the non-tuning images
    assert len(split.y_test) == 5
    if num_tune:
        view = split.tuning_view()
        np.testing.assert_array_equal(view.x_labeled, x[num_tune:])
        np.testing.assert_array_equal(view.y_labeled, y[num_tune:])
        np.testing.assert_array_equal(view.x_test, x[:num_tune])
        np.testing.assert_array_equal(view.x_unlabeled, x[num_tune:])
        assert view.name == "cifar10-full-tune" and len(view.y_tune) == 0


def test_cifar10_full_with_unlabeled_folder(cifar_root: Path, unlabeled_dir: Path) -> None:
    split = splits.load_split("cifar10-full", cifar_root, num_tune=4, unlabeled_dir=unlabeled_dir)
    assert isinstance(split.x_unlabeled, folder.FolderImages)
    assert split.x_unlabeled.shape == (len(EXPECTED), 32, 32, 3)
    assert split.x_unlabeled[np.array([0, 3])].shape == (2, 32, 32, 3)
    assert len(split.y_labeled) == 46 and len(split.y_tune) == 4
    assert split.tuning_view().x_unlabeled is split.x_unlabeled


def test_cifar10_full_sizes_checked(cifar_root: Path) -> None:
    message = raises_naming(
        ("cifar-10-batches-py", "only 50", "4001"), splits.cifar10_full, cifar_root
    )
    assert "num_tune" in message
    with pytest.raises(ConfigError, match="^cifar10-full: num_tune must be at least 0, got -1"):
        splits.cifar10_full(cifar_root, num_tune=-1)
    with pytest.raises(ConfigError, match="split 'cifar10-full' has no option 'num_labeled'"):
        splits.load_split("cifar10-full", cifar_root, num_labeled=10)
    raises_naming(("missing",), splits.cifar10_full, cifar_root, num_tune=4, unlabeled_dir="/nope")


@pytest.fixture
def svhn_root(tmp_path: Path) -> Path:
    write_svhn_mat(tmp_path / "train_32x32.mat", 30, seed=0)
    write_svhn_mat(tmp_path / "test_32x32.mat", 5, seed=1)
    write_svhn_mat(tmp_path / "extra_32x32.mat", 12, seed=2)
    return tmp_path


def test_svhn_full(svhn_root: Path) -> None:
    split = splits.load_split("svhn-full", svhn_root, num_tune=7)
    x, y = svhn.load_svhn(svhn_root, "train")
    extra, _ = svhn.load_svhn(svhn_root, "extra")
    assert split.name == "svhn-full" and split.num_classes == 10
    np.testing.assert_array_equal(split.x_labeled, x[7:])
    np.testing.assert_array_equal(split.y_labeled, y[7:])
    np.testing.assert_array_equal(split.x_tune, x[:7])
    np.testing.assert_array_equal(split.x_unlabeled, extra)
    assert len(split.y_test) == 5
    view = split.tuning_view()
    np.testing.assert_array_equal(view.x_labeled, x[7:])
    np.testing.assert_array_equal(view.x_test, x[:7])
    np.testing.assert_array_equal(view.y_test, y[:7])


def test_svhn_full_needs_extra(svhn_root: Path, unlabeled_dir: Path) -> None:
    (svhn_root / "extra_32x32.mat").unlink()
    message = raises_naming(
        ("extra_32x32.mat", "svhn-full", "missing"), splits.load_split, "svhn-full", svhn_root
    )
    assert "unlabeled" in message
    # An unlabeled folder replaces it.
    split = splits.svhn_full(svhn_root, num_tune=7, unlabeled_dir=unlabeled_dir)
    assert split.x_unlabeled.shape == (len(EXPECTED), 32, 32, 3) and len(split.y_labeled) == 23


def test_svhn_full_sizes_checked(svhn_root: Path) -> None:
    raises_naming(("train_32x32.mat", "only 30", "7301", "num_tune"), splits.svhn_full, svhn_root)


IMAGENET_TRAIN = {"n02": 7, "n01": 6, "n03": 7}  # 20 images


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    for split, counts in (("train", IMAGENET_TRAIN), ("val", {"n01": 2, "n03": 1})):
        for wnid, count in counts.items():
            c = sorted(counts).index(wnid)
            for i in range(count):
                size = (20, 12) if i % 2 else (10, 18)
                _save(
                    root / split / wnid / f"{wnid}_{i}.JPEG",
                    "RGB",
                    (30 * c + i, 9, 9),
                    "JPEG",
                    size,
                )
    return root


@pytest.mark.parametrize("tune_fraction,n_tune", [(0.25, 5), (40 / 1024, 1), (0.0, 0)])
def test_imagenet_full(imagenet_root: Path, tune_fraction: float, n_tune: int) -> None:
    options = dict(tune_fraction=tune_fraction, resolution=8)
    split = splits.load_split("imagenet-full", imagenet_root, **options)
    train, val = imagenet.load_imagenet(imagenet_root, resolution=8)
    perm = np.random.RandomState(0).permutation(20)
    rest, tune = perm[n_tune:], perm[:n_tune]
    if n_tune:  # the same rule as the 10% split: the first positions of the seeded permutation
        np.testing.assert_array_equal(tune, splits.labeled_fraction_indices(20, tune_fraction))
    assert split.name == "imagenet-full" and split.num_classes == 3
    assert split.x_labeled.paths == [train.paths[i] for i in rest]
    assert split.y_labeled.tolist() == train.labels[rest].tolist()
    assert split.x_tune.paths == [train.paths[i] for i in tune]
    assert split.y_tune.tolist() == train.labels[tune].tolist()
    assert split.x_unlabeled.paths == [train.paths[i] for i in rest]
    assert split.y_test.tolist() == val.labels.tolist() and split.x_test.paths == val.paths
    assert split.x_labeled[np.arange(3)].shape == (3, 8, 8, 3)
    again = splits.load_split("imagenet-full", imagenet_root, **options)
    assert again.x_labeled.paths == split.x_labeled.paths
    if n_tune:
        view = split.tuning_view()
        assert view.x_labeled.paths == split.x_unlabeled.paths
        assert view.x_test.paths == split.x_tune.paths
    else:
        with pytest.raises(ConfigError):
            split.tuning_view()


def test_imagenet_full_with_unlabeled_folder(imagenet_root: Path, unlabeled_dir: Path) -> None:
    split = splits.load_split(
        "imagenet-full", imagenet_root, resolution=8, unlabeled_dir=str(unlabeled_dir)
    )
    assert split.x_unlabeled.paths == [str(unlabeled_dir / r) for r in EXPECTED]
    assert split.x_unlabeled[0].shape == (8, 8, 3)
    seeded = splits.imagenet_full(imagenet_root, tune_fraction=0.25, resolution=8, seed=3)
    assert seeded.x_tune.paths == [
        imagenet.load_imagenet(imagenet_root, 8)[0].paths[i]
        for i in np.random.RandomState(3).permutation(20)[:5]
    ]


def test_imagenet_full_options_checked(imagenet_root: Path) -> None:
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=rf"tune_fraction must be in \[0, 1\), got {bad}"):
            splits.imagenet_full(imagenet_root, tune_fraction=bad)
    with pytest.raises(ConfigError, match="split 'imagenet-full' has no option 'num_tune'"):
        splits.load_split("imagenet-full", imagenet_root, num_tune=3)
