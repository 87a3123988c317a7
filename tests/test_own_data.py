"""Your own data: the ``folder`` and ``npz`` datasets (metapl.data.own, metapl.data.own_npz).

A tiny folder dataset (PNG and JPEG files of several sizes and PIL modes, nested unlabeled folders,
hidden and non-image files) and a tiny .npz are read and checked pixel for pixel against
``decode_image``; every user mistake is a one-line DataError naming the path; and ``metapl train
--preset folder-uda-mpl`` runs end to end (WRN-28-2 at 8x8, two steps) with and without a test set.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metapl.cli import main
from metapl.data.folder import FolderImages
from metapl.data.imagenet import decode_image
from metapl.data.own import folder_split, npz_split, tuning_mask
from metapl.data.own_npz import fit
from metapl.data.splits import load_split
from metapl.errors import ConfigError, DataError
from metapl.report import check_out_not_in_data
from metapl.train.presets import load_preset, preset_table

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZE = 8
# class -> number of labeled images; tuning = last max(1, n // 10) of n >= 2, none of n == 1
COUNTS = {"bird": 1, "cat": 20, "dog": 3}
MODES = ("RGB", "L", "RGBA", "P", "CMYK")


def picture(seed: int, mode: str, size: tuple[int, int]) -> Image.Image:
    rgb = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert(mode)


def save(path: Path, seed: int) -> None:
    """A PNG or JPEG (by suffix) of a varying size and mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = MODES[seed % len(MODES)]
    if path.suffix.lower() == ".png" and mode == "CMYK":
        mode = "RGB"
    if path.suffix.lower() != ".png" and mode in ("RGBA", "P"):
        mode = "L"
    picture(seed, mode, (9 + seed % 7, 8 + 3 * (seed % 4))).save(path)


def labeled_names(n: int) -> list[str]:
    """File names whose string order differs from their numeric order (img10 < img2)."""
    return [f"img{i}.{'png' if i % 2 else 'JPG'}" for i in range(n)]


def make_folder(root: Path, test: bool = True) -> Path:
    seed = 0
    for name, n in COUNTS.items():
        for file in labeled_names(n):
            seed += 1
            save(root / "labeled" / name / file, seed)
    (root / "labeled" / "cat" / "notes.txt").write_text("not an image")
    save(root / "labeled" / ".hidden" / "x.png", 99)  # hidden folders are no class
    for i, rel in enumerate(["b/deep/u1.png", "a/u2.jpeg", "u3.PNG", "a/u0.jpg", ".u4.png"]):
        save(root / "unlabeled" / rel, 200 + i)
    if test:
        save(root / "test" / "cat" / "t1.png", 300)
        save(root / "test" / "dog" / "t0.jpg", 301)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("own") / "data")


