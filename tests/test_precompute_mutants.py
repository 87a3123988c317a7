"""metapl.reduced.precompute: the checks test_precompute.py does not reach (temperature on
resume, sidecar validation, chunk rounding, eval mode, bad model outputs, argument checks, what
the fingerprints see)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from metapl.data.arrays import to_tensor_nchw
from metapl.errors import ConfigError, DataError
from metapl.reduced.precompute import (
    fingerprint_images,
    fingerprint_model,
    load_distributions,
    precompute_distributions,
    sidecar_path,
)

N, C = 50, 5


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(N, 8, 8, 1), dtype=np.uint8)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, C))


class Recording(nn.Module):
    """Wraps a model; records each batch's size and raises once ``fail_after`` calls were made."""

    def __init__(self, inner: nn.Module, fail_after: int | None = None):
        super().__init__()
        self.inner = inner
        self.sizes: list[int] = []
        self.fail_after = fail_after

    def forward(self, x):
        if self.fail_after is not None and len(self.sizes) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.sizes.append(len(x))
        return self.inner(x)


class Returns(nn.Module):
    """A model whose output is ``fn(x)``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.fn(x)


def _run(model, images, path, **kwargs):
    kwargs = {"batch_size": 5, "chunk_size": 10, "progress": False, **kwargs}
    return precompute_distributions(model, images, path, **kwargs)


def _edit_sidecar(path, **changes) -> None:
    side = sidecar_path(path)
    side.write_text(json.dumps({**json.loads(side.read_text()), **changes}))


def test_another_temperature_is_another_file(model, images, tmp_path):
    """The temperature is part of what the file holds: a rerun at another one is refused,
    naming both, instead of returning (or resuming) rows at the old temperature."""
    path = tmp_path / "teacher.npy"
    _run(model, images, path, temperature=1.0)
    with pytest.raises(DataError, match=r"belongs to another temperature \(1.0, not 2.0\)"):
        _run(model, images, path, temperature=2.0)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format_version": 2}, "has format version 2, this metapl reads 1"),
        ({"completed_rows": N + 1}, "inconsistent row counts"),
        ({"completed_rows": -1}, "inconsistent row counts"),
        ({"num_classes": 0}, "inconsistent row counts"),
        ({"num_images": float(N)}, "inconsistent row counts"),
    ],
    ids=["version", "rows-past-the-end", "negative-rows", "no-classes", "float-count"],
)
def test_a_bad_sidecar_is_refused_with_a_reason(model, images, tmp_path, changes, message):
    """A sidecar of another format version, or whose counts cannot describe the file, is a
    one-line DataError when loading and when resuming."""
    path = tmp_path / "teacher.npy"
    _run(model, images, path)
    _edit_sidecar(path, **changes)
    with pytest.raises(DataError, match=message):
        load_distributions(path)
    with pytest.raises(DataError, match=message):
        _run(model, images, path)


def test_load_refuses_an_npy_that_disagrees_with_its_sidecar(model, images, tmp_path):
    """A readable .npy of the wrong dtype or shape is not trusted because its sidecar is fine."""
    path = tmp_path / "teacher.npy"
    _run(model, images, path)
    np.save(path, np.zeros((N, C), np.float64))
    with pytest.raises(DataError, match=r"holds float64 \(50, 5\), its sidecar says float32"):
        load_distributions(path)
    np.save(path, np.zeros((N, C + 1), np.float32))
    with pytest.raises(DataError, match=r"holds float32 \(50, 6\)"):
        load_distributions(path)


def test_resume_over_a_foreign_npy_of_another_shape_starts_over(model, images, tmp_path):
    """An interrupted run whose .npy was replaced by one of another shape is rebuilt from row 0
    (with a warning), not written into."""
    reference = np.array(_run(model, images, tmp_path / "whole.npy"))
    path = tmp_path / "teacher.npy"
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(Recording(model, fail_after=4), images, path)
    np.save(path, np.zeros((N, C + 1), np.float32))
    resumed = Recording(model)
    # the wrapper's state_dict names differ from the plain model's: resume with the wrapper
    with pytest.warns(UserWarning, match="starting over from row 0"):
        out = _run(resumed, images, path)
    assert sum(resumed.sizes) == N and np.array_equal(out, reference)


def test_chunks_are_rounded_up_to_whole_batches(model, images, tmp_path):
    """chunk_size 7 with batches of 5 writes chunks of 10: every batch is a whole batch of the
    global grid, and an interruption leaves the sidecar at a chunk end."""
    path = tmp_path / "teacher.npy"
    wrapped = Recording(model, fail_after=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(wrapped, images, path, chunk_size=7)
    assert wrapped.sizes == [5, 5, 5]
    assert json.loads(sidecar_path(path).read_text())["completed_rows"] == 10
    wrapped.fail_after, wrapped.sizes = None, []
    _run(wrapped, images, path, chunk_size=7)
    assert wrapped.sizes == [5] * 8  # rows 10..49


def test_the_model_runs_in_eval_mode(images, tmp_path):
    """Dropout is off while precomputing (a training-mode teacher would write noisy rows), and the
    caller's train mode comes back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, C)).train()
    out = _run(model, images, tmp_path / "teacher.npy")
    assert model.training
    with torch.no_grad():
        expected = torch.softmax(model.eval()(to_tensor_nchw(images)), dim=-1).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_non_finite_probabilities_write_nothing(images, tmp_path):
    """NaN logits (a float16 overflow, say) stop the run with a DataError naming the rows, before
    any file exists."""
    path = tmp_path / "teacher.npy"
    nan_model = Returns(lambda x: torch.full((len(x), C), float("nan")))
    with pytest.raises(DataError, match=r"non-finite probabilities for images 0\.\.4"):
        _run(nan_model, images, path)
    assert not path.exists() and not sidecar_path(path).exists()


