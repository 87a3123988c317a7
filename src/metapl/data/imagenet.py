"""ImageNet (ILSVRC-2012) from class folders of JPEGs, decoded lazily with PIL.

Layout: ``<data_dir>/train/<wnid>/*.JPEG`` and ``<data_dir>/val/<wnid>/*.JPEG``. Classes are the
sorted folder names of ``train``; ``val`` uses the same class list (the official validation tarball is
flat: sort it into class folders first, e.g. with the widely used ``valprep.sh``). Files are listed in
(class, file name) order, file names compared as Python strings, so the order — and every split built
on it (:func:`metapl.data.splits.labeled_fraction_indices`) — is the same on every machine.

An item is decoded when it is indexed: RGB, shorter side resized (bicubic) to
``round(resolution / crop_fraction)``, then a centre ``resolution x resolution`` crop, as uint8 HWC
(see :mod:`metapl.data.arrays`). ``crop_fraction=1.0`` (the default) keeps the whole shorter side;
0.875 is the usual ResNet evaluation crop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from metapl.data.arrays import data_error, describe
from metapl.errors import ConfigError
from metapl.warning_filters import ignoring

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
_EXPECTED = (
    "ImageNet (ILSVRC-2012) as class folders <data_dir>/train/<wnid>/*.JPEG and "
    "<data_dir>/val/<wnid>/*.JPEG"
)


# The modes a 16-bit grayscale PNG opens in ("I" in older Pillow). Their convert("RGB") clips every
# value above 255 instead of scaling it, so such a file decoded as a white square, silently.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _eight_bit(image: Image.Image) -> Image.Image:
    """``image`` with 16-bit grayscale scaled to 8 bits (v / 257, rounded: 257 v -> v)."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(values / 257), 0, 255).astype(np.uint8))  # "L"


def _no_bomb_warning():
    """Pillow warns (2 lines on stderr, per image) between 89 and 179 megapixels: a large photo of
    the user's own is no attack. Beyond that its DecompressionBombError stays an error. Only the
    short calls that can warn are in the block (metapl.warning_filters), never the decoding."""
    return ignoring(category=Image.DecompressionBombWarning)


def decode_image(path: str | Path, resolution: int = 224, crop_fraction: float = 1.0) -> np.ndarray:
    """One image file -> uint8 ``[resolution, resolution, 3]``; DataError naming the file if unreadable.

    Safe to call from several threads at once (the decoding, most of the time, runs in parallel)."""
    side = max(resolution, round(resolution / crop_fraction))
    try:
        with _no_bomb_warning():
            image = Image.open(path)  # reads the header only; the size check is here
        with image:
            # convert() forces the full decode, so a truncated file fails here, not later.
            rgb = _eight_bit(image).convert("RGB")
    except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ...
        raise data_error(
            f"{path} is not a readable image ({describe(exc)}): expected a JPEG of {_EXPECTED}; "
            "re-extract it, or delete it and start the run again in another --out (a run resumes "
            "only on the files it started with)"
        ) from None
    width, height = rgb.size
    scale = side / min(width, height)
    size = (max(side, round(width * scale)), max(side, round(height * scale)))
    rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    with _no_bomb_warning():  # Pillow 12's crop() checks its box against the limit too
        rgb = rgb.crop((left, top, left + resolution, top + resolution))
    return np.asarray(rgb, dtype=np.uint8)


