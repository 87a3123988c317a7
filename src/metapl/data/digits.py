"""scikit-learn's 8x8 digits as a semi-supervised benchmark that runs on a laptop CPU.

For a seed: test = ``train_test_split(X, y, test_size=497, stratify=y, random_state=seed)``;
labeled = K per class from the rest, chosen with ``numpy.random.RandomState(seed)``; the rest is
unlabeled.

Digits has no tuning split unless asked for: ``tune_per_class=T`` draws T *more* images per class
from the unlabeled pool (same generator, after the K) and appends them as the last ``10 T`` entries
of the labeled set, which is :class:`SSLSplit`'s contract for tuning examples. A tuning run
(``tuning=true``) then trains on the K per class and evaluates on the T; a final run trains on all
K + T, as the paper's CIFAR-10 runs train on all 4,000 labels including the 400 tuning ones. The K
labeled images are the same with or without T, and the tuning images are never unlabeled data.
Images are uint8 NHWC like every other reader's output, but with one gray channel: ``[N, 8, 8, 1]``
(the 0..16 intensities scaled to 0..255).
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from metapl.data.splits import SSLSplit
from metapl.errors import ConfigError

TEST_SIZE = 497


def digits_split(seed: int, labels_per_class: int, tune_per_class: int = 0) -> SSLSplit:
    x, y = load_digits(return_X_y=True)
    images = np.round(x * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8, 1)
    idx_rest, idx_test = train_test_split(
        np.arange(len(y)), test_size=TEST_SIZE, stratify=y, random_state=seed
    )
    y_rest = y[idx_rest]
    rng = np.random.RandomState(seed)
    smallest = int(np.bincount(y_rest).min())
    if not 1 <= labels_per_class < smallest:
        raise ConfigError(
            f"labels_per_class must be between 1 and {smallest - 1} for digits, got {labels_per_class}"
        )
    if not 0 <= tune_per_class < smallest - labels_per_class:
        raise ConfigError(
            f"tune_per_class must be between 0 and {smallest - labels_per_class - 1} for digits "
            f"with {labels_per_class} labels per class, got {tune_per_class}"
        )
    picked = np.concatenate(
        [
            rng.choice(np.flatnonzero(y_rest == c), labels_per_class, replace=False)
            for c in range(10)
        ]
    )
    labeled = idx_rest[np.sort(picked)]
    unlabeled = np.setdiff1d(idx_rest, labeled)
    tune = labeled[:0]
    if tune_per_class:  # drawn after the K so that the labeled images do not depend on T
        y_pool = y[unlabeled]
        drawn = [
            rng.choice(np.flatnonzero(y_pool == c), tune_per_class, replace=False)
            for c in range(10)
        ]
        tune = unlabeled[np.sort(np.concatenate(drawn))]
        unlabeled = np.setdiff1d(unlabeled, tune)
    labeled = np.concatenate([labeled, tune])
    name = f"digits-{labels_per_class}pc-seed{seed}"
    if tune_per_class:
        name = f"digits-{labels_per_class}pc-{tune_per_class}tune-seed{seed}"
    return SSLSplit(
        x_labeled=images[labeled],
        y_labeled=y[labeled].astype(np.int64),
        x_unlabeled=images[unlabeled],
        x_tune=images[tune],
        y_tune=y[tune].astype(np.int64),
        x_test=images[idx_test],
        y_test=y[idx_test].astype(np.int64),
        num_classes=10,
        name=name,
    )
