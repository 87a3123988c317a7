"""Your own images as a semi-supervised split: class folders of PNG/JPEG files (dataset ``folder``).

This is what ``metapl train --preset folder-uda-mpl --data-dir DIR`` reads. Layout::

    DIR/labeled/<class>/...   the labeled images, one folder per class (any depth inside it)
    DIR/unlabeled/...         the unlabeled images, at any depth; folder names carry no meaning
    DIR/test/<class>/...      optional: test images, in folders named like labeled/'s classes

A ``.npz`` file of arrays works too (:mod:`metapl.data.own_npz`): dataset ``folder`` reads it when
``--data-dir`` is that file, or a folder that holds ``data.npz`` and no ``labeled/``.

Rules:

- **Classes** are the names of ``labeled/``'s sub-folders, sorted as Python strings (hidden ones,
  starting with ``.``, skipped); label ``i`` is the ``i``-th name. The split keeps them as
  ``class_names`` and ``metapl train`` writes them to ``OUT/classes.json`` (a JSON list), so a run's
  predictions can be named. At least 2 classes; every class folder needs an image, and an image
  directly in ``labeled/`` or ``test/`` (so without a class) is an error, not skipped.
- **Files** are listed as in :func:`metapl.data.folder.list_images`: ``.png``, ``.jpg``, ``.jpeg`` in
  any letter case, hidden names skipped, other files ignored, ordered by their sorted relative paths,
  so every index (and the tuning split) is the same on every machine.
- **Resize**: :func:`metapl.data.imagenet.decode_image` at ``resolution`` (the config's
  ``image_size``) with no extra crop: any PIL mode converted to RGB, the *shorter* side resized
  (bicubic) to ``resolution``, then the centre ``resolution x resolution`` square. Why this rule and
  not a plain resize to a square: it keeps the aspect ratio, so an object has the same shape in a wide
  photo and in a tall one (a plain resize would squash them differently); the price is that the ends
  of the longer side are cut off, so centre the subject. It is also the rule of the ImageNet and
  unlabeled-folder readers, so a prediction tool reproduces the training pixels with one call.
- **Decoding** happens once, up front, for each of labeled, test and unlabeled (in that order) while
  the decoded arrays fit in ``max_eager_bytes`` (2 GiB by default): an unreadable image then fails
  before anything is written, and no step decodes a file again (a phone photo takes ~50 ms). A set
  that does not fit stays lazy (:class:`OwnImages`): decoded per batch, an unreadable image failing
  when it is read, naming the file.
- **Tuning split**: of each class's labeled images (in file order), the last ``max(1, n // 10)``
  when the class has ``n >= 2`` images, none when it has one (it cannot spare it). As for every
  :class:`~metapl.data.splits.SSLSplit`, ``x_labeled`` is the other labeled images followed by the
  tuning ones, and final runs train on all of them; ``--set tuning=true`` trains on the rest and
  evaluates on these (:meth:`~metapl.data.splits.SSLSplit.tuning_view`).
- **Unlabeled** = the images of ``unlabeled/`` only (the labeled images are not added).
- **Test** = ``test/`` when present; it may lack classes, but not have unknown ones. Without it the
  test arrays are empty and the run reports no test accuracy.

Every mistake is a one-line :class:`~metapl.errors.DataError` naming the path and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from metapl.data import decoding
from metapl.data.arrays import data_error, describe
from metapl.data.folder import FolderImages, list_images
from metapl.data.imagenet import IMAGE_EXTENSIONS, LazyImages
from metapl.data.own_npz import read_npz, resolve_npz

if TYPE_CHECKING:
    from metapl.data.splits import SSLSplit

EAGER_BYTES = 2 << 30
LAYOUT = (
    "DIR/labeled/<class>/*.png|jpg, DIR/unlabeled/** and optionally DIR/test/<class>/* "
    "(or a .npz of arrays)"
)
_ACCEPTED = "PNG or JPEG files (.png, .jpg, .jpeg)"


class OwnImages(FolderImages):
    """Lazily decoded images whose read error names the user's folder (``where``)."""

    def __init__(self, paths: Sequence[str], resolution: int, where: str):
        super().__init__(paths, resolution, where=where)


