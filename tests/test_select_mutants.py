"""Top-K selection (metapl.reduced.select) where a wrong change still passed test_precompute.py:
the degenerate shapes, the input checks, and which entry a non-finite error names."""

from __future__ import annotations

import numpy as np
import pytest
from test_precompute import PROBS

from metapl.errors import ConfigError, DataError
from metapl.reduced.select import top_k_assignments


def test_no_classes_selects_nothing():
    indices, assigned = top_k_assignments(np.zeros((4, 0), np.float32), 2)
    assert indices.tolist() == [] and assigned.tolist() == []


@pytest.mark.parametrize("k", [True, 1.0, "2"])
def test_k_must_be_a_true_integer(k):
    with pytest.raises(ConfigError, match="must be an integer >= 1"):
        top_k_assignments(PROBS, k)


def test_a_non_finite_probability_names_its_first_row_and_its_own_class():
    """One class per block (block_bytes=1): the class named is the column's, not its place in
    the block; of two bad rows, the first."""
    bad = PROBS.copy()
    bad[1, 2], bad[3, 2] = np.nan, np.inf
    with pytest.raises(DataError, match=r"not finite \(row 1, class 2\)"):
        top_k_assignments(bad, 1, block_bytes=1)


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.bool_])
def test_probabilities_that_are_not_floats_are_refused(dtype):
    """Integer or boolean "probabilities" (labels or counts passed by mistake) are a DataError,
    not ranked as if they were a teacher's confidences."""
    with pytest.raises(DataError, match="must be a float"):
        top_k_assignments((PROBS * 10).astype(dtype), 1)
