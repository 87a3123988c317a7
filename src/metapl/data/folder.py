"""An unlabeled image folder: every PNG and JPEG under one folder, at any depth, decoded lazily.

This is the reader for the out-of-domain unlabeled data of the full-dataset splits (Section 4.2): an
export of TinyImages for CIFAR-10 or of a YFCC100M subset for ImageNet, in whatever sub-folder
layout it came in. Labels, class folders and file names carry no meaning here.

Rules:

- Files: every regular file (or link to one) whose name ends in ``.png``, ``.jpg`` or ``.jpeg`` in
  any letter case, in ``path`` or any folder below it. Names starting with ``.`` (hidden files and
  folders, macOS ``._*`` resource forks) are skipped; linked folders are followed, each real folder
  once (under the name a walk in sorted name order meets first), so a link cycle cannot loop.
- Order: the files' paths relative to ``path``, with ``/`` separators, sorted as Python strings, so
  the order (and every index into it, e.g. a top-K selection) is the same on every machine.
- Decoding: on access, with :func:`metapl.data.imagenet.decode_image`: any PIL mode (grayscale,
  RGBA, palette, CMYK, ...) converted to RGB (alpha dropped), shorter side resized (bicubic) to
  ``round(resolution / crop_fraction)``, centre ``resolution x resolution`` crop; uint8 HWC.

Errors are one-line :class:`~metapl.errors.DataError`\\ s: a missing folder and a folder without
images when listing; an unreadable image (named) when it is read, since decoding millions of files
up front would take hours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metapl.data.arrays import data_error, describe
from metapl.data.imagenet import IMAGE_EXTENSIONS, LazyImages, decode_image
from metapl.errors import DataError

_ACCEPTED = "PNG or JPEG files (.png, .jpg, .jpeg in any letter case, at any depth)"


class FolderImages(LazyImages):
    """:class:`~metapl.data.imagenet.LazyImages` over an unlabeled folder; ``root`` is that folder.

    Indexes like a uint8 NHWC array, exactly as its base class; only the message for an unreadable
    file differs: it names ``where`` the file came from (by default the unlabeled folder) instead of
    the ImageNet layout. Your own labeled/test folders use it too (:mod:`metapl.data.own`).
    """

    def __init__(
        self,
        paths: Sequence[str],
        resolution: int,
        crop_fraction: float = 1.0,
        root: Path | str = ".",
        where: str | None = None,
    ):
        super().__init__(paths, resolution, crop_fraction)
        self.root = Path(root)
        # what the error for an unreadable file calls the folder it came from
        self.where = where or f"the unlabeled image folder {self.root}"

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if not isinstance(index, (int, np.integer)):
            return super().__getitem__(index)  # stacks self[int(i)], i.e. this method's int branch
        path = self.paths[index]
        try:
            return decode_image(path, self.resolution, self.crop_fraction)
        except DataError as exc:
            cause = exc.__context__  # decode_image raises "from None"; the PIL error is kept here
            detail = describe(cause) if cause is not None else str(exc)
            raise data_error(
                f"{path} is not a readable image ({detail}): expected {_ACCEPTED} in "
                f"{self.where}; re-save the file as PNG or JPEG, or delete it"
            ) from None

    def subset(self, indices: Sequence[int] | np.ndarray) -> FolderImages:
        """The images at ``indices``, in that order (no decoding)."""
        return FolderImages(
            [self.paths[int(i)] for i in indices],
            self.resolution,
            self.crop_fraction,
            self.root,
            self.where,
        )


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(path: Path | str) -> list[str]:
    """Relative ``/``-separated paths of the images under ``path``, sorted (module docstring rules)."""
    root = Path(path)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "is missing"
        raise data_error(
            f"unlabeled image folder {root} {what}: expected a folder of {_ACCEPTED}; "
            "check the unlabeled_dir option"
        )
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    pending = [("", root)]
    while pending:
        prefix, folder = pending.pop()
        info = folder.stat()
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        try:
            with os.scandir(folder) as it:
                # by name, not the file system's order: a folder reached by two names (a link)
                # is listed under the one walked first, so every machine picks the same one
                entries = sorted(it, key=lambda e: e.name, reverse=True)  # pop() takes the first
        except OSError as exc:
            raise data_error(f"{folder} cannot be listed ({describe(exc)})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # follows links
                pending.append((f"{prefix}{entry.name}/", Path(entry.path)))
            elif entry.is_file() and _is_image(entry.name):
                found.append(prefix + entry.name)
    found.sort()
    return found


def unlabeled_folder(path: Path | str, resolution: int, crop_fraction: float = 1.0) -> LazyImages:
    """Every PNG/JPEG under ``path`` (any depth, sorted relative paths) as lazily decoded images.

    Returns a :class:`FolderImages` (a :class:`~metapl.data.imagenet.LazyImages`):
    ``images[i] -> uint8 [resolution, resolution, 3]``, ``images[indices] -> [B, ...]``.
    """
    root = Path(path)
    images = FolderImages([], resolution, crop_fraction, root)  # checks the options before listing
    relative = list_images(root)
    if not relative:
        raise data_error(
            f"unlabeled image folder {root} has no images: expected {_ACCEPTED}; "
            "hidden files (names starting with '.') are skipped"
        )
    images.paths = [str(root / r) for r in relative]
    return images