def decode_all(images: OwnImages) -> np.ndarray:
    """All of ``images`` as one uint8 NHWC array, decoded on metapl.data.decoding's threads (the
    first unreadable file in order is the one reported)."""
    return decoding.decode(images, np.arange(len(images)))


def tuning_mask(labels: np.ndarray) -> np.ndarray:
    """True at the tuning rows: per class, the last ``max(1, n // 10)`` of its ``n >= 2`` rows."""
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        take = max(1, len(rows) // 10) if len(rows) >= 2 else 0
        mask[rows[len(rows) - take :]] = True
    return mask


def _take(x: np.ndarray | LazyImages, rows: np.ndarray) -> np.ndarray | LazyImages:
    return x.subset(rows) if isinstance(x, LazyImages) else x[rows]


def build_split(
    name: str,
    x_labeled: np.ndarray | LazyImages,
    y_labeled: np.ndarray,
    x_unlabeled: np.ndarray | LazyImages,
    x_test: np.ndarray | LazyImages,
    y_test: np.ndarray,
    class_names: Sequence[str],
) -> SSLSplit:
    """An SSLSplit with the tuning rows (:func:`tuning_mask`) moved to the end of the labeled set."""
    from metapl.data.splits import SSLSplit  # here: splits imports this module to register it

    tune = tuning_mask(y_labeled)
    order = np.concatenate([np.flatnonzero(~tune), np.flatnonzero(tune)])
    x_l, y_l = _take(x_labeled, order), y_labeled[order]
    first_tune = len(y_l) - int(tune.sum())
    return SSLSplit(
        x_labeled=x_l,
        y_labeled=y_l,
        x_unlabeled=x_unlabeled,
        x_tune=_take(x_l, np.arange(first_tune, len(y_l))),
        y_tune=y_l[first_tune:],
        x_test=x_test,
        y_test=y_test,
        num_classes=len(class_names),
        name=name,
        class_names=tuple(class_names),
    )


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _subfolders(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise data_error(f"{folder} cannot be listed ({describe(exc)})") from None


def _check_no_loose_images(folder: Path) -> None:
    """An image directly in labeled/ or test/ has no class: an error, not silently skipped."""
    with os.scandir(folder) as it:
        loose = sorted(e.name for e in it if e.is_file() and _is_image(e.name))
    if loose:
        raise data_error(
            f"{folder / loose[0]} is an image directly in {folder.name}/ ({len(loose)} such), so "
            f"it has no class: move it into {folder.name}/<class>/, or delete it"
        )


def _class_files(folder: Path, classes: list[str], role: str) -> tuple[list[str], list[int]]:
    """Paths and labels of ``folder/<class>/**`` for the class folders found; none may be empty."""
    paths: list[str] = []
    labels: list[int] = []
    index = {name: i for i, name in enumerate(classes)}
    for name in _subfolders(folder):
        if name not in index:
            raise data_error(
                f"{folder / name} is a {role} class folder that labeled/ does not have: "
                f"rename it to one of the labeled classes ({', '.join(classes)}) or remove it"
            )
        files = list_images(folder / name)
        if not files:
            raise data_error(
                f"{folder / name} is an empty class folder (no {_ACCEPTED}; other files are "
                f"ignored): put the {role} images of class {name!r} in it, or delete the folder"
            )
        paths.extend(str(folder / name / f) for f in files)
        labels.extend([index[name]] * len(files))
    return paths, labels


def _classes(labeled: Path) -> list[str]:
    if not labeled.is_dir():  # a file of that name was "missing" too, though it was there
        what, advice = (
            ("is not a folder", "replace it with a folder that holds")
            if labeled.exists()
            else ("is missing", "create it with")
        )
        raise data_error(f"{labeled} {what}: expected {LAYOUT}; {advice} one folder per class")
    _check_no_loose_images(labeled)
    classes = _subfolders(labeled)
    if len(classes) < 2:
        found = f"only one class folder ({classes[0]!r})" if classes else "no class folders"
        raise data_error(
            f"{labeled} has {found}: a classifier needs at least 2 classes; expected {LAYOUT}"
        )
    # The folder names are the class names `metapl predict` prints, one tab-separated line per
    # image: a tab or newline in one broke that line (the .npz reader refuses them too)
    for name in classes:
        if not name.isprintable():
            raise data_error(
                f"{str(labeled / name)!r} is a class folder whose name has a tab, newline or other "
                "control character; rename it (its name is the class name predict prints)"
            )
    return classes


def folder_split(
    data_dir: Path | str, resolution: int = 32, max_eager_bytes: int = EAGER_BYTES
) -> SSLSplit:
    """The split of a folder of your own images (module docstring has the rules), or of a .npz."""
    root = Path(data_dir)
    npz = resolve_npz(root, strict=False)
    if npz is not None:
        return build_split("npz", *read_npz(npz, resolution))
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "is missing"
        raise data_error(f"data directory {root} {what}: expected {LAYOUT}; check --data-dir")
    classes = _classes(root / "labeled")
    paths, labels = _class_files(root / "labeled", classes, "labeled")
    unlabeled = root / "unlabeled"
    if not unlabeled.is_dir():
        what = (
            "is not a folder: replace it with a folder and" if unlabeled.exists() else "is missing:"
        )
        raise data_error(
            f"{unlabeled} {what} put the unlabeled images there (any depth); expected {LAYOUT}"
        )
    unlabeled_files = list_images(unlabeled)
    if not unlabeled_files:
        raise data_error(
            f"{unlabeled} has no images: put the unlabeled {_ACCEPTED} there (any depth; "
            "hidden files are skipped); semi-supervised training needs them"
        )
    test_paths: list[str] = []
    test_labels: list[int] = []
    if (root / "test").exists():
        if not (root / "test").is_dir():  # was "cannot be listed (NotADirectoryError: ...)"
            raise data_error(
                f"{root / 'test'} is not a folder: put the test images in test/<class>/ as in "
                "labeled/, or remove it to train without a test set"
            )
        if not _subfolders(root / "test"):
            raise data_error(
                f"{root / 'test'} has no class folders: put the test images in test/<class>/ as "
                "in labeled/, or remove test/ to train without a test set"
            )
        _check_no_loose_images(root / "test")
        test_paths, test_labels = _class_files(root / "test", classes, "test")

    sets = [
        OwnImages(paths, resolution, f"the labeled folder {root / 'labeled'}"),
        OwnImages(test_paths, resolution, f"the test folder {root / 'test'}"),
        OwnImages(
            [str(unlabeled / f) for f in unlabeled_files],
            resolution,
            f"the unlabeled folder {unlabeled}",
        ),
    ]
    budget = max_eager_bytes
    decoded: list[np.ndarray | LazyImages] = []
    for images in sets:
        size = int(np.prod(images.shape))
        if size <= budget:
            decoded.append(decode_all(images))
            budget -= size
        else:
            decoded.append(images)
    x_labeled, x_test, x_unlabeled = decoded
    return build_split(
        "folder",
        x_labeled,
        np.asarray(labels, dtype=np.int64),
        x_unlabeled,
        x_test,
        np.asarray(test_labels, dtype=np.int64),
        classes,
    )


def npz_split(data_dir: Path | str, resolution: int = 32) -> SSLSplit:
    """The split of a ``.npz`` of arrays: ``data_dir`` is the file, or a folder holding ``data.npz``
    (:mod:`metapl.data.own_npz` has the keys); tuning split as for folders."""
    return build_split("npz", *read_npz(resolve_npz(Path(data_dir), strict=True), resolution))
