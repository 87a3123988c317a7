"""The NaN guard and the metric conversion (metapl.train.guards) where a wrong change still passed
test_train_utils.py and test_engine.py."""

from __future__ import annotations

import math

import pytest
import torch
from test_nonfinite_watch import check_once

from metapl.errors import NonFiniteLossError
from metapl.train.guards import to_floats


def test_one_bad_plain_number_among_good_ones_stops_the_run():
    with pytest.raises(NonFiniteLossError, match="step 2: b_lr is nan"):
        check_once({"a_acc": 0.5, "b_lr": math.nan, "loss": torch.tensor(1.0)}, step=2)


def test_each_tensor_of_a_group_keeps_its_own_value():
    """Several tensors of one device and dtype are read together, each back under its name."""
    metrics = {"x": torch.tensor(1.0), "lr": 0.5, "y": torch.tensor(2.0), "z": torch.tensor(3.0)}
    assert to_floats(metrics) == {"x": 1.0, "lr": 0.5, "y": 2.0, "z": 3.0}


def test_an_empty_tensor_is_not_a_scalar():
    with pytest.raises(ValueError, match=r"metric v has shape \(0,\), not a scalar"):
        to_floats({"v": torch.ones(0)})
