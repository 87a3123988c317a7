"""Gaps a mutation audit of ReducedMPL's data side (metapl.reduced.precompute and select) found:
boundaries and guards that test_precompute.py and test_select_mutants.py let a wrong change through.
Everything runs on the tiny arrays and linear models of test_precompute.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_precompute import C, Interruptible, N, _run
from torch import nn

from metapl.reduced.precompute import fingerprint_images, fingerprint_model, sidecar_path


def _images() -> np.ndarray:
    """test_precompute.py's ``images`` fixture: N random 8x8 grayscale images."""
    return np.random.default_rng(0).integers(0, 256, size=(N, 8, 8, 1), dtype=np.uint8)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, C))


def test_an_array_of_exactly_the_limit_is_hashed_in_full():
    """``full_hash_limit`` is inclusive: an array of exactly that many bytes is hashed in full, so a
    change between the rows a sampled hash would read is still seen."""
    images = _images()
    limit = images.nbytes
    changed = images.copy()
    changed[N // 4, 0, 0, 0] ^= 1  # not one of the 3 rows (0, 24, 49) a sampled hash would read
    full = fingerprint_images(images, full_hash_limit=limit, num_samples=3)
    assert fingerprint_images(changed, full_hash_limit=limit, num_samples=3) != full


def test_model_fingerprint_sees_one_element_tensors():
    """A scalar parameter (a learned temperature, a 1x1 layer) is hashed like any other tensor."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1)  # a weight and a bias of one element each
    before = fingerprint_model(model)
    with torch.no_grad():
        model.bias += 0.25
    assert fingerprint_model(model) != before


class Tagged(nn.Module):
    """A layer whose ``tag`` (no tensor) is saved in its state_dict as extra state."""

    def __init__(self, tag: str):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(2, 2)
        self.tag = tag

    def get_extra_state(self):
        return {"tag": self.tag}

    def set_extra_state(self, state) -> None:
        self.tag = state["tag"]


def test_model_fingerprint_sees_extra_state():
    """A module's extra state is part of its state_dict, so it is part of the model's identity."""
    assert fingerprint_model(Tagged("a")) == fingerprint_model(Tagged("a"))
    assert fingerprint_model(Tagged("a")) != fingerprint_model(Tagged("b"))


def _completed_rows(path) -> int:
    return json.loads(sidecar_path(path).read_text())["completed_rows"]


def test_resume_over_a_foreign_npy_of_another_dtype_starts_over(tmp_path):
    """An interrupted run whose .npy was replaced by a float64 one of the right shape is rebuilt
    from row 0 (with a warning): its float32 rows cannot be written into it."""
    model, images = _model(), _images()
    reference = np.array(_run(model, images, tmp_path / "whole.npy"))
    path = tmp_path / "teacher.npy"
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(Interruptible(model, fail_after=4), images, path)
    np.save(path, np.zeros((N, C), np.float64))
    resumed = Interruptible(model)  # the same state_dict names as the interrupted wrapper
    with pytest.warns(UserWarning, match="starting over from row 0"):
        out = _run(resumed, images, path)
    assert sum(resumed.sizes) == N and out.dtype == np.float32
    assert np.array_equal(out, reference)


def test_a_resume_with_another_chunk_size_claims_rows_on_its_global_grid(tmp_path):
    """Chunk ends lie on the grid of multiples of the chunk size whatever row a resume starts from
    (module docstring): resumed at row 10 with chunks of 15, the first chunk ends at row 15, not
    at row 25, so one batch is enough to claim new rows."""
    model, images = _model(), _images()
    path = tmp_path / "teacher.npy"
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(Interruptible(model, fail_after=2), images, path)  # one chunk of 10 rows
    assert _completed_rows(path) == 10
    wrapped = Interruptible(model, fail_after=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(wrapped, images, path, chunk_size=15)  # rows 10..14, then 15..19, then interrupted
    assert wrapped.sizes == [5, 5]
    assert _completed_rows(path) == 15


def test_a_model_in_eval_mode_stays_in_eval_mode(tmp_path):
    """The model's own mode is restored, not set to training: a caller that precomputes with a
    model in eval mode (as a large teacher loaded for inference is) keeps it in eval mode."""
    model = _model().eval()
    _run(model, _images(), tmp_path / "teacher.npy")
    assert not model.training