@pytest.mark.parametrize(
    "fn",
    [lambda x: torch.zeros(len(x), C, 1), lambda x: torch.zeros(len(x) + 1, C), lambda x: (x,)],
    ids=["3d", "wrong-batch", "tuple"],
)
def test_the_model_must_return_logits_batch_by_classes(images, tmp_path, fn):
    path = tmp_path / "teacher.npy"
    with pytest.raises(ConfigError, match="the model must return logits"):
        _run(Returns(fn), images, path)
    assert not path.exists()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"temperature": 0.0}, ConfigError, "temperature must be > 0"),
        ({"batch_size": 0}, ConfigError, "batch_size and chunk_size must be >= 1"),
        ({"chunk_size": 0}, ConfigError, "batch_size and chunk_size must be >= 1"),
    ],
    ids=["temperature", "batch_size", "chunk_size"],
)
def test_bad_arguments_stop_before_any_work(model, images, tmp_path, kwargs, error, message):
    path = tmp_path / "teacher.npy"
    with pytest.raises(error, match=message):
        _run(model, images, path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_no_images_is_a_data_error(model, images, tmp_path):
    with pytest.raises(DataError, match="no images to precompute"):
        _run(model, images[:0], tmp_path / "teacher.npy")
    assert list(tmp_path.iterdir()) == []


def test_load_takes_images_or_their_fingerprint_not_both(model, images, tmp_path):
    path = tmp_path / "teacher.npy"
    _run(model, images, path)
    with pytest.raises(ConfigError, match="images or data_fingerprint"):
        load_distributions(path, images=images, data_fingerprint=fingerprint_images(images))


def test_model_fingerprint_covers_buffers():
    """BatchNorm running statistics change eval-mode outputs, so they change the fingerprint."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    before = fingerprint_model(model)
    with torch.no_grad():
        model[1].running_mean += 0.5
    assert fingerprint_model(model) != before


def test_sampled_fingerprint_always_includes_the_last_row(images):
    """The last row is sampled as the first is (an appended-then-truncated tail is caught)."""
    sampled = fingerprint_images(images, full_hash_limit=0, num_samples=3)
    changed = images.copy()
    changed[-1, 0, 0, 0] ^= 1
    assert fingerprint_images(changed, full_hash_limit=0, num_samples=3) != sampled


class PathReader:
    """Indexes like LazyImages (integer arrays -> uint8 NHWC) and lists its files in ``paths``."""

    def __init__(self, pixels: np.ndarray, paths: list[str]):
        self.pixels, self.paths = pixels, paths

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, index):
        return self.pixels[index]


def test_reader_fingerprint_sees_file_names_but_not_the_dataset_folder(images):
    """A reader's ``class/name`` list is hashed: moving the dataset to another folder keeps the
    fingerprint, renaming a file (even one between the sampled rows) changes it."""
    names = [f"n{i % 3}/{i}.JPEG" for i in range(N)]
    here = PathReader(images, [f"/data/imagenet/train/{n}" for n in names])
    moved = PathReader(images, [f"/scratch/copy/train/{n}" for n in names])
    assert fingerprint_images(here) == fingerprint_images(moved)
    renamed = list(here.paths)
    renamed[10] = "/data/imagenet/train/n1/other.JPEG"
    assert fingerprint_images(PathReader(images, renamed)) != fingerprint_images(here)
