"""Tiny CIFAR-10, SVHN and ImageNet files in the official formats, for end-to-end runs of the engine.

CIFAR-10: Python 2 pickles (byte-string keys, numpy's ``_reconstruct`` under
``numpy.core.multiarray``) of ``{b"data": uint8 [n, 3072] (R, G, B planes), b"labels": [n ints]}`` in
``<root>/cifar-10-batches-py/data_batch_1..5`` and ``test_batch``. SVHN: MATLAB v5 files with ``X``
uint8 ``[32, 32, 3, n]`` and ``y`` ``[n, 1]`` in 1..10 (10 stands for the digit 0). ImageNet: class
folders of JPEGs, ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))


class _Py2BytesPickler(pickle._Pickler):
    """The pure-Python pickler, with str and bytes written as Python 2 ``str`` opcodes."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def random_images(n: int, seed: int) -> np.ndarray:
    """``n`` random uint8 RGB images, NHWC ``[n, 32, 32, 3]``."""
    return np.random.RandomState(seed).randint(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """One CIFAR-10 batch file as the official archive has it (Python 2 pickle, protocol 2)."""
    rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32))
    batch = {
        b"batch_label": b"fake batch",
        b"labels": [int(v) for v in labels],
        b"data": rows,
        b"filenames": [b"fake_%d.png" % i for i in range(len(images))],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        _Py2BytesPickler(f, protocol=2).dump(batch)
    # The real files were written by numpy 1.x, whose _reconstruct lived in numpy.core.multiarray.
    data = path.read_bytes().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(data)


def write_cifar10(root: Path, per_batch: int = 800, test: int = 100) -> Path:
    """``root/cifar-10-batches-py`` with 5 x ``per_batch`` training and ``test`` test images.

    Labels cycle through 0..9. The cifar10-4k split needs ``5 * per_batch >= 4000``. Returns ``root``.
    """
    folder = root / "cifar-10-batches-py"
    for b, name in enumerate(CIFAR_TRAIN_FILES):
        labels = (np.arange(per_batch) + b) % 10
        write_cifar_batch(folder / name, random_images(per_batch, seed=b), labels)
    write_cifar_batch(folder / "test_batch", random_images(test, seed=99), np.arange(test) % 10)
    return root


def write_svhn_mat(path: Path, n: int, seed: int = 0) -> None:
    """One SVHN cropped-digits file (format 2) with ``n`` random images, digits cycling 0..9."""
    digits = np.arange(n) % 10
    stored = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": random_images(n, seed).transpose(1, 2, 3, 0), "y": stored})


def write_svhn(root: Path, train: int = 1000, test: int = 50) -> Path:
    """``root/{train,test}_32x32.mat``; the svhn-1k split needs ``train >= 1000``. Returns ``root``."""
    write_svhn_mat(root / "train_32x32.mat", train, seed=0)
    write_svhn_mat(root / "test_32x32.mat", test, seed=1)
    return root


def write_imagenet(
    root: Path, train: dict[str, int], val: dict[str, int], size: tuple[int, int] = (6, 4)
) -> Path:
    """``root/{train,val}/<wnid>/<wnid>_<i>.JPEG`` with ``train[wnid]`` and ``val[wnid]`` tiny JPEGs per
    class (val's classes must be among train's), flat colours. Returns ``root``."""
    for split, counts in (("train", train), ("val", val)):
        classes = sorted(counts)
        for wnid, count in counts.items():
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                color = (classes.index(wnid) * 20 % 256, i % 256, 9)
                Image.new("RGB", size, color).save(folder / f"{wnid}_{i:04d}.JPEG", format="JPEG")
    return root
