"""The paper's semi-supervised splits (Section 4.1, Appendix C.1): CIFAR-10-4K, SVHN-1K, ImageNet-10%.

Rules (sizes are parameters; the defaults are the paper's):

- ``cifar10-4k``: labeled = the first 4,000 training images (data_batch_1 .. 5 in file order);
  tuning = the **last 400 of those 4,000** (indices 3,600 .. 3,999); unlabeled = all 50,000 training
  images (the labeled ones included, as in the paper's codebase); test = test_batch.
- ``svhn-1k``: labeled = the first 1,000 of train_32x32.mat; no tuning split (the paper tunes on
  CIFAR-10 and reuses the values); unlabeled = all of train_32x32.mat (plus extra_32x32.mat with
  ``include_extra=True``); test = test_32x32.mat.
- ``imagenet-10pct``: the paper takes the first 102 of 1,024 TFRecord shards, whose images were
  shuffled before sharding. With class folders: list the training files in (class, file name) order,
  draw ``numpy.random.RandomState(seed).permutation(N)`` (seed 0), and label the images at its first
  ``round(N * 102 / 1024)`` positions (:func:`labeled_fraction_indices`), in permutation order. Like
  the shards this is a random ~10% with slightly unequal classes. Tuning = the last
  ``min(12,800, n_labeled // 10)`` of them (the paper's "about 12,800", 10% of the labeled set as on
  CIFAR-10, so it scales down on small copies); unlabeled = all training images; test = val.

``x_labeled`` always *includes* the tuning examples: final runs train on all of them, as the paper's
Table 1 does. For hyper-parameter search use :meth:`SSLSplit.tuning_view`, which trains on the rest and
evaluates on the tuning examples.

Images are uint8 NHWC arrays for CIFAR-10 and SVHN and :class:`~metapl.data.imagenet.LazyImages`
for ImageNet; both index as ``x[i] -> [H, W, 3]`` and ``x[indices] -> [B, H, W, 3]``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metapl.data import cifar, svhn
from metapl.data.arrays import data_error
from metapl.data.imagenet import LazyImages, load_imagenet
from metapl.errors import ConfigError

Images = np.ndarray | LazyImages
IMAGENET_FRACTION = 102 / 1024  # the paper's first 102 of 1,024 shards


@dataclass(frozen=True)
class SSLSplit:
    """Labeled, unlabeled, tuning and test data of one benchmark; labels int64 in ``0..num_classes-1``.

    The tuning examples are the last ``len(y_tune)`` entries of the labeled set.
    """

    x_labeled: Images
    y_labeled: np.ndarray
    x_unlabeled: Images
    x_tune: Images
    y_tune: np.ndarray
    x_test: Images
    y_test: np.ndarray
    num_classes: int
    name: str

    def tuning_view(self) -> SSLSplit:
        """The split for hyper-parameter search: labeled minus tuning examples, tested on those."""
        if len(self.y_tune) == 0:
            raise ConfigError(
                f"{self.name} has no tuning split (the paper reuses CIFAR-10's values)"
            )
        keep = np.arange(len(self.y_labeled) - len(self.y_tune))
        return dataclasses.replace(
            self,
            x_labeled=_take(self.x_labeled, keep),
            y_labeled=self.y_labeled[keep],
            x_tune=_take(self.x_tune, np.arange(0)),
            y_tune=self.y_tune[:0],
            x_test=self.x_tune,
            y_test=self.y_tune,
            name=f"{self.name}-tune",
        )


def _take(x: Images, indices: np.ndarray) -> Images:
    """Rows of an array or a lazy image list; arrays copy, lazy lists stay lazy."""
    return x.subset(indices) if isinstance(x, LazyImages) else x[indices]


def _check_sizes(name: str, num_labeled: int, num_tune: int) -> None:
    if num_labeled < 1:
        raise ConfigError(f"{name}: num_labeled must be at least 1, got {num_labeled}")
    if not 0 <= num_tune < num_labeled:
        raise ConfigError(
            f"{name}: num_tune must be in 0..num_labeled-1, got {num_tune} of {num_labeled}"
        )


def _need(name: str, source: Path, have: int, need: int, what: str) -> None:
    if have < need:
        raise data_error(
            f"{source} has only {have} {what}, but {name} needs {need}: point the data directory "
            "at the full dataset, or pass a smaller num_labeled"
        )


def cifar10_4k(data_dir: Path | str, num_labeled: int = 4000, num_tune: int = 400) -> SSLSplit:
    """CIFAR-10 with the first ``num_labeled`` training images labeled; the last ``num_tune`` of them tune."""
    _check_sizes("cifar10-4k", num_labeled, num_tune)
    x_train, y_train = cifar.load_cifar10(data_dir, train=True)
    _need("cifar10-4k", cifar.find_dir(data_dir), len(y_train), num_labeled, "training images")
    x_test, y_test = cifar.load_cifar10(data_dir, train=False)
    tune = slice(num_labeled - num_tune, num_labeled)
    return SSLSplit(
        x_labeled=x_train[:num_labeled],
        y_labeled=y_train[:num_labeled],
        x_unlabeled=x_train,
        x_tune=x_train[tune],
        y_tune=y_train[tune],
        x_test=x_test,
        y_test=y_test,
        num_classes=cifar.NUM_CLASSES,
        name="cifar10-4k",
    )


def svhn_1k(data_dir: Path | str, num_labeled: int = 1000, include_extra: bool = False) -> SSLSplit:
    """SVHN with the first ``num_labeled`` training images labeled and no tuning split."""
    _check_sizes("svhn-1k", num_labeled, 0)
    x_train, y_train = svhn.load_svhn(data_dir, "train")
    _need("svhn-1k", Path(data_dir) / svhn.file_name("train"), len(y_train), num_labeled, "images")
    x_test, y_test = svhn.load_svhn(data_dir, "test")
    x_unlabeled = x_train
    if include_extra:
        x_unlabeled = np.concatenate([x_train, svhn.load_svhn(data_dir, "extra")[0]])
    return SSLSplit(
        x_labeled=x_train[:num_labeled],
        y_labeled=y_train[:num_labeled],
        x_unlabeled=x_unlabeled,
        x_tune=x_train[:0],
        y_tune=y_train[:0],
        x_test=x_test,
        y_test=y_test,
        num_classes=svhn.NUM_CLASSES,
        name="svhn-1k",
    )


def labeled_fraction_indices(
    n: int, fraction: float = IMAGENET_FRACTION, seed: int = 0
) -> np.ndarray:
    """Positions of the labeled images among ``n`` sorted files: the first ``round(n * fraction)`` of
    ``RandomState(seed).permutation(n)``, in permutation order (the shards' shuffled order)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    return np.random.RandomState(seed).permutation(n)[: round(n * fraction)]


def imagenet_10pct(
    data_dir: Path | str,
    fraction: float = IMAGENET_FRACTION,
    num_tune: int = 12800,
    resolution: int = 224,
    crop_fraction: float = 1.0,
    seed: int = 0,
) -> SSLSplit:
    """ImageNet with a seeded ~10% of the training images labeled (module docstring has the rule)."""
    train, val = load_imagenet(data_dir, resolution, crop_fraction)
    labeled = labeled_fraction_indices(len(train), fraction, seed)
    _need(
        "imagenet-10pct",
        Path(data_dir) / "train",
        len(labeled),
        1,
        "labeled images in the fraction",
    )
    n_tune = min(num_tune, len(labeled) // 10)
    _check_sizes("imagenet-10pct", len(labeled), n_tune)
    tune = labeled[len(labeled) - n_tune :]
    return SSLSplit(
        x_labeled=train.images.subset(labeled),
        y_labeled=train.labels[labeled],
        x_unlabeled=train.images,
        x_tune=train.images.subset(tune),
        y_tune=train.labels[tune],
        x_test=val.images,
        y_test=val.labels,
        num_classes=train.num_classes,
        name="imagenet-10pct",
    )


SPLITS: dict[str, Callable[..., SSLSplit]] = {
    "cifar10-4k": cifar10_4k,
    "svhn-1k": svhn_1k,
    "imagenet-10pct": imagenet_10pct,
}


def load_split(name: str, data_dir: Path | str, **options: Any) -> SSLSplit:
    """The split called ``name`` (a key of :data:`SPLITS`) from ``data_dir``; ``options`` go to its loader."""
    if name not in SPLITS:
        raise ConfigError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
    loader = SPLITS[name]
    accepted = list(inspect.signature(loader).parameters)[1:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"split {name!r} has no option {unknown[0]!r}; it takes {', '.join(accepted)}"
        )
    return loader(data_dir, **options)