def expected_labeled_files(root: Path) -> list[str]:
    """x_labeled's files: every class's non-tuning files, then every class's tuning files."""
    rest, tune = [], []
    for name, n in COUNTS.items():
        files = sorted(labeled_names(n))
        take = max(1, n // 10) if n >= 2 else 0
        rest += [str(root / "labeled" / name / f) for f in files[: n - take]]
        tune += [str(root / "labeled" / name / f) for f in files[n - take :]]
    return rest + tune


# --- the folder reader --------------------------------------------------------------------------


def test_folder_split_reads_classes_labels_pixels_and_tuning(folder):
    split = folder_split(folder, SIZE)
    assert split.name == "folder" and split.class_names == ("bird", "cat", "dog")
    assert split.num_classes == 3
    assert split.x_labeled.shape == (24, SIZE, SIZE, 3) and split.x_labeled.dtype == np.uint8
    assert split.x_unlabeled.shape == (4, SIZE, SIZE, 3)  # hidden .u4.png skipped, nested kept
    assert split.x_test.shape == (2, SIZE, SIZE, 3) and split.y_test.tolist() == [1, 2]
    files = expected_labeled_files(folder)
    labels = [("bird", "cat", "dog").index(Path(f).parent.name) for f in files]
    assert split.y_labeled.tolist() == labels
    # tuning: the last 2 of cat's 20, the last of dog's 3, none of bird's single image
    assert split.y_tune.tolist() == [1, 1, 2]
    assert np.array_equal(split.x_tune, split.x_labeled[-3:])
    for row, file in enumerate(files):
        assert np.array_equal(split.x_labeled[row], decode_image(file, SIZE)), file
    unlabeled = ["a/u0.jpg", "a/u2.jpeg", "b/deep/u1.png", "u3.PNG"]  # sorted relative paths
    for row, rel in enumerate(unlabeled):
        assert np.array_equal(
            split.x_unlabeled[row], decode_image(folder / "unlabeled" / rel, SIZE)
        )

    view = split.tuning_view()
    assert len(view.y_labeled) == 21 and view.y_test.tolist() == [1, 1, 2]


def test_a_16_bit_grayscale_png_decodes_as_its_8_bit_picture(tmp_path):
    """A 16-bit grayscale PNG opens in mode "I;16", whose convert("RGB") clips every value above
    255: the file decoded as a white square, silently. It gets the pixels of its 8-bit picture."""
    gray = np.random.RandomState(0).randint(0, 256, (11, 9)).astype(np.uint16)
    Image.fromarray(gray * 257).save(tmp_path / "deep.png")  # 0..255 -> 0..65535
    Image.fromarray(gray.astype(np.uint8)).save(tmp_path / "gray.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    got = decode_image(tmp_path / "deep.png", SIZE)
    assert np.array_equal(got, decode_image(tmp_path / "gray.png", SIZE))
    assert got.min() < 255


def test_a_large_photo_decodes_without_pillows_bomb_warning(tmp_path, monkeypatch):
    """Pillow warns on every image above MAX_IMAGE_PIXELS (89 megapixels; 2 lines on stderr each)
    and refuses those above twice that. A large photo of the user's own decodes quietly; a
    decompression bomb is still a DataError naming the file. Pillow's limit is lowered here."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    Image.new("RGB", (9, 9), (10, 20, 30)).save(tmp_path / "large.png")  # 81 pixels: warns
    Image.new("RGB", (11, 11)).save(tmp_path / "bomb.png")  # 121 > 2 * 50: refused
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = decode_image(tmp_path / "large.png", SIZE)
    assert got.shape == (SIZE, SIZE, 3) and got[0, 0].tolist() == [10, 20, 30]
    with pytest.raises(DataError, match="bomb.png is not a readable image"):
        decode_image(tmp_path / "bomb.png", SIZE)


def test_lazy_decoding_gives_the_same_split_with_file_order(folder):
    eager = folder_split(folder, SIZE)
    lazy = folder_split(folder, SIZE, max_eager_bytes=0)
    for name in ("x_labeled", "x_unlabeled", "x_test", "x_tune"):
        images = getattr(lazy, name)
        assert isinstance(images, FolderImages)  # lazily decoded
        assert np.array_equal(images[np.arange(len(images))], getattr(eager, name)), name
    assert lazy.x_labeled.paths == expected_labeled_files(folder)
    assert np.array_equal(lazy.y_labeled, eager.y_labeled)
    # a budget for the labeled and test sets only leaves the unlabeled set lazy
    mixed = folder_split(folder, SIZE, max_eager_bytes=26 * SIZE * SIZE * 3)
    assert isinstance(mixed.x_labeled, np.ndarray) and isinstance(mixed.x_test, np.ndarray)
    assert isinstance(mixed.x_unlabeled, FolderImages)


def test_resizing_keeps_the_aspect_ratio_and_the_centre_and_ignores_exif_orientation(tmp_path):
    """docs/own-data.md's resizing rule: the shorter side is resized (bicubic) to image_size and
    the centre square kept, so a wide and a tall picture are cropped, not squashed; an EXIF
    orientation tag is not applied (pixels as stored). The other tests compare readers with
    decode_image, so a change to the rule itself passed them."""
    wide = np.random.RandomState(0).randint(0, 256, (12, 30, 3), dtype=np.uint8)
    for name, pixels in (("wide", wide), ("tall", wide.transpose(1, 0, 2))):
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        h, w = pixels.shape[:2]
        size = (20, 8) if w > h else (8, 20)  # shorter side 12 -> 8, the longer 30 -> 20
        resized = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC))
        centre = resized[6:14] if h > w else resized[:, 6:14]
        assert np.array_equal(decode_image(tmp_path / f"{name}.png", SIZE), centre), name

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display": a phone's portrait photo
    Image.fromarray(wide).save(tmp_path / "tagged.png", exif=exif)
    with Image.open(tmp_path / "tagged.png") as image:
        assert image.getexif()[0x0112] == 6
    assert np.array_equal(
        decode_image(tmp_path / "tagged.png", SIZE), decode_image(tmp_path / "wide.png", SIZE)
    )


def test_labeled_images_at_any_depth_and_eager_decoding_up_to_2_gib(tmp_path):
    """docs/own-data.md: a class folder's images count at any depth inside it, and the sets are
    decoded up front while they fit in 2 GiB together (the tests pass their own budgets)."""
    import inspect

    root = make_folder(tmp_path / "data")
    deep = root / "labeled" / "dog" / "more" / "deeper" / "z.png"
    save(deep, 50)
    split = folder_split(root, SIZE, max_eager_bytes=0)
    row = split.x_labeled.paths.index(str(deep))
    assert split.class_names[split.y_labeled[row]] == "dog" and len(split.y_labeled) == 25
    budget = inspect.signature(folder_split).parameters["max_eager_bytes"].default
    assert budget == 2 * 1024**3


def test_tuning_mask_rule():
    labels = np.array([0] * 25 + [1] * 9 + [2] + [3] * 2)
    mask = tuning_mask(labels)
    assert mask.tolist() == [False] * 23 + [True] * 2 + [False] * 8 + [True, False, False, True]


def test_registered_and_without_test_folder(tmp_path):
    root = make_folder(tmp_path / "data", test=False)
    split = load_split("folder", root, resolution=SIZE)
    assert split.x_test.shape == (0, SIZE, SIZE, 3) and split.y_test.shape == (0,)
    assert split.y_test.dtype == np.int64
    assert "folder-uda-mpl" in preset_table()
    cfg = load_preset("folder-uda-mpl").validate()
    assert (cfg.dataset, cfg.method, cfg.model, cfg.image_size) == (
        "folder",
        "uda_mpl",
        "wrn28_2",
        32,
    )


# --- the npz reader -----------------------------------------------------------------------------


def arrays(rng: np.random.RandomState) -> dict[str, np.ndarray]:
    return {
        "x_labeled": rng.randint(0, 256, (6, 10, 14), dtype=np.uint8),  # grayscale NHW
        "y_labeled": np.array([0, 1, 2, 0, 1, 2], dtype=np.int32),
        "x_unlabeled": rng.randint(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8),
        "x_test": rng.randint(0, 256, (2, 16, 9, 1), dtype=np.uint8),
        "y_test": np.array([2, 0]),
        "class_names": np.array(["ant", "bee", "cow"]),
    }


def test_npz_split_checks_resizes_and_names(tmp_path):
    data = arrays(np.random.RandomState(0))
    path = tmp_path / "mine.npz"
    np.savez(path, **data)
    split = npz_split(path, SIZE)
    assert split.name == "npz" and split.class_names == ("ant", "bee", "cow")
    assert split.x_labeled.shape == (6, SIZE, SIZE, 3) and split.x_unlabeled.shape == (
        5,
        SIZE,
        SIZE,
        3,
    )
    assert split.y_labeled.dtype == np.int64 and split.y_labeled.tolist() == [0, 1, 2, 0, 1, 2]
    assert split.y_tune.tolist() == [0, 1, 2]  # one of each class's two, the later one
    assert np.array_equal(split.x_unlabeled, data["x_unlabeled"])  # already SIZE: untouched
    # resized exactly as a PNG of the same pixels is by the folder reader
    for got, gray in zip(split.x_test, data["x_test"][..., 0]):
        Image.fromarray(gray).save(tmp_path / "same.png")
        assert np.array_equal(got, decode_image(tmp_path / "same.png", SIZE))
    rgb = np.random.RandomState(1).randint(0, 256, (21, 13, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(fit(Image.fromarray(rgb), 7), decode_image(tmp_path / "rgb.png", 7))

    # without class_names the classes are "0".."K-1"; folder reads DIR/data.npz or the file
    del data["class_names"], data["x_test"], data["y_test"]
    np.savez(tmp_path / "data.npz", **data)
    for source in (tmp_path, tmp_path / "data.npz"):
        split = folder_split(source, SIZE)
        assert split.class_names == ("0", "1", "2") and split.name == "npz"
        assert len(split.y_test) == 0 and split.x_test.shape == (0, SIZE, SIZE, 3)


# --- errors -------------------------------------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def _missing_dir(root: Path) -> tuple[Path, str]:
    return root / "nowhere", "is missing"


def _no_labeled(root: Path) -> tuple[Path, str]:
    (root / "unlabeled").mkdir(parents=True)
    return root / "labeled", "labeled is missing"


def _empty_class(root: Path) -> tuple[Path, str]:
    make_folder(root)
    (root / "labeled" / "emu").mkdir()
    (root / "labeled" / "emu" / "readme.txt").write_text("x")
    return root / "labeled" / "emu", "is an empty class folder"


def _one_class(root: Path) -> tuple[Path, str]:
    save(root / "labeled" / "cat" / "a.png", 1)
    save(root / "unlabeled" / "b.png", 2)
    return root / "labeled", "has only one class folder ('cat')"


def _loose_images(root: Path) -> tuple[Path, str]:
    save(root / "labeled" / "a.png", 1)
    save(root / "unlabeled" / "b.png", 2)
    return root / "labeled" / "a.png", "has no class: move it into labeled/<class>/"


def _loose_test_image(root: Path) -> tuple[Path, str]:
    make_folder(root)
    save(root / "test" / "z.jpg", 7)
    return root / "test" / "z.jpg", "has no class: move it into test/<class>/"


def _no_unlabeled(root: Path) -> tuple[Path, str]:
    make_folder(root)
    for f in (root / "unlabeled").rglob("*"):
        if f.is_file():
            f.unlink()
    return root / "unlabeled", "has no images"


def _no_unlabeled_folder(root: Path) -> tuple[Path, str]:
    save(root / "labeled" / "cat" / "a.png", 1)
    save(root / "labeled" / "dog" / "a.png", 2)
    # the layout's own message: the unlabeled-folder reader's says to check the unlabeled_dir
    # option, which a folder dataset does not have (a mutation audit found the two alike)
    return root / "unlabeled", "unlabeled is missing: put the unlabeled images there"


# A file where the layout has a folder: labeled/ and unlabeled/ were "missing" though they were
# there, and test/ "cannot be listed (NotADirectoryError: [Errno 20] Not a directory: ...)".
def _labeled_file(root: Path) -> tuple[Path, str]:
    save(root / "unlabeled" / "b.png", 2)
    (root / "labeled").write_text("not a folder")
    return root / "labeled", "labeled is not a folder: expected"


def _unlabeled_file(root: Path) -> tuple[Path, str]:
    save(root / "labeled" / "cat" / "a.png", 1)
    save(root / "labeled" / "dog" / "a.png", 2)
    (root / "unlabeled").write_text("not a folder")
    return root / "unlabeled", "unlabeled is not a folder: replace it with a folder"


def _test_file(root: Path) -> tuple[Path, str]:
    make_folder(root, test=False)
    (root / "test").write_text("not a folder")
    return root / "test", "test is not a folder: put the test images in test/<class>/"


def _unreadable(root: Path) -> tuple[Path, str]:
    make_folder(root)
    bad = root / "labeled" / "dog" / "img1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    return bad, "is not a readable image"


def _unknown_test_class(root: Path) -> tuple[Path, str]:
    make_folder(root)
    save(root / "test" / "eel" / "x.png", 5)
    return root / "test" / "eel", "labeled/ does not have"


@pytest.mark.parametrize(
    "make",
    [
        _missing_dir,
        _no_labeled,
        _empty_class,
        _one_class,
        _loose_images,
        _loose_test_image,
        _no_unlabeled,
        _no_unlabeled_folder,
        _labeled_file,
        _unlabeled_file,
        _test_file,
        _unreadable,
        _unknown_test_class,
    ],
)
def test_folder_errors_are_one_line_naming_the_path(tmp_path, make):
    root = tmp_path / "data"
    path, phrase = make(root)
    with pytest.raises(DataError) as exc:
        folder_split(path if make is _missing_dir else root, SIZE)
    message = one_line(exc)
    assert str(path) in message and phrase in message


@pytest.mark.parametrize("name", ["a\tb", "a\nb"])
def test_a_class_folder_named_with_a_control_character_is_one_line(tmp_path, name):
    """The class names are what `metapl predict` prints, tab-separated, one line per image: a
    folder "a<TAB>b" was trained as a class and broke those lines (the .npz reader refuses it)."""
    root = make_folder(tmp_path / "data")
    save(root / "labeled" / name / "x.png", 3)
    with pytest.raises(DataError) as exc:
        folder_split(root, SIZE)
    message = one_line(exc)
    assert repr(str(root / "labeled" / name)) in message and "control character" in message
    assert "PosixPath" not in message  # the path as the other messages print one, quoted


def test_unreadable_image_in_a_lazy_set_fails_when_read_naming_it(tmp_path):
    root = make_folder(tmp_path / "data")
    bad = root / "unlabeled" / "u3.PNG"
    bad.write_bytes(b"not a png at all")
    split = folder_split(root, SIZE, max_eager_bytes=0)  # listing does not decode
    assert split.x_unlabeled[0].shape == (SIZE, SIZE, 3)
    with pytest.raises(DataError) as exc:
        split.x_unlabeled[np.arange(4)]
    message = one_line(exc)
    assert str(bad) in message and f"the unlabeled folder {root / 'unlabeled'}" in message


def _edit(**changes):
    def make(data: dict) -> None:
        for key, value in changes.items():
            if value is None:
                del data[key]
            else:
                data[key] = value

    return make


@pytest.mark.parametrize(
    "make, phrase",
    [
        (_edit(x_unlabeled=None), "misses key 'x_unlabeled'"),
        (_edit(y_labeled=None), "misses key 'y_labeled'"),
        (_edit(y_tests=np.array([0])), "unexpected key 'y_tests'"),
        (_edit(y_test=None), "only one of x_test and y_test"),
        (_edit(y_labeled=np.array([0, 1, 2, 0, 1, -1])), "y_labeled[5] is -1, a negative label"),
        # without class_names too, where K = max + 1 made the range "0..0" for all negative labels
        (
            _edit(class_names=None, y_labeled=-np.ones(6, int)),
            "y_labeled[0] is -1, a negative label: labels are class indices 0..K-1",
        ),
        (_edit(y_test=np.array([0, -2])), "y_test[1] is -2, a negative label"),
        (_edit(y_labeled=np.array([0, 1, 3, 0, 1, 2])), "y_labeled[2] is 3, outside 0..2"),
        (_edit(y_test=np.array([3, 0])), "y_test[0] is 3, outside 0..2"),
        (_edit(y_labeled=np.zeros((6, 1), int)), "y_labeled has shape (6, 1)"),
        (_edit(y_labeled=np.array([0, 1, 2])), "expected integer labels of shape (6,)"),
        (_edit(y_labeled=np.array([0.0, 1, 2, 0, 1, 2])), "dtype float64"),
        (_edit(y_labeled=np.array([0, 1, 0, 0, 1, 0])), "class 2 has no labeled image"),
        (_edit(class_names=None, y_labeled=np.zeros(6, int)), "there is one class"),
        # a stray large label, not a missing class, is what is wrong: named as what made K
        (
            _edit(class_names=None, y_labeled=np.array([0, 1, 2, 0, 5, 2])),
            "class 3 has no labeled image, but y_labeled must use every class 0..K-1 with K >= 2 "
            "(K = 6: the largest label + 1, y_labeled[4] = 5)",
        ),
        # Labels as IDs: the class names 0..max were listed first (10**9: out of memory, no error)
        (
            _edit(class_names=None, y_labeled=np.array([0, 1, 2, 0, 1, 2_000_000])),
            "y_labeled[5] is 2000000, but there are only 6 labeled images",
        ),
        # at the bound, 7 classes for 6 images (off by one it was "class 3 has no labeled image")
        (
            _edit(class_names=None, y_labeled=np.array([0, 1, 2, 0, 1, 6])),
            "y_labeled[5] is 6, but there are only 6 labeled images",
        ),
        (_edit(class_names=np.array(["a", "a", "b"])), "expected distinct strings"),
        (_edit(class_names=np.array(["a", "", "b"])), "class_names[1] is ''; give each class"),
        (_edit(class_names=np.array(["a", "b", "c\nd"])), "class_names[2] is 'c\\nd'; give"),
        (_edit(x_labeled=np.zeros((6, 8, 8, 3), np.float32)), "x_labeled has dtype float32"),
        (_edit(x_unlabeled=np.zeros((5, 8, 8, 2), np.uint8)), "x_unlabeled has shape (5, 8, 8, 2)"),
        # RGBA: not silently passed on as 4 channels, nor its alpha dropped (a mutation audit)
        (_edit(x_unlabeled=np.zeros((5, 8, 8, 4), np.uint8)), "x_unlabeled has shape (5, 8, 8, 4)"),
        (_edit(x_unlabeled=np.zeros((0, 8, 8, 3), np.uint8)), "with N >= 1"),
    ],
)
def test_npz_errors_are_one_line_naming_the_file(tmp_path, make, phrase):
    data = arrays(np.random.RandomState(0))
    make(data)
    path = tmp_path / "data.npz"
    np.savez(path, **data)
    with pytest.raises(DataError) as exc:
        npz_split(tmp_path, SIZE)
    message = one_line(exc)
    assert str(path) in message and phrase in message


@pytest.mark.parametrize("kind", ["garbage", "truncated", "npy", "pickled", "absent", "no_file"])
def test_malformed_npz_is_one_line_naming_the_file(tmp_path, kind):
    path = tmp_path / "data.npz"
    if kind == "garbage":
        path.write_bytes(b"hello, not a zip")
    elif kind == "truncated":
        np.savez(path, **arrays(np.random.RandomState(0)))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "npy":
        np.save(tmp_path / "x.npy", np.zeros(3))
        (tmp_path / "x.npy").rename(path)
    elif kind == "pickled":
        data = arrays(np.random.RandomState(0))
        data["class_names"] = np.array(["a", None, "c"], dtype=object)
        np.savez(path, **data)
    source = tmp_path / "absent.npz" if kind == "absent" else tmp_path
    with pytest.raises(DataError) as exc:
        npz_split(source, SIZE)
    message = one_line(exc)
    if kind in ("absent", "no_file"):
        assert "is missing" in message
    elif kind == "garbage":
        assert f"{path} is not a .npz file (not a zip archive" in message
    else:
        assert f"{path} is not a readable .npz" in message
    if kind == "npy":  # says what the file holds, not numpy's complaint about it
        assert "it holds one unnamed array of shape (3,)" in message


# --- end to end ---------------------------------------------------------------------------------

TINY = {
    "image_size": SIZE,
    "pad": 1,
    "cutout": 4,
    "batch_size": 4,
    "unlabeled_ratio": 1,
    "warmup_steps": 1,
    "uda_warmup_steps": 1,
    "uda_threshold": 0.0,
    "eval_every": 2,
    "log_every": 1,
    "checkpoint_every": 2,
}


def train_cli(data: Path, out: Path, *extra: str) -> int:
    args = ["train", "--preset", "folder-uda-mpl", "--data-dir", str(data), "--out", str(out)]
    args += ["--steps", "2", "--device", "cpu", "--quiet", *extra]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    return main(args)


def test_cli_trains_folder_uda_mpl_and_writes_class_names(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(folder, out) == 0
    printed = capsys.readouterr().out
    assert "folder-uda-mpl: test accuracy" in printed
    assert "checkpoint.pt, classes.json\n" in printed  # the "wrote ..." line names it too
    assert json.loads((out / "classes.json").read_text()) == ["bird", "cat", "dog"]
    (record,) = json.loads((out / "results.json").read_text())["results"]
    assert record["dataset"] == "folder" and record["method"] == "uda_mpl"
    assert record["accuracy"] in (0.0, 0.5, 1.0)  # two test images
    # the tuning images are labeled ones the run trained on: no held-out "tune_accuracy" of them
    assert "tune_accuracy" not in record and "teacher_test_accuracy" in record


def test_folder_preset_reads_a_npz_file_given_as_data_dir(tmp_path, capsys):
    """As docs/own-data.md says (a --data-dir check for files once refused it)."""
    np.savez(tmp_path / "mine.npz", **arrays(np.random.RandomState(0)))
    assert train_cli(tmp_path / "mine.npz", tmp_path / "run") == 0
    assert "folder-uda-mpl: test accuracy" in capsys.readouterr().out


def test_cli_without_a_test_set_reports_no_test_accuracy(tmp_path, capsys):
    data = arrays(np.random.RandomState(0))
    del data["x_test"], data["y_test"]
    np.savez(tmp_path / "mine.npz", **data)
    out = tmp_path / "run"
    assert train_cli(tmp_path / "mine.npz", out, "--set", "dataset=npz") == 0
    printed = capsys.readouterr().out
    assert (
        "test accuracy" not in printed
        and "no test set to evaluate (--set tuning=true tests on the tuning split)" in printed
    )
    (record,) = json.loads((out / "results.json").read_text())["results"]
    assert record["dataset"] == "npz" and record["accuracy"] is None
    assert "teacher_test_accuracy" not in record and "tune_accuracy" not in record
    assert json.loads((out / "classes.json").read_text()) == ["ant", "bee", "cow"]
    logged = (out / "metrics.csv").read_text()
    assert "student_labeled_accuracy" in logged and "test_accuracy" not in logged
    assert "tune_accuracy" not in logged  # the tuning images were trained on


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("inside", ["labeled/run", "unlabeled/run", "unlabeled", "test/run"])
def test_a_run_folder_inside_the_images_it_reads_is_refused(
    folder, tmp_path, capsys, inside, command
):
    """--out DIR/labeled/run failed as "DIR/labeled/run is an empty class folder ... delete the
    folder" about the folder metapl had just made; --out DIR/unlabeled/run ran, and read its own
    curves.png as an unlabeled image when it resumed. `metapl tune` puts its trials' run folders
    under --out, so it is refused there too."""
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    before = sorted(data.rglob("*"))
    out = data / inside
    args = [command, "--preset", "folder-uda", "--data-dir", str(data), "--out", str(out)]
    if command == "tune":
        args += ["--trials", "1", "--storage", f"sqlite:///{tmp_path / 'study.db'}"]
    assert main([*args, "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is inside {data / inside.split('/')[0]}, whose images" in err
    assert sorted(data.rglob("*")) == before


def test_a_run_folder_in_the_unlabeled_dir_or_a_linked_data_dir_is_refused(tmp_path, monkeypatch):
    """The unlabeled_dir is read as images too; and a --data-dir given through a link is the same
    folder as its target (the --out is compared with both resolved)."""
    from types import SimpleNamespace

    extra = tmp_path / "extra"
    extra.mkdir()
    cfg = SimpleNamespace(data_dir=None, unlabeled_dir=str(extra))
    with pytest.raises(ConfigError, match=f"is inside {extra}, whose images the run reads"):
        check_out_not_in_data(str(extra / "run"), cfg)
    check_out_not_in_data(str(tmp_path / "run"), cfg)  # beside it: fine
    monkeypatch.chdir(tmp_path)  # a relative --out
    with pytest.raises(ConfigError, match="whose images the run reads"):
        check_out_not_in_data("extra/run", cfg)
    data = tmp_path / "data"
    (data / "labeled").mkdir(parents=True)
    link = tmp_path / "data-link"
    link.symlink_to(data)
    cfg = SimpleNamespace(data_dir=str(link), unlabeled_dir=None)
    with pytest.raises(ConfigError, match="whose images the run reads"):
        check_out_not_in_data(str(data / "labeled" / "run"), cfg)
    check_out_not_in_data(str(data / "run"), cfg)  # beside the image folders: fine


def test_a_run_folder_where_an_image_folder_would_be_is_refused(tmp_path):
    """--out DIR/test/run for a dataset without a test folder made DIR/test: the resumed run was
    then refused ("inside DIR/test") and every later run read the run's files as its test set."""
    from types import SimpleNamespace

    data = tmp_path / "data"
    (data / "labeled").mkdir(parents=True)
    cfg = SimpleNamespace(data_dir=str(data), unlabeled_dir=None)
    with pytest.raises(ConfigError, match=f"is inside {data / 'test'}, whose images"):
        check_out_not_in_data(str(data / "test" / "run"), cfg)
    assert sorted(p.name for p in data.iterdir()) == ["labeled"]
