"""Readers and splits on tiny files written in exactly the official formats.

CIFAR-10 batches are written the way the real ones were (Python 2 pickles: str as byte strings, numpy
under ``numpy.core.multiarray``); SVHN with scipy.io.savemat and the real keys and shapes; ImageNet as
small JPEGs in class folders. Every error path must raise a one-line DataError naming the file.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from metapl.data import cifar, imagenet, splits, svhn
from metapl.data.arrays import to_tensor_nchw
from metapl.errors import ConfigError, DataError

PER_BATCH = 20  # images per CIFAR batch file: 100 training, 20 test


# --- writers for the real formats ---------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings, like the pickles in cifar-10-python.tar.gz."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_bytes


def _py2_pickle(obj: object, path: Path) -> None:
    with path.open("wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)
    # numpy 1.x (which wrote the real files) kept _reconstruct in numpy.core.multiarray.
    raw = path.read_bytes().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(raw)


def _cifar_images(start: int, n: int) -> np.ndarray:
    rng = np.random.RandomState(start)
    return rng.randint(0, 256, size=(n, 32, 32, 3)).astype(np.uint8)


def write_cifar_batch(
    path: Path, images: np.ndarray, labels: list[int], py2: bool = True, protocol: int = 2
) -> None:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # R, G, B planes, row-major
    batch = {
        b"batch_label": b"training batch",
        b"labels": labels,
        b"data": np.ascontiguousarray(rows),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    if py2:
        _py2_pickle(batch, path)
    else:
        path.write_bytes(pickle.dumps(batch, protocol=protocol))  # a Python 3 re-pickle


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for b, name in enumerate((*cifar.TRAIN_FILES, cifar.TEST_FILE)):
        start = b * PER_BATCH
        labels = [(start + i) % 10 for i in range(PER_BATCH)]
        write_cifar_batch(
            folder / name,
            _cifar_images(start, PER_BATCH),
            labels,
            py2=b % 2 == 0,
            protocol=5 if b == 1 else 2,
        )
    return tmp_path


def write_svhn(path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A .mat like the real one; returns the NHWC images and the digit labels it should read as."""
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, size=(n, 32, 32, 3)).astype(np.uint8)
    digits = np.arange(n) % 10
    stored = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
    scipy.io.savemat(path, {"X": images.transpose(1, 2, 3, 0), "y": stored})
    return images, digits


@pytest.fixture
def svhn_dir(tmp_path: Path) -> Path:
    write_svhn(tmp_path / "train_32x32.mat", 50, seed=0)
    write_svhn(tmp_path / "test_32x32.mat", 20, seed=1)
    write_svhn(tmp_path / "extra_32x32.mat", 30, seed=2)
    return tmp_path


IMAGENET_TRAIN = {"n02": 7, "n01": 6, "n03": 7}  # unsorted on purpose; 20 images


