"""TwoMoons as in Figure 1: 1,000 + 1,000 points on two half circles, 3 + 3 of them labeled."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.datasets import make_moons


@dataclass
class TwoMoons:
    x: np.ndarray  # [N, 2] float32, every point (labeled ones included)
    y: np.ndarray  # [N] int64 true labels (used for evaluation only)
    labeled: np.ndarray  # indices of the labeled points

    @property
    def unlabeled(self) -> np.ndarray:
        return np.setdiff1d(np.arange(len(self.y)), self.labeled)


def make_twomoons(
    seed: int, noise: float = 0.1, per_class: int = 1000, labeled_per_class: int = 3
) -> TwoMoons:
    """The points come from ``make_moons(random_state=seed)``; the labeled points are drawn per
    class with ``numpy.random.RandomState(seed)``."""
    x, y = make_moons(n_samples=2 * per_class, noise=noise, random_state=seed)
    rng = np.random.RandomState(seed)
    labeled = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), labeled_per_class, replace=False) for c in (0, 1)]
    )
    return TwoMoons(x.astype(np.float32), y.astype(np.int64), np.sort(labeled))