class LazyImages:
    """A list of image files that indexes like a uint8 NHWC array, decoding on access.

    ``images[i]`` is one ``[H, W, 3]`` image; ``images[indices]`` (a sequence or integer array) is a
    stacked ``[B, H, W, 3]`` batch, so samplers can treat it like the CIFAR/SVHN arrays.
    """

    def __init__(self, paths: Sequence[str], resolution: int = 224, crop_fraction: float = 1.0):
        if resolution < 1 or not 0.0 < crop_fraction <= 1.0:
            raise ConfigError(
                f"resolution must be >= 1 and crop_fraction in (0, 1], got {resolution} and {crop_fraction}"
            )
        self.paths = list(paths)
        self.resolution = resolution
        self.crop_fraction = crop_fraction

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(N, H, W, 3)``, as for the in-memory arrays."""
        return (len(self.paths), self.resolution, self.resolution, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return decode_image(self.paths[index], self.resolution, self.crop_fraction)
        if isinstance(index, slice):
            index = range(len(self.paths))[index]
        from metapl.data.decoding import decode

        # self[int(i)] for each row, on the decoding threads (a subclass's one-image branch too)
        return decode(self, np.asarray(index).reshape(-1))

    def subset(self, indices: Sequence[int] | np.ndarray) -> LazyImages:
        """The images at ``indices``, in that order (no decoding)."""
        return LazyImages(
            [self.paths[int(i)] for i in indices], self.resolution, self.crop_fraction
        )


def _entries(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder``; scandir's cached file types spare a stat per file on 1.28M files."""
    with os.scandir(folder) as it:
        return list(it)


def list_classes(split_dir: Path) -> list[str]:
    """Sorted class-folder names of one split folder, or a DataError saying what is wrong."""
    if not split_dir.is_dir():
        raise data_error(
            f"{split_dir} is missing: expected {_EXPECTED}; pass the folder that contains train/ and val/ "
            "as the data directory"
        )
    classes = sorted(
        e.name for e in _entries(split_dir) if e.is_dir() and not e.name.startswith(".")
    )
    if not classes:
        names = [e.name for e in _entries(split_dir)]
        hint = ""
        if any(_is_image(n) for n in names):
            hint = " (it holds images directly: sort them into class folders, e.g. with valprep.sh)"
        elif any(n.endswith(".tar") for n in names):
            hint = " (it holds .tar files: extract each into a folder of its name, without .tar)"
        raise data_error(f"{split_dir} has no class folders{hint}: expected {_EXPECTED}")
    return classes


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class ImageFolder:
    """One split (``train`` or ``val``) as a Dataset: ``folder[i] -> (uint8 [H, W, 3] image, label)``.

    Attributes: ``classes`` (sorted wnids), ``labels`` (int64 ``[N]``), ``images`` (:class:`LazyImages`).
    Pass ``classes`` (the training classes) when reading ``val`` so labels agree.
    """

    def __init__(
        self,
        root: Path | str,
        resolution: int = 224,
        crop_fraction: float = 1.0,
        classes: Sequence[str] | None = None,
    ):
        root = Path(root)
        found = list_classes(root)
        self.classes = list(classes) if classes is not None else found
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in found if name not in index]
        if unknown:
            raise data_error(
                f"{root / unknown[0]} is a class folder that the training set does not have "
                f"({len(unknown)} such): expected {_EXPECTED} with the same classes in both"
            )
        paths: list[str] = []
        labels: list[int] = []
        for name in found:
            files = sorted(
                e.name for e in _entries(root / name) if e.is_file() and _is_image(e.name)
            )
            if not files:
                raise data_error(f"{root / name} has no .JPEG images: expected {_EXPECTED}")
            paths.extend(str(root / name / f) for f in files)
            labels.extend([index[name]] * len(files))
        self.root = root
        self.labels = np.asarray(labels, dtype=np.int64)
        self.images = LazyImages(paths, resolution, crop_fraction)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def paths(self) -> list[str]:
        return self.images.paths

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[int(index)], int(self.labels[index])


def load_imagenet(
    data_dir: Path | str,
    resolution: int = 224,
    crop_fraction: float = 1.0,
) -> tuple[ImageFolder, ImageFolder]:
    """``(train, val)`` folders of ``data_dir``, sharing the training set's class list."""
    root = Path(data_dir)
    train = ImageFolder(root / "train", resolution, crop_fraction)
    val = ImageFolder(root / "val", resolution, crop_fraction, classes=train.classes)
    return train, val
