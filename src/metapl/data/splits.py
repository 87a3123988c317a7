"""The paper's splits: CIFAR-10-4K, SVHN-1K, ImageNet-10% (Section 4.1, Appendix C.1), ImageNet with
20%, 40% and 80% of the labels (Figure 7) and the full datasets (Section 4.2).

Rules (sizes are parameters; the defaults are the paper's):

- ``cifar10-4k``: labeled = the first 4,000 training images (data_batch_1 .. 5 in file order);
  tuning = the **last 400 of those 4,000** (indices 3,600 .. 3,999); unlabeled = all 50,000 training
  images (the labeled ones included, as in the paper's codebase), less the tuning ones in
  :meth:`SSLSplit.tuning_view`; test = test_batch.
- ``svhn-1k``: labeled = the first 1,000 of train_32x32.mat; no tuning split (the paper tunes on
  CIFAR-10 and reuses the values); unlabeled = all of train_32x32.mat (plus extra_32x32.mat with
  ``include_extra=True``); test = test_32x32.mat.
- ``imagenet-10pct``: the paper takes the first 102 of 1,024 TFRecord shards, whose images were
  shuffled before sharding. With class folders: list the training files in (class, file name) order,
  draw ``numpy.random.RandomState(seed).permutation(N)`` (seed 0), and label the images at its first
  ``round(N * 102 / 1024)`` positions (:func:`labeled_fraction_indices`), in permutation order. Like
  the shards this is a random ~10% with slightly unequal classes. Tuning = the last
  ``min(12,800, n_labeled // 10)`` of them (the paper's "about 12,800", 10% of the labeled set as on
  CIFAR-10, so it scales down on small copies); unlabeled = all training images (less the tuning
  ones in :meth:`SSLSplit.tuning_view`); test = val.
- ``imagenet-20pct``, ``imagenet-40pct``, ``imagenet-80pct`` (Figure 7): the same rule with the first
  205, 410 and 819 of 1,024 shards (``round(1024 * p)``; :data:`IMAGENET_LABELED_SHARDS`), i.e.
  ``round(N * shards / 1024)`` positions of the *same* seed-0 permutation. Each labeled set is a
  prefix of that permutation, so they are nested: 10% ⊂ 20% ⊂ 40% ⊂ 80% (the same seed and files).
  The tuning sets are not nested: each is the last ``min(12,800, n_labeled // 10)`` of its own
  labeled set.

``x_labeled`` always *includes* the tuning examples: final runs train on all of them, as the paper's
Table 1 does. For hyper-parameter search use :meth:`SSLSplit.tuning_view`, which trains on the rest and
evaluates on the tuning examples.

The full-dataset splits of Section 4.2 (Table 2). The paper *reserves* 4,000 CIFAR-10 images, 7,300
SVHN images and 40 of 1,024 ImageNet shards for hyper-parameter tuning and labels the rest ("This
leaves about 45,000 labeled examples for CIFAR-10"). So here ``x_labeled`` is the rest alone, in
final runs too (``tune_in_labeled=False``; :meth:`SSLSplit.tuning_view` keeps it whole), and the
reserved examples are ``x_tune``.

- ``cifar10-full``: tuning = the first ``num_tune`` (4,000) training images; labeled = training images
  ``num_tune .. 49,999`` in file order; test = test_batch. Unlabeled = the images
  of ``unlabeled_dir`` (:func:`metapl.data.folder.unlabeled_folder`, resized to 32) when given, else the
  46,000 non-tuning training images. The paper's unlabeled set is 80M TinyImages, filtered to the
  top-K (K = 50,000) per class by the pre-trained teacher; TinyImages has been withdrawn and may not be
  redistributed, so that set cannot be reproduced. The same top-K selection
  (:mod:`metapl.train.large_teacher`) applies to whatever folder is given.
- ``svhn-full``: tuning = the first ``num_tune`` (7,300) images of train_32x32.mat; labeled = the other
  65,957 in file order; test = test_32x32.mat. Unlabeled = extra_32x32.mat
  (531,131 images; the split needs it), or the images of ``unlabeled_dir`` (resized to 32) instead when
  given.
- ``imagenet-full``: with the training files in (class, file name) order and ``p =
  RandomState(seed).permutation(N)`` (seed 0, the rule of the 10% split), tuning = the first
  ``round(N * 40 / 1024)`` positions of ``p`` (:func:`labeled_fraction_indices` with ``fraction = 40/1024``,
  i.e. "40 shards"); labeled = the remaining positions of ``p`` in permutation order; test = val. Unlabeled = the images of ``unlabeled_dir`` (a YFCC100M subset in the paper) at the
  split's ``resolution`` and ``crop_fraction`` when given, else the non-tuning training images.

The default unlabeled sets (no ``unlabeled_dir``) leave the tuning images out, so that a tuning run
never sees its evaluation images, even unlabeled. (For the Section 4.1 splits above the final runs'
unlabeled set holds them, and :meth:`SSLSplit.tuning_view` takes them out.)

Images are uint8 NHWC arrays for CIFAR-10 and SVHN and :class:`~metapl.data.imagenet.LazyImages`
for ImageNet and for unlabeled image folders (:class:`metapl.data.folder.FolderImages`); both index as
``x[i] -> [H, W, 3]`` and ``x[indices] -> [B, H, W, 3]``.

Your own data (not in the paper): ``folder`` (class folders of PNG/JPEG files, or a ``.npz``) and
``npz`` (a ``.npz`` of arrays); :mod:`metapl.data.own` and :mod:`metapl.data.own_npz` have the rules.
Their tuning split is the last ``max(1, n // 10)`` labeled images of each class with ``n >= 2``, and
their splits carry ``class_names`` (the other splits leave it ``None``).
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
from metapl.data.folder import unlabeled_folder
from metapl.data.imagenet import LazyImages, load_imagenet
from metapl.data.own import folder_split, npz_split
from metapl.errors import ConfigError

Images = np.ndarray | LazyImages
IMAGENET_SHARDS = 1024
IMAGENET_FRACTION = 102 / IMAGENET_SHARDS  # the paper's first 102 of 1,024 shards
# Labeled shards of the ImageNet label-fraction splits: Section 4.1's 10% and Figure 7's 20/40/80%.
IMAGENET_LABELED_SHARDS = {
    "imagenet-10pct": 102,
    "imagenet-20pct": 205,
    "imagenet-40pct": 410,
    "imagenet-80pct": 819,
}
IMAGENET_TUNE_FRACTION = 40 / 1024  # Section 4.2: "40 data shards of ImageNet" reserved for tuning


@dataclass(frozen=True)
class SSLSplit:
    """Labeled, unlabeled, tuning and test data of one benchmark; labels int64 in ``0..num_classes-1``.

    The tuning examples are the last ``len(y_tune)`` entries of the labeled set, unless
    ``tune_in_labeled`` is False (Section 4.2's full splits: the paper reserves them).
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
    # Label i's name, where the data names its classes (your own data: the sorted folder names).
    class_names: tuple[str, ...] | None = None
    # Where the tuning images sit in x_unlabeled, when the unlabeled set holds them (cifar10-4k and
    # ImageNet-%: unlabeled = all training images, as in the paper). tuning_view drops them.
    tune_in_unlabeled: np.ndarray | None = None
    # Whether x_labeled ends with the tuning examples: final runs of Section 4.1 train on all the
    # labeled examples, as Table 1 does; Section 4.2 reserves them ("This leaves about 45,000
    # labeled examples for CIFAR-10"), so the full splits hold them out of x_labeled.
    tune_in_labeled: bool = True

    def tuning_view(self) -> SSLSplit:
        """The split for hyper-parameter search: labeled minus tuning examples, tested on those,
        and unlabeled minus them too, so a tuning run never sees its evaluation images."""
        if len(self.y_tune) == 0:
            raise ConfigError(
                f"{self.name} has no tuning split: none of its labeled examples is held out "
                "for tuning"
            )
        keep = np.arange(len(self.y_labeled) - (len(self.y_tune) if self.tune_in_labeled else 0))
        x_unlabeled = self.x_unlabeled
        if self.tune_in_unlabeled is not None:
            rest = np.ones(len(x_unlabeled), dtype=bool)
            rest[self.tune_in_unlabeled] = False
            x_unlabeled = _take(x_unlabeled, np.flatnonzero(rest))
        return dataclasses.replace(
            self,
            x_labeled=_take(self.x_labeled, keep),
            y_labeled=self.y_labeled[keep],
            x_unlabeled=x_unlabeled,
            tune_in_unlabeled=None,
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


def _need(
    name: str, source: Path, have: int, need: int, what: str, option: str = "num_labeled"
) -> None:
    if have < need:
        # `metapl train` has no option for the split's sizes (they are the paper's): the advice
        # on `option` is for a caller of the split function.
        raise data_error(
            f"{source} has only {have} {what}, but {name} needs {need}: point the data directory "
            f"at the full dataset (calling metapl.data.splits yourself, you can pass a smaller "
            f"{option})"
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
        tune_in_unlabeled=np.arange(num_labeled - num_tune, num_labeled),
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


def _imagenet_labeled(
    name: str,
    data_dir: Path | str,
    fraction: float,
    num_tune: int,
    resolution: int,
    crop_fraction: float,
    seed: int,
) -> SSLSplit:
    """ImageNet with the seeded ``fraction`` of the training images labeled (module docstring)."""
    train, val = load_imagenet(data_dir, resolution, crop_fraction)
    labeled = labeled_fraction_indices(len(train), fraction, seed)
    _need(name, Path(data_dir) / "train", len(labeled), 1, "labeled images in the fraction")
    n_tune = min(num_tune, len(labeled) // 10)
    _check_sizes(name, len(labeled), n_tune)
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
        name=name,
        tune_in_unlabeled=tune,
    )


def _imagenet_fraction_split(name: str, shards: int) -> Callable[..., SSLSplit]:
    """The loader of ``name``: :func:`_imagenet_labeled` with ``shards / 1024`` as the default fraction.

    One closure per split rather than a ``shards`` option, so that each split keeps the options of the
    original ``imagenet-10pct`` loader (:func:`load_split` reads them from the signature).
    """

    def loader(
        data_dir: Path | str,
        fraction: float = shards / IMAGENET_SHARDS,
        num_tune: int = 12800,
        resolution: int = 224,
        crop_fraction: float = 1.0,
        seed: int = 0,
    ) -> SSLSplit:
        return _imagenet_labeled(
            name, data_dir, fraction, num_tune, resolution, crop_fraction, seed
        )

    loader.__name__ = loader.__qualname__ = name.replace("-", "_")
    loader.__doc__ = (
        f"ImageNet with a seeded {shards}/{IMAGENET_SHARDS} of the training images labeled "
        "(module docstring has the rule)."
    )
    return loader


IMAGENET_FRACTION_SPLITS = {
    name: _imagenet_fraction_split(name, shards) for name, shards in IMAGENET_LABELED_SHARDS.items()
}
imagenet_10pct = IMAGENET_FRACTION_SPLITS["imagenet-10pct"]
imagenet_20pct = IMAGENET_FRACTION_SPLITS["imagenet-20pct"]
imagenet_40pct = IMAGENET_FRACTION_SPLITS["imagenet-40pct"]
imagenet_80pct = IMAGENET_FRACTION_SPLITS["imagenet-80pct"]


def _check_num_tune(name: str, num_tune: int) -> None:
    if num_tune < 0:
        raise ConfigError(f"{name}: num_tune must be at least 0, got {num_tune}")


def _full_split(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_tune: int,
    x_unlabeled: Images | None,
    num_classes: int,
) -> SSLSplit:
    """A full split of the images and labels ``train``: the first ``num_tune`` reserved for
    tuning, the rest labeled; unlabeled = ``x_unlabeled``, or the labeled (non-tuning) images when
    None."""
    x_train, y_train = train
    return SSLSplit(
        x_labeled=x_train[num_tune:],
        y_labeled=y_train[num_tune:],
        x_unlabeled=x_train[num_tune:] if x_unlabeled is None else x_unlabeled,
        x_tune=x_train[:num_tune],
        y_tune=y_train[:num_tune],
        x_test=test[0],
        y_test=test[1],
        num_classes=num_classes,
        name=name,
        tune_in_labeled=False,
    )


def cifar10_full(
    data_dir: Path | str, num_tune: int = 4000, unlabeled_dir: Path | str | None = None
) -> SSLSplit:
    """All of CIFAR-10's training images labeled, the first ``num_tune`` reserved for tuning
    (module docstring has the rule); unlabeled from ``unlabeled_dir`` or the non-tuning images."""
    name = "cifar10-full"
    _check_num_tune(name, num_tune)
    x_unlabeled = None if unlabeled_dir is None else unlabeled_folder(unlabeled_dir, 32)
    train = cifar.load_cifar10(data_dir, train=True)
    n = len(train[1])
    _need(name, cifar.find_dir(data_dir), n, num_tune + 1, "training images", "num_tune")
    test = cifar.load_cifar10(data_dir, train=False)
    return _full_split(name, train, test, num_tune, x_unlabeled, cifar.NUM_CLASSES)


def svhn_full(
    data_dir: Path | str, num_tune: int = 7300, unlabeled_dir: Path | str | None = None
) -> SSLSplit:
    """All of SVHN's train_32x32.mat labeled, the first ``num_tune`` reserved for tuning; unlabeled =
    extra_32x32.mat (required unless ``unlabeled_dir`` is given; module docstring has the rule)."""
    name = "svhn-full"
    _check_num_tune(name, num_tune)
    extra_path = Path(data_dir) / svhn.file_name("extra")
    x_unlabeled: Images | None
    if unlabeled_dir is None:
        if not extra_path.is_file():  # checked first: the other files take a while to read
            raise data_error(
                f"{extra_path} is missing: svhn-full needs it, its ~531,000 extra images are the "
                "split's unlabeled data (Section 4.2); download extra_32x32.mat from "
                "http://ufldl.stanford.edu/housenumbers/ into that folder, or pass unlabeled_dir"
            )
        x_unlabeled = None
    else:
        x_unlabeled = unlabeled_folder(unlabeled_dir, 32)
    train = svhn.load_svhn(data_dir, "train")
    n = len(train[1])
    _need(name, Path(data_dir) / svhn.file_name("train"), n, num_tune + 1, "images", "num_tune")
    test = svhn.load_svhn(data_dir, "test")
    if x_unlabeled is None:
        x_unlabeled = svhn.read_mat(extra_path)[0]
    return _full_split(name, train, test, num_tune, x_unlabeled, svhn.NUM_CLASSES)


def imagenet_full(
    data_dir: Path | str,
    tune_fraction: float = IMAGENET_TUNE_FRACTION,
    resolution: int = 224,
    crop_fraction: float = 1.0,
    seed: int = 0,
    unlabeled_dir: Path | str | None = None,
) -> SSLSplit:
    """All of ImageNet's training images labeled, a seeded ``tune_fraction`` (40/1024) reserved for
    tuning; unlabeled from ``unlabeled_dir`` or the non-tuning images (module docstring has the rule)."""
    name = "imagenet-full"
    if not 0.0 <= tune_fraction < 1.0:
        raise ConfigError(f"{name}: tune_fraction must be in [0, 1), got {tune_fraction}")
    x_unlabeled = (
        None
        if unlabeled_dir is None
        else unlabeled_folder(unlabeled_dir, resolution, crop_fraction)
    )
    train, val = load_imagenet(data_dir, resolution, crop_fraction)
    n = len(train)
    n_tune = round(n * tune_fraction)  # as labeled_fraction_indices(n, tune_fraction, seed)
    _need(name, Path(data_dir) / "train", n, n_tune + 1, "images", "tune_fraction")
    order = np.random.RandomState(seed).permutation(n)
    tune, rest = order[:n_tune], order[n_tune:]
    x_labeled = train.images.subset(rest)
    return SSLSplit(
        x_labeled=x_labeled,
        y_labeled=train.labels[rest],
        x_unlabeled=x_labeled if x_unlabeled is None else x_unlabeled,
        x_tune=train.images.subset(tune),
        y_tune=train.labels[tune],
        x_test=val.images,
        y_test=val.labels,
        num_classes=train.num_classes,
        name=name,
        tune_in_labeled=False,
    )


SPLITS: dict[str, Callable[..., SSLSplit]] = {
    "cifar10-4k": cifar10_4k,
    "svhn-1k": svhn_1k,
    **IMAGENET_FRACTION_SPLITS,
    "cifar10-full": cifar10_full,
    "svhn-full": svhn_full,
    "imagenet-full": imagenet_full,
    "folder": folder_split,
    "npz": npz_split,
}
# Splits whose data_dir may also be a single file (a .npz of your own data); their readers say
# what they expect. The others read a folder, and a file in its place is refused up front.
READS_A_FILE = frozenset({"folder", "npz"})
# The splits whose unlabeled images may come from a folder of their own (``unlabeled_dir``).
TAKES_UNLABELED_DIR = tuple(
    name
    for name, loader in SPLITS.items()
    if "unlabeled_dir" in inspect.signature(loader).parameters
)
# Every config `dataset`: the splits read from a folder, and scikit-learn's digits, which ships with
# scikit-learn and is split per seed (metapl.data.digits).
DATASETS = (*SPLITS, "digits")


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
    folder = Path(data_dir)
    # Said of the folder itself: a mistyped path was reported as its first file missing.
    if not folder.exists():
        raise data_error(
            f"--data-dir {folder} does not exist; pass the folder that holds the dataset's files"
        )
    if name not in READS_A_FILE and not folder.is_dir():
        raise data_error(
            f"--data-dir {folder} is a file; it takes the folder that holds the dataset's files"
        )
    return loader(data_dir, **options)