def _jpeg(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(path, format="JPEG")


@pytest.fixture
def imagenet_dir(tmp_path: Path) -> Path:
    for split, counts in (("train", IMAGENET_TRAIN), ("val", {"n01": 2, "n03": 1})):
        for wnid, count in counts.items():
            c = sorted(counts).index(wnid)
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                size = (40, 24) if i % 2 else (20, 36)  # landscape and portrait
                _jpeg(folder / f"{wnid}_{i:03d}.JPEG", size, 30 * c + i, "L" if i == 1 else "RGB")
            (folder / ".DS_Store").write_bytes(b"not an image")
    return tmp_path


def raises_naming(path_part: str, fn, *args, **kwargs) -> str:
    """Calls fn, expects a one-line DataError that names ``path_part``; returns the message."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert path_part in message, message
    return message


# --- conventions ----------------------------------------------------------------------------------


def test_to_tensor_nchw() -> None:
    images = np.zeros((2, 4, 5, 3), np.uint8)
    images[1, 2, 3] = (255, 0, 51)
    x = to_tensor_nchw(images)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert x[1, :, 2, 3].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert to_tensor_nchw(images[0]).shape == (1, 3, 4, 5)
    with pytest.raises(TypeError):
        to_tensor_nchw(images.astype(np.float32))


# --- CIFAR-10 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar_reads_images_labels_and_order(cifar_dir: Path, point_at_folder: bool) -> None:
    data_dir = cifar_dir / "cifar-10-batches-py" if point_at_folder else cifar_dir
    x, y = cifar.load_cifar10(data_dir, train=True)
    assert x.shape == (5 * PER_BATCH, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and y.tolist() == [i % 10 for i in range(5 * PER_BATCH)]
    # Exact pixels, batch by batch in file order: checks the plane layout and the concatenation.
    for b in range(5):
        np.testing.assert_array_equal(
            x[b * PER_BATCH : (b + 1) * PER_BATCH], _cifar_images(b * PER_BATCH, PER_BATCH)
        )
    x_test, y_test = cifar.load_cifar10(data_dir, train=False)
    np.testing.assert_array_equal(x_test, _cifar_images(5 * PER_BATCH, PER_BATCH))
    assert len(y_test) == PER_BATCH


def test_cifar_missing_batch(cifar_dir: Path) -> None:
    (cifar_dir / "cifar-10-batches-py" / "data_batch_3").unlink()
    message = raises_naming("data_batch_3", cifar.load_cifar10, cifar_dir)
    assert "is missing" in message and "cifar-10-python.tar.gz" in message


def test_cifar_missing_folder_hints_at_tarball(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    message = raises_naming("data_batch_1", cifar.load_cifar10, tmp_path)
    assert "tar xzf" in message


def test_cifar_truncated_batch(cifar_dir: Path) -> None:
    path = cifar_dir / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated" in raises_naming("data_batch_2", cifar.load_cifar10, cifar_dir)


@pytest.mark.parametrize(
    "batch",
    [
        {b"pixels": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]},  # wrong key
        {b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]},  # wrong row length
        {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},  # wrong dtype
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},  # label count
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]},  # label type
        [np.zeros((2, 3072), np.uint8)],  # not a dict
    ],
)
def test_cifar_malformed_batch(cifar_dir: Path, batch: object) -> None:
    _py2_pickle(batch, cifar_dir / "cifar-10-batches-py" / "test_batch")
    raises_naming("test_batch", cifar.load_cifar10, cifar_dir, train=False)


@pytest.mark.parametrize("bad_label", [10, -1])
def test_cifar_label_out_of_range(cifar_dir: Path, bad_label: int) -> None:
    labels = [0] * (PER_BATCH - 1) + [bad_label]
    write_cifar_batch(
        cifar_dir / "cifar-10-batches-py" / "data_batch_5", _cifar_images(0, PER_BATCH), labels
    )
    message = raises_naming("data_batch_5", cifar.load_cifar10, cifar_dir)
    assert f"label {bad_label} at index {PER_BATCH - 1}" in message


def test_cifar_refuses_code_in_pickle(cifar_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (cifar_dir / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": Evil()}, protocol=2)
    )
    raises_naming("test_batch", cifar.load_cifar10, cifar_dir, train=False)
    assert not marker.exists()


# --- SVHN -----------------------------------------------------------------------------------------


def test_svhn_reads_images_and_maps_10_to_0(tmp_path: Path) -> None:
    images, digits = write_svhn(tmp_path / "train_32x32.mat", 23)
    x, y = svhn.load_svhn(tmp_path, "train")
    assert x.shape == (23, 32, 32, 3) and x.dtype == np.uint8 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, images)
    assert y.dtype == np.int64 and y.tolist() == digits.tolist()
    assert y[0] == 0 and y[10] == 0 and y[3] == 3  # stored as 10, 10 and 3


def test_svhn_accepts_double_labels(tmp_path: Path) -> None:
    # MATLAB writes doubles by default; whole-number doubles are still valid labels.
    x = np.zeros((32, 32, 3, 2), np.uint8)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10.0], [4.0]])})
    assert svhn.load_svhn(tmp_path, "test")[1].tolist() == [0, 4]


def test_svhn_missing_file(tmp_path: Path) -> None:
    message = raises_naming("extra_32x32.mat", svhn.load_svhn, tmp_path, "extra")
    assert "is missing" in message and "ufldl.stanford.edu" in message


def test_svhn_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "train_32x32.mat"
    write_svhn(path, 40)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    raises_naming("train_32x32.mat", svhn.load_svhn, tmp_path)


def test_svhn_garbage_file(tmp_path: Path) -> None:
    (tmp_path / "train_32x32.mat").write_bytes(b"<html>404 not found</html>")
    raises_naming("train_32x32.mat", svhn.load_svhn, tmp_path)


@pytest.mark.parametrize(
    "contents",
    [
        {"images": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1), np.uint8)},  # wrong key
        {"X": np.zeros((2, 32, 32, 3), np.uint8), "y": np.ones((2, 1), np.uint8)},  # NHWC, not HWCN
        {"X": np.zeros((32, 32, 3, 2), np.float64), "y": np.ones((2, 1), np.uint8)},  # dtype
        {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1), np.uint8)},  # label count
        {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1.5], [2.0]])},  # fractional
    ],
)
def test_svhn_malformed_file(tmp_path: Path, contents: dict) -> None:
    scipy.io.savemat(tmp_path / "test_32x32.mat", contents)
    raises_naming("test_32x32.mat", svhn.load_svhn, tmp_path, "test")


def test_svhn_wrong_variables_are_named(tmp_path: Path) -> None:
    contents = {"images": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1), np.uint8)}
    scipy.io.savemat(tmp_path / "test_32x32.mat", contents)
    message = raises_naming("test_32x32.mat", svhn.load_svhn, tmp_path, "test")
    assert "has variables ['images', 'y'], not 'X' and 'y'" in message


@pytest.mark.parametrize("bad_label", [0, 11])
def test_svhn_label_out_of_range(tmp_path: Path, bad_label: int) -> None:
    y = np.array([[1], [bad_label]], np.uint8)
    scipy.io.savemat(
        tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": y}
    )
    message = raises_naming("train_32x32.mat", svhn.load_svhn, tmp_path)
    assert f"label {bad_label} at index 1" in message


# --- ImageNet -------------------------------------------------------------------------------------


def test_imagenet_folders(imagenet_dir: Path) -> None:
    train, val = imagenet.load_imagenet(imagenet_dir, resolution=16)
    assert train.classes == ["n01", "n02", "n03"] and val.classes == train.classes
    assert len(train) == 20 and train.labels.tolist() == [0] * 6 + [1] * 7 + [2] * 7
    assert val.labels.tolist() == [0, 0, 2]  # val lacks n02; labels follow the training classes
    assert (
        Path(train.paths[0]).name == "n01_000.JPEG" and Path(train.paths[-1]).name == "n03_006.JPEG"
    )
    image, label = train[1]  # the grayscale one, portrait
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and label == 0
    assert train.images[np.array([0, 7, 19])].shape == (3, 16, 16, 3)
    assert train.images.shape == (20, 16, 16, 3)
    assert train.images[2:5].shape == (3, 16, 16, 3)
    # A flat color survives resize and crop; n01_000 is (0, 255, 7).
    first = train.images[0]
    assert abs(int(first[8, 8, 1]) - 255) <= 3
    with pytest.raises(ConfigError):
        imagenet.ImageFolder(imagenet_dir / "train", crop_fraction=1.5)
    with pytest.raises(ConfigError):
        svhn.load_svhn(imagenet_dir, "valid")
    cropped = imagenet.ImageFolder(imagenet_dir / "train", resolution=12, crop_fraction=0.875)
    assert cropped[3][0].shape == (12, 12, 3)


def test_imagenet_unreadable_jpeg(imagenet_dir: Path) -> None:
    bad = imagenet_dir / "train" / "n02" / "n02_003.JPEG"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    train, _ = imagenet.load_imagenet(imagenet_dir, resolution=16)  # listing does not decode
    index = train.paths.index(str(bad))
    message = raises_naming("n02_003.JPEG", train.__getitem__, index)
    assert "not a readable image" in message


def test_imagenet_truncated_jpeg(imagenet_dir: Path) -> None:
    path = imagenet_dir / "val" / "n03" / "n03_000.JPEG"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        path
    )
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _, val = imagenet.load_imagenet(imagenet_dir, resolution=16)
    raises_naming("n03_000.JPEG", val.images.__getitem__, 2)


def test_imagenet_missing_split(imagenet_dir: Path) -> None:
    for f in (imagenet_dir / "val").rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted((imagenet_dir / "val").iterdir()):
        d.rmdir()
    (imagenet_dir / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    assert "valprep" in raises_naming("val", imagenet.load_imagenet, imagenet_dir)
    raises_naming("train", imagenet.load_imagenet, imagenet_dir / "nowhere")
    # ILSVRC2012_img_train.tar extracted once: one tar per class, not yet unpacked
    train = imagenet_dir / "train"
    for d in sorted(train.iterdir()):
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
        (train / f"{d.name}.tar").write_bytes(b"")
    assert "extract each" in raises_naming("train", imagenet.load_imagenet, imagenet_dir)


def test_imagenet_val_class_not_in_train(imagenet_dir: Path) -> None:
    (imagenet_dir / "val" / "n99").mkdir()
    _jpeg(imagenet_dir / "val" / "n99" / "x.JPEG", (8, 8), 1)
    raises_naming("n99", imagenet.load_imagenet, imagenet_dir)


def test_imagenet_empty_class_folder(imagenet_dir: Path) -> None:
    (imagenet_dir / "train" / "n04").mkdir()
    raises_naming("n04", imagenet.load_imagenet, imagenet_dir)


# --- splits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_labeled,num_tune", [(40, 4), (100, 10), (7, 0)])
def test_cifar_split_first_n_and_last_tune(
    cifar_dir: Path, num_labeled: int, num_tune: int
) -> None:
    split = splits.load_split("cifar10-4k", cifar_dir, num_labeled=num_labeled, num_tune=num_tune)
    x_train, y_train = cifar.load_cifar10(cifar_dir)
    assert split.name == "cifar10-4k" and split.num_classes == 10
    np.testing.assert_array_equal(split.x_labeled, x_train[:num_labeled])
    np.testing.assert_array_equal(split.y_labeled, y_train[:num_labeled])
    np.testing.assert_array_equal(split.x_unlabeled, x_train)
    np.testing.assert_array_equal(split.x_tune, x_train[num_labeled - num_tune : num_labeled])
    np.testing.assert_array_equal(split.y_tune, y_train[num_labeled - num_tune : num_labeled])
    assert len(split.y_test) == PER_BATCH
    if num_tune:
        view = split.tuning_view()
        np.testing.assert_array_equal(view.x_labeled, x_train[: num_labeled - num_tune])
        np.testing.assert_array_equal(view.x_test, split.x_tune)
        assert len(view.y_tune) == 0 and view.name == "cifar10-4k-tune"
        # and a tuning run does not see its evaluation images among the unlabeled ones either
        rest = np.r_[0 : num_labeled - num_tune, num_labeled : len(x_train)]
        np.testing.assert_array_equal(view.x_unlabeled, x_train[rest])


def test_the_paper_splits_are_the_defaults(tmp_path: Path) -> None:
    """README's data table: CIFAR-10 labels the first 4,000 training images and tunes on the last
    400 of them (a tuning run trains on the other 3,600 and sees none of the 400 among the
    unlabeled images); SVHN labels the first 1,000. The other tests pass their sizes, so a changed
    default would have gone unnoticed."""
    from fake_datasets import write_cifar10, write_svhn

    root = write_cifar10(tmp_path / "cifar", per_batch=802, test=10)  # 4,010 training images
    x_train, y_train = cifar.load_cifar10(root)
    split = splits.load_split("cifar10-4k", root)
    np.testing.assert_array_equal(split.x_labeled, x_train[:4000])
    np.testing.assert_array_equal(split.y_tune, y_train[3600:4000])
    np.testing.assert_array_equal(split.x_unlabeled, x_train)
    view = split.tuning_view()
    np.testing.assert_array_equal(view.x_labeled, x_train[:3600])
    np.testing.assert_array_equal(view.x_test, x_train[3600:4000])
    np.testing.assert_array_equal(
        view.x_unlabeled, np.concatenate([x_train[:3600], x_train[4000:]])
    )

    root = write_svhn(tmp_path / "svhn", train=1003, test=5)
    x_train, _ = svhn.load_svhn(root)
    split = splits.load_split("svhn-1k", root)
    np.testing.assert_array_equal(split.x_labeled, x_train[:1000])
    np.testing.assert_array_equal(split.x_unlabeled, x_train)
    assert len(split.y_tune) == 0


def test_cifar_split_paper_sizes_need_the_full_dataset(cifar_dir: Path) -> None:
    message = raises_naming("cifar-10-batches-py", splits.load_split, "cifar10-4k", cifar_dir)
    assert "only 100" in message and "4000" in message


def test_split_size_options_are_checked(cifar_dir: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^cifar10-4k: num_tune must be in 0\.\.num_labeled-1, got 10 of 10"
    ):
        splits.cifar10_4k(cifar_dir, num_labeled=10, num_tune=10)
    with pytest.raises(ConfigError, match="unknown split 'cifar10-40'; choose one of cifar10-4k"):
        splits.load_split("cifar10-40", cifar_dir)
    with pytest.raises(
        ConfigError, match="split 'svhn-1k' has no option 'num_tune'; it takes num_lab"
    ):
        splits.load_split("svhn-1k", cifar_dir, num_tune=3)


@pytest.mark.parametrize("num_labeled", [1, 10, 50])
def test_svhn_split(svhn_dir: Path, num_labeled: int) -> None:
    split = splits.load_split("svhn-1k", svhn_dir, num_labeled=num_labeled)
    x_train, y_train = svhn.load_svhn(svhn_dir)
    np.testing.assert_array_equal(split.x_labeled, x_train[:num_labeled])
    np.testing.assert_array_equal(split.y_labeled, y_train[:num_labeled])
    assert len(split.x_unlabeled) == 50 and len(split.y_tune) == 0 and len(split.y_test) == 20
    with pytest.raises(ConfigError, match="^svhn-1k has no tuning split"):
        split.tuning_view()
    extra = splits.svhn_1k(svhn_dir, num_labeled=num_labeled, include_extra=True)
    assert extra.x_unlabeled.shape == (80, 32, 32, 3)


def test_svhn_split_too_few(svhn_dir: Path) -> None:
    assert "only 50" in raises_naming("train_32x32.mat", splits.svhn_1k, svhn_dir)


def test_labeled_fraction_indices_rule() -> None:
    n = 1000
    first = splits.labeled_fraction_indices(n)
    # The documented rule, literally: the first round(n * 102/1024) of RandomState(0).permutation(n).
    np.testing.assert_array_equal(first, np.random.RandomState(0).permutation(n)[:100])
    np.testing.assert_array_equal(first, splits.labeled_fraction_indices(n))
    assert len(np.unique(first)) == 100
    assert not np.array_equal(first, splits.labeled_fraction_indices(n, seed=1))
    assert len(splits.labeled_fraction_indices(1_281_167)) == 127_616  # ~ the paper's 102 shards
    with pytest.raises(ConfigError, match=r"^fraction must be in \(0, 1\], got 0\.0"):
        splits.labeled_fraction_indices(n, fraction=0.0)


@pytest.mark.parametrize("fraction,num_tune", [(0.5, 12800), (0.5, 0), (1.0, 1)])
def test_imagenet_split_deterministic(imagenet_dir: Path, fraction: float, num_tune: int) -> None:
    options = dict(fraction=fraction, num_tune=num_tune, resolution=8)
    a = splits.load_split("imagenet-10pct", imagenet_dir, **options)
    b = splits.load_split("imagenet-10pct", imagenet_dir, **options)
    assert a.x_labeled.paths == b.x_labeled.paths and a.y_labeled.tolist() == b.y_labeled.tolist()
    train, val = imagenet.load_imagenet(imagenet_dir, resolution=8)
    chosen = np.random.RandomState(0).permutation(20)[: round(20 * fraction)]
    assert a.x_labeled.paths == [train.paths[i] for i in chosen]
    assert a.y_labeled.tolist() == train.labels[chosen].tolist()
    n_tune = min(num_tune, len(chosen) // 10)  # "about 12,800" scales to 10% of the labeled set
    assert len(a.y_tune) == n_tune and a.x_tune.paths == a.x_labeled.paths[len(chosen) - n_tune :]
    assert len(a.x_unlabeled) == 20 and a.y_test.tolist() == val.labels.tolist()
    assert a.num_classes == 3 and a.x_labeled[0].shape == (8, 8, 3)
    assert a.x_labeled[np.arange(3)].shape == (3, 8, 8, 3)
    if n_tune:
        view = a.tuning_view()
        assert view.x_test.paths == a.x_tune.paths and len(view.x_labeled) == len(chosen) - n_tune


@pytest.mark.parametrize("split", ["cifar10-4k", "svhn-1k", "imagenet-10pct", "folder", "npz"])
def test_a_data_dir_that_does_not_exist_is_named_as_such(tmp_path: Path, split: str) -> None:
    """A mistyped --data-dir was reported as its first file missing ("data_batch_1 is missing"),
    which sends the user looking for a file rather than at the path they typed."""
    nowhere = tmp_path / "cifar10"
    with pytest.raises(DataError, match=f"^--data-dir {nowhere} does not exist; pass the folder"):
        splits.load_split(split, nowhere)
