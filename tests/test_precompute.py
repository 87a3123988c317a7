"""ReducedMPL data side: precomputed teacher distributions on disk and top-K-per-class selection."""

from __future__ import annotations

import builtins
import collections
import errno
import itertools
import json
import threading
import warnings
from threading import BrokenBarrierError

import numpy as np
import pytest
import torch
from torch import nn

from metapl.data.arrays import to_tensor_nchw
from metapl.errors import ConfigError, DataError, WriteError
from metapl.reduced import precompute
from metapl.reduced.precompute import (
    Ranks,
    fingerprint_images,
    fingerprint_model,
    load_distributions,
    precompute_distributions,
    sidecar_path,
)
from metapl.reduced.select import top_k_assignments, top_k_per_class

N, C = 50, 5


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(N, 8, 8, 1), dtype=np.uint8)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, C))


class Interruptible(nn.Module):
    """Wraps a model; counts forward calls, records each batch's size, and raises once
    ``fail_after`` calls have been made."""

    def __init__(self, inner: nn.Module, fail_after: int | None = None):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.sizes: list[int] = []
        self.fail_after = fail_after

    def forward(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        self.sizes.append(len(x))
        return self.inner(x)


def _run(model, images, path, **kwargs):
    kwargs = {"batch_size": 5, "chunk_size": 10, "progress": False, **kwargs}
    return precompute_distributions(model, images, path, **kwargs)


def test_precompute_writes_softmax_rows_as_npy(model, images, tmp_path):
    path = tmp_path / "teacher.npy"
    out = _run(model, images, path, temperature=2.0)
    plain = np.load(path)  # a real .npy with a header, readable without metapl
    with torch.no_grad():
        expected = torch.softmax(model(to_tensor_nchw(images)) / 2.0, dim=-1).numpy()
    assert plain.shape == (N, C) and plain.dtype == np.float32
    np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plain.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(out, plain) and not out.flags.writeable
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["completed_rows"] == N and meta["num_classes"] == C and meta["temperature"] == 2.0
    assert meta["model_fingerprint"] == fingerprint_model(model)
    assert model.training  # mode restored


def test_interrupted_precompute_resumes_to_the_same_file(model, images, tmp_path):
    reference = np.array(_run(model, images, tmp_path / "whole.npy"))

    wrapped = Interruptible(model)
    wrapped.fail_after = 4  # two chunks of 10 rows = four batches of 5
    path = tmp_path / "resumed.npy"
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(wrapped, images, path)
    assert json.loads(sidecar_path(path).read_text())["completed_rows"] == 20
    with pytest.raises(DataError, match="interrupted at row 20 of 50; run it again"):
        load_distributions(path)
    with pytest.raises(DataError, match="belongs to another model"):
        _run(model, images, path)  # unwrapped: other state_dict names, so another model

    wrapped.fail_after, wrapped.calls = None, 0
    # Another chunk size on resume: batches stay on the global grid, so rows are bit-identical.
    resumed = _run(wrapped, images, path, chunk_size=15)
    assert wrapped.calls == 6  # rows 20..49 only
    assert np.array_equal(resumed, reference)

    wrapped.calls = 0
    again = _run(wrapped, images, path)  # finished: returned without running the model
    assert wrapped.calls == 0 and np.array_equal(again, reference)


def test_a_finished_file_is_read_again_without_opening_it_for_writing(
    model, images, tmp_path, monkeypatch
):
    """A finished file, asked for again (a resumed run; under torchrun every rank but 0 reads the
    files rank 0 wrote, and docs/multi-gpu.md says they write nothing), is opened for reading only:
    it was mapped read-write ("r+") before, which a read-only file or folder refuses."""
    path = tmp_path / "t.npy"
    first = np.array(_run(model, images, path))
    opened, real_open = [], builtins.open

    def recording_open(file, mode="r", *args, **kwargs):
        opened.append((str(file), mode))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    again = _run(model, images, path)
    np.testing.assert_array_equal(np.asarray(again), first)
    assert (str(path), "rb") in opened  # the file was read (this hook sees numpy's opens)
    assert [(f, m) for f, m in opened if set(m) & set("wax+")] == []


def test_stale_file_names_what_changed(model, images, tmp_path):
    path = tmp_path / "teacher.npy"
    _run(model, images, path)
    load_distributions(path, model=model, images=images)
    load_distributions(
        path,
        model_fingerprint=fingerprint_model(model),
        data_fingerprint=fingerprint_images(images),
    )

    other_images = images.copy()
    other_images[7, 3, 3, 0] ^= 1
    with pytest.raises(DataError, match=r"stale: the data changed"):
        load_distributions(path, model=model, images=other_images)
    with pytest.raises(DataError, match="belongs to another data"):
        _run(model, other_images, path)

    with torch.no_grad():
        model[1].weight[0, 0] += 1.0
    with pytest.raises(DataError, match=r"teacher\.npy is stale: the model changed"):
        load_distributions(path, model=model, images=images)
    with pytest.raises(DataError, match="the model and the data changed"):
        load_distributions(path, model=model, images=other_images)
    with pytest.raises(ConfigError, match="pass model or model_fingerprint .*, not both"):
        load_distributions(path, model=model, model_fingerprint="x")


def test_broken_files_are_refused(model, images, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_distributions(tmp_path / "missing.npy")

    path = tmp_path / "teacher.npy"
    _run(model, images, path)
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_distributions(path)
    with pytest.warns(UserWarning, match="starting over"):
        repaired = _run(model, images, path)  # a matching sidecar: the file is simply rebuilt
    np.testing.assert_allclose(repaired.sum(1), 1.0, atol=1e-5)  # rebuilt, not zero-padded

    sidecar_path(path).unlink()
    with pytest.raises(DataError, match="no sidecar"):
        load_distributions(path)
    with pytest.raises(DataError, match="delete it or choose another output path"):
        _run(model, images, path)  # never overwrites a .npy it cannot prove is its own


def test_sampled_image_fingerprint_trade_off(images):
    full = fingerprint_images(images)
    sampled = fingerprint_images(images, full_hash_limit=0, num_samples=3)  # rows 0, 24, 49
    changed = images.copy()
    changed[10, 0, 0, 0] ^= 1  # between samples
    assert fingerprint_images(changed) != full
    assert fingerprint_images(changed, full_hash_limit=0, num_samples=3) == sampled
    changed[0, 0, 0, 0] ^= 1  # the first row is always sampled
    assert fingerprint_images(changed, full_hash_limit=0, num_samples=3) != sampled


def test_lazy_images_precompute_and_fingerprint(tmp_path):
    from PIL import Image

    from metapl.data.imagenet import LazyImages

    rng = np.random.default_rng(2)
    paths = []
    for i in range(6):
        folder = tmp_path / "train" / f"n{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(paths[-1])
    lazy = LazyImages(paths, resolution=8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    out = _run(model, lazy, tmp_path / "lazy.npy", batch_size=4)
    with torch.no_grad():
        expected = torch.softmax(model(to_tensor_nchw(lazy[np.arange(6)])), dim=-1).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    load_distributions(tmp_path / "lazy.npy", images=LazyImages(paths, resolution=8))
    with pytest.raises(DataError, match="the data changed"):
        load_distributions(tmp_path / "lazy.npy", images=lazy.subset([1, 0, 2, 3, 4, 5]))


# --------------------------------------------------------------------------------------------------
# Selection

# Class 0 ties images 2 and 3 at 0.5; image 2 is in the top 2 of classes 0 and 1.
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.1, 0.8, 0.1],
        [0.5, 0.4, 0.1],
        [0.5, 0.1, 0.4],
        [0.2, 0.2, 0.6],
    ],
    dtype=np.float32,
)


def test_top_k_per_class_exact():
    indices, assigned = top_k_assignments(PROBS, 2)
    assert indices.tolist() == [0, 2, 1, 2, 4, 3]
    assert assigned.tolist() == [0, 0, 1, 1, 2, 2]
    assert indices.dtype == np.int64 and assigned.dtype == np.int64
    # Several classes per block or one: same answer.
    assert top_k_per_class(PROBS, 2, block_bytes=1).tolist() == indices.tolist()


def test_top_k_unique_and_balance():
    indices, assigned = top_k_assignments(PROBS, 2, unique=True)
    assert indices.tolist() == [0, 2, 1, 4, 3]  # image 2 stays with class 0 (0.5 > 0.4)
    assert assigned.tolist() == [0, 0, 1, 2, 2]
    indices, assigned = top_k_assignments(PROBS, 2, unique=True, balance="duplicate")
    assert indices.tolist() == [0, 2, 1, 1, 4, 3]
    assert assigned.tolist() == [0, 0, 1, 1, 2, 2]


def test_top_k_larger_than_n():
    # Class 0 ranked: 0 (0.7), 2 and 3 (0.5, index order), 4 (0.2), 1 (0.1).
    assert top_k_per_class(PROBS, 7)[:5].tolist() == [0, 2, 3, 4, 1]
    assert len(top_k_per_class(PROBS, 7)) == 3 * 5
    balanced, assigned = top_k_assignments(PROBS, 7, balance="duplicate")
    assert balanced[:7].tolist() == [0, 2, 3, 4, 1, 0, 2]
    assert np.bincount(assigned).tolist() == [7, 7, 7]


def test_top_k_ties_match_a_full_sort(tmp_path):
    rng = np.random.default_rng(1)
    probs = (rng.integers(0, 4, size=(200, 6)) / 4).astype(np.float32)  # many ties
    np.save(tmp_path / "p.npy", probs)
    mapped = np.load(tmp_path / "p.npy", mmap_mode="r")
    expected = np.concatenate([np.lexsort((np.arange(200), -probs[:, c]))[:30] for c in range(6)])
    assert top_k_per_class(mapped, 30, block_bytes=2000).tolist() == expected.tolist()


def test_top_k_rejects_bad_input():
    with pytest.raises(ConfigError, match=r"^k \(images kept per class\) must be .*, got 0"):
        top_k_per_class(PROBS, 0)
    with pytest.raises(ConfigError, match="^balance must be one of none, duplicate"):
        top_k_per_class(PROBS, 1, balance="upsample")
    with pytest.raises(DataError, match=r"must be a float \[N, C\] array, got float32 \(5,\)"):
        top_k_per_class(PROBS[:, 0], 1)
    bad = PROBS.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="row 3, class 1"):
        top_k_per_class(bad, 1)


def test_top_k_ties_go_to_the_lower_index_on_large_columns():
    """The rank order is (-probability, index) also when thousands of images tie (an unstable
    sort keeps small inputs in order by luck, large ones not)."""
    rng = np.random.default_rng(1)
    probs = (rng.integers(0, 4, size=(5000, 2)) / 4).astype(np.float32)
    expected = np.concatenate([np.lexsort((np.arange(5000), -probs[:, c]))[:3000] for c in (0, 1)])
    assert top_k_per_class(probs, 3000).tolist() == expected.tolist()


def test_unique_ties_between_classes_go_to_the_lower_class():
    """An image selected by two classes with the same probability is kept once, for the lower
    class index (module docstring)."""
    probs = np.array([[0.45, 0.45, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]], dtype=np.float32)
    indices, assigned = top_k_assignments(probs, 1, unique=True)
    assert indices.tolist() == [0, 1] and assigned.tolist() == [0, 2]


def test_duplicate_balance_leaves_a_class_without_images_empty():
    """unique=True can leave a class with no image; balance="duplicate" cannot fill it from
    nothing, so it stays empty (no made-up image 0)."""
    probs = np.array([[0.8, 0.2], [0.7, 0.3]], dtype=np.float32)  # top-1: image 0, image 1
    indices, assigned = top_k_assignments(probs, 1, unique=True, balance="duplicate")
    assert indices.tolist() == [0, 1] and assigned.tolist() == [0, 1]  # no conflict, both kept
    probs = np.array([[0.9, 0.6], [0.1, 0.4]], dtype=np.float32)  # both classes pick image 0
    indices, assigned = top_k_assignments(probs, 1, unique=True, balance="duplicate")
    assert indices.tolist() == [0] and assigned.tolist() == [0]
    indices, assigned = top_k_assignments(probs, 3, unique=True, balance="duplicate")
    assert indices.tolist() == [0, 0, 0, 1, 1, 1]  # short classes are repeated cyclically


# --- the checks a mutation audit found missing: temperature on resume, sidecar validation, chunk
# rounding, eval mode, bad model outputs, argument checks, what the fingerprints see


class Returns(nn.Module):
    """A model whose output is ``fn(x)``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.fn(x)


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
        # found by a mutation audit: an older version, no images, and a bool (an int subclass)
        ({"format_version": 0}, "has format version 0, this metapl reads 1"),
        ({"num_images": 0, "completed_rows": 0}, "inconsistent row counts"),
        ({"completed_rows": True}, "inconsistent row counts"),
    ],
    ids=[
        "version",
        "rows-past-the-end",
        "negative-rows",
        "no-classes",
        "float-count",
        "older-version",
        "no-images",
        "bool-count",
    ],
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
        _run(Interruptible(model, fail_after=4), images, path)
    np.save(path, np.zeros((N, C + 1), np.float32))
    resumed = Interruptible(model)
    # the wrapper's state_dict names differ from the plain model's: resume with the wrapper
    with pytest.warns(UserWarning, match="starting over from row 0"):
        out = _run(resumed, images, path)
    assert sum(resumed.sizes) == N and np.array_equal(out, reference)


def test_chunks_are_rounded_up_to_whole_batches(model, images, tmp_path):
    """chunk_size 7 with batches of 5 writes chunks of 10: every batch is a whole batch of the
    global grid, and an interruption leaves the sidecar at a chunk end."""
    path = tmp_path / "teacher.npy"
    wrapped = Interruptible(model, fail_after=3)
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
    moved_class = list(here.paths)
    moved_class[10] = here.paths[10].replace("/n1/", "/n2/")  # same file name, another class
    assert fingerprint_images(PathReader(images, moved_class)) != fingerprint_images(here)


def test_a_full_hash_reads_every_block(images, monkeypatch):
    """Arrays are hashed block by block (bounding the copy): a change in the last block counts."""
    import metapl.reduced.precompute as precompute_mod

    monkeypatch.setattr(precompute_mod, "_HASH_CHUNK_BYTES", images[:1].nbytes * 7)
    changed = images.copy()
    changed[-1, 0, 0, 0] ^= 1
    assert fingerprint_images(changed) != fingerprint_images(images)


def test_killed_after_the_sidecar_before_the_npy_a_rerun_starts_cleanly(
    model, images, tmp_path, monkeypatch
):
    """A sidecar claiming 0 rows without its ``.npy`` (killed between the two) is a fresh start,
    not an unreadable file."""
    path = tmp_path / "teacher.npy"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np.lib.format, "open_memmap", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(model, images, path)
    monkeypatch.undo()
    assert sidecar_path(path).exists() and not path.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _run(model, images, path)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)


class _FirstColumns(nn.Module):
    """The wrapped model's first ``k`` logits (``k`` is no tensor: the fingerprint cannot see it)."""

    def __init__(self, inner: nn.Module, k: int):
        super().__init__()
        self.inner, self.k = inner, k

    def forward(self, x):
        return self.inner(x)[:, : self.k]


def test_a_resume_whose_model_returns_another_class_count_is_refused(model, images, tmp_path):
    """One class would broadcast into every column of the file: refused, nothing written."""
    path = tmp_path / "teacher.npy"
    wrapped = Interruptible(_FirstColumns(model, C), fail_after=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(wrapped, images, path)
    before = path.read_bytes()
    wrapped.fail_after, wrapped.inner.k = None, 1
    with pytest.raises(ConfigError, match=f"returned 1 classes, .* holds {C}"):
        _run(wrapped, images, path)
    assert path.read_bytes() == before


# --------------------------------------------------------------------------------------------------
# Several processes precompute one file (torchrun): simulated here by threads, one per rank


class ThreadRanks:
    """``world_size`` ranks as threads of this process. Each collective is a meeting of its own
    (its own boxes, as messages would be); a rank that raises stops the others at their next
    meeting that it does not reach (torchrun stops them), not at one it has reached."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.changed = threading.Condition()
        self.arrived: collections.Counter = collections.Counter()
        self.boxes: collections.defaultdict = collections.defaultdict(lambda: [None] * world_size)
        self.failed = False

    def _meet(self, meeting: int) -> None:
        with self.changed:
            self.arrived[meeting] += 1
            self.changed.notify_all()
            everyone = lambda: self.arrived[meeting] == self.world_size  # noqa: E731
            self.changed.wait_for(lambda: everyone() or self.failed, timeout=60)
            if not everyone():
                raise BrokenBarrierError

    def of(self, rank: int) -> Ranks:
        calls = itertools.count()  # the same sequence of meetings on every rank

        def gather(obj):
            meeting = next(calls)
            self.boxes[meeting][rank] = obj
            self._meet(meeting)
            return list(self.boxes[meeting]) if rank == 0 else None

        def broadcast(obj):
            meeting = next(calls)
            if rank == 0:
                self.boxes[meeting][0] = obj
            self._meet(meeting)
            return self.boxes[meeting][0]

        return Ranks(rank, self.world_size, gather, broadcast)

    def run(self, fn) -> list:
        """``fn(ranks, rank)`` on every rank at once; each rank's result or exception."""
        results: list = [None] * self.world_size

        def target(rank):
            try:
                results[rank] = fn(self.of(rank), rank)
            except BaseException as exc:  # noqa: BLE001 (handed to the test)
                results[rank] = exc
                with self.changed:
                    self.failed = True
                    self.changed.notify_all()

        threads = [
            threading.Thread(target=target, args=(r,), name=f"rank{r}")
            for r in range(self.world_size)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


def _ranks_run(world_size, models, images, path, **kwargs) -> list:
    """Every rank's result of precompute_distributions on ``world_size`` thread ranks, each rank
    with its own model (``models[rank]``)."""
    kwargs = {"batch_size": 5, "chunk_size": 10, "progress": False, **kwargs}
    return ThreadRanks(world_size).run(
        lambda ranks, rank: precompute_distributions(
            models[rank], images, path, ranks=ranks, **kwargs
        )
    )


@pytest.mark.parametrize(
    "world_size, sizes",
    [
        # rounds of 2 chunks (20 rows, 4 batches): 2 batches each, then the last 10 rows 1 each
        (2, [[5] * 5, [5] * 5]),
        # rounds of 30 rows: 2 batches each; then rows 30..49, 4 batches: 2, 1 and 1
        (3, [[5] * 4, [5] * 3, [5] * 3]),
        # more ranks than a round's batches: the last rank has none in the second round
        (8, [[5, 5], [5, 5]] + [[5]] * 6),
    ],
)
def test_ranks_together_write_the_file_one_process_writes(
    model, images, tmp_path, monkeypatch, world_size, sizes
):
    """Each rank classifies its own contiguous share of every round (whole batches of the global
    grid); rank 0 alone writes, and the file and its sidecar are byte for byte one process's."""
    reference = tmp_path / "one.npy"
    _run(Interruptible(model), images, reference)  # the wrapper's names: the same fingerprint
    writers = []
    real_write = precompute.write_json_atomically

    def recording_write(path, payload):
        writers.append(threading.current_thread().name)
        return real_write(path, payload)

    monkeypatch.setattr(precompute, "write_json_atomically", recording_write)
    models = [Interruptible(model) for _ in range(world_size)]
    path = tmp_path / "ranks.npy"
    results = _ranks_run(world_size, models, images, path)
    for result in results:
        assert isinstance(result, np.memmap), result
        assert np.array_equal(result, np.load(reference))
    assert path.read_bytes() == reference.read_bytes()
    assert json.loads(sidecar_path(path).read_text()) == json.loads(
        sidecar_path(reference).read_text()
    )
    assert [m.sizes for m in models] == sizes
    assert set(writers) == {"rank0"}


def test_ranks_resume_what_one_process_left_and_the_other_way_round(model, images, tmp_path):
    """The resume rule does not care how many processes wrote the rows before: 2 ranks finish
    a file 1 process was interrupted in, and 1 process finishes one 2 ranks were."""
    reference = np.array(_run(model, images, tmp_path / "one.npy"))

    path = tmp_path / "from_one.npy"
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(Interruptible(model, fail_after=4), images, path)  # rows 0..19 done
    models = [Interruptible(model) for _ in range(2)]
    results = _ranks_run(2, models, images, path)
    assert all(np.array_equal(r, reference) for r in results)
    assert [m.sizes for m in models] == [[5, 5, 5], [5, 5, 5]]  # rows 20..49 only

    path = tmp_path / "from_two.npy"
    # rank 1 fails in its third batch, the first of the second round: the first round (rows
    # 0..19) is on disk and claimed; rank 0's second-round rows are not
    models = [Interruptible(model), Interruptible(model, fail_after=2)]
    results = _ranks_run(2, models, images, path)
    assert str(results[1]) == "interrupted"  # rank 1's own error; rank 0 hears of it
    assert str(results[0]) == (
        f"rank 1 stopped the precompute of {path} with RuntimeError: interrupted"
    )
    assert json.loads(sidecar_path(path).read_text())["completed_rows"] == 20
    again = Interruptible(model)
    assert np.array_equal(_run(again, images, path), reference)
    assert again.sizes == [5] * 6


def test_every_rank_refuses_a_stale_file_and_none_recomputes_a_finished_one(
    model, images, tmp_path
):
    path = tmp_path / "teacher.npy"
    reference = np.array(_run(Interruptible(model), images, path))
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, C))
    results = _ranks_run(2, [other, other], images, path)
    for result in results:  # every rank says why, not only rank 0
        assert isinstance(result, DataError) and "belongs to another model" in str(result)

    models = [Interruptible(model) for _ in range(2)]
    results = _ranks_run(2, models, images, path)
    assert all(np.array_equal(r, reference) for r in results)
    assert [m.calls for m in models] == [0, 0]


def test_ranks_start_over_where_rank_0_finds_the_file_unreadable(model, images, tmp_path):
    """Rank 0 alone reads the file and every rank starts where it says: with a sidecar claiming
    20 rows and a truncated ``.npy``, rank 0 starts over from row 0, and so must rank 1 (starting
    at row 20 it would work on other rounds, and the sidecar would claim rows never computed)."""
    reference = np.array(_run(model, images, tmp_path / "one.npy"))
    path = tmp_path / "teacher.npy"
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(Interruptible(model, fail_after=4), images, path)  # rows 0..19 claimed
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 100)
    models = [Interruptible(model) for _ in range(2)]
    with pytest.warns(UserWarning, match="starting over from row 0"):
        results = _ranks_run(2, models, images, path)
    assert all(np.array_equal(r, reference) for r in results), results
    assert sum(sum(m.sizes) for m in models) == N  # every row computed once


def test_rows_the_ranks_did_not_send_are_never_claimed(model, images, tmp_path):
    """The round's shares must cover exactly the rows the sidecar will claim: a gap (ranks that
    disagreed on where the round starts) writes nothing."""
    path = tmp_path / "teacher.npy"
    meta = {"num_images": N, "completed_rows": 0}
    rows = np.full((10, C), 0.2, np.float32)
    with pytest.raises(RuntimeError, match=r"do not cover rows 0\.\.29 .* nothing of them"):
        precompute._write_round(path, meta, None, [(0, rows), (20, rows)], range(0, 30))
    with pytest.raises(RuntimeError, match="do not cover"):
        precompute._write_round(path, meta, None, [(0, rows), (10, rows)], range(0, 30))
    assert not path.exists() and not sidecar_path(path).exists()


def test_a_model_whose_class_count_changes_within_a_share_is_refused(images, tmp_path):
    calls = itertools.count()
    flaky = Returns(lambda x: torch.zeros(len(x), C if next(calls) == 0 else C - 1))
    with pytest.raises(ConfigError, match=f"returned {C - 1} classes for images 5..9, {C} before"):
        _run(flaky, images, tmp_path / "teacher.npy")
    assert not (tmp_path / "teacher.npy").exists()


def _nan_from_the_third_batch():
    calls = itertools.count()
    return lambda x: torch.full((len(x), C), float("nan") if next(calls) >= 2 else 0.0)


def test_a_failure_on_one_rank_stops_every_rank_with_it(images, tmp_path, monkeypatch):
    """A rank whose model gives NaN (a user's mistake: DataError) still meets the others at the
    round's verdict, so every rank raises that one-line error instead of waiting for the next
    round; rank 0 too when it is the one. The rounds before stay claimed."""
    fine = Returns(lambda x: torch.zeros(len(x), C))
    for failing in (1, 0):
        nan_later = Returns(_nan_from_the_third_batch())
        models = [fine, fine]
        models[failing] = nan_later
        path = tmp_path / f"failing{failing}.npy"
        results = _ranks_run(2, models, images, path)  # its 3rd batch: in round 2
        first = 30 if failing else 20
        for result in results:
            assert isinstance(result, DataError), result
            assert str(result).startswith(
                f"the model gave non-finite probabilities for images {first}"
            )
        assert json.loads(sidecar_path(path).read_text())["completed_rows"] == 20


@pytest.mark.parametrize("failing_write", [1, 3], ids=["a-middle-round", "the-last-round"])
def test_a_write_that_fails_on_rank_0_stops_every_rank_with_its_errno(
    images, tmp_path, monkeypatch, failing_write
):
    """Rank 0 writes a round after the round's verdict (the others go on to classify the next);
    a failed write is the next round's verdict, or the last one after the rounds. Every rank
    raises the WriteError, with its errno (a full disk), and the round is not claimed."""
    fine = Returns(lambda x: torch.zeros(len(x), C))
    writes = itertools.count(1)
    real = precompute._write_round

    def full_disk_at(*args):
        if next(writes) == failing_write:
            error = WriteError("cannot write teacher.npy: No space left on device")
            error.errno = errno.ENOSPC
            raise error
        return real(*args)

    monkeypatch.setattr(precompute, "_write_round", full_disk_at)
    path = tmp_path / "teacher.npy"
    results = _ranks_run(2, [fine, fine], images, path)  # rounds of rows 0-19, 20-39, 40-49
    for result in results:
        assert isinstance(result, WriteError), result
        assert str(result) == "cannot write teacher.npy: No space left on device"
        assert result.errno == errno.ENOSPC
    claimed = (
        json.loads(sidecar_path(path).read_text())["completed_rows"] if failing_write > 1 else 0
    )
    assert claimed == 20 * (failing_write - 1)


def test_an_interrupt_on_one_rank_is_not_taken_for_a_failure_to_share(images, tmp_path):
    """Ctrl-C (or metapl's Stopped, a KeyboardInterrupt) on one rank stops that rank at once; it
    is not sent to the others as a failure (torchrun stops them)."""

    def interrupted(x):
        raise KeyboardInterrupt

    fine = Returns(lambda x: torch.zeros(len(x), C))
    results = _ranks_run(2, [fine, Returns(interrupted)], images, tmp_path / "teacher.npy")
    assert isinstance(results[1], KeyboardInterrupt)
    assert isinstance(results[0], BrokenBarrierError)  # waiting for rank 1 at the gather


def test_batches_lie_on_the_global_grid_wherever_a_round_starts():
    """A resume with another batch_size can start a round off the grid: its first batch is cut
    short, so the rest are the batches an uninterrupted run feeds the model."""
    assert precompute._batches(range(20, 40), 8) == [range(20, 24), range(24, 32), range(32, 40)]
    assert precompute._batches(range(16, 21), 8) == [range(16, 21)]


def test_only_rank_0_reads_the_unfinished_file(model, images, tmp_path, monkeypatch):
    """The other ranks do not open the file (a machine whose cache says it is missing, and no
    writable mapping on a rank that writes nothing): rank 0 tells them where to start."""
    path = tmp_path / "teacher.npy"
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(Interruptible(model, fail_after=4), images, path)
    readers, real = [], precompute._resume_point

    def recording(*args):
        readers.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(precompute, "_resume_point", recording)
    models = [Interruptible(model) for _ in range(3)]
    _ranks_run(3, models, images, path)
    assert readers == ["rank0"]


def test_a_rank_whose_peer_is_gone_reports_its_own_failure(images, tmp_path):
    """Where a collective fails after this rank's own failure (the peer died of it too, say),
    the rank reports its own error, not the collective's."""

    def gone(obj):
        raise RuntimeError("Connection closed by peer")

    ranks = Ranks(1, 2, gather=gone, broadcast=lambda obj: (0, None))
    nan_model = Returns(lambda x: torch.full((len(x), C), float("nan")))
    with pytest.raises(DataError, match="non-finite probabilities"):
        _run(nan_model, images, tmp_path / "teacher.npy", ranks=ranks)
    with pytest.raises(RuntimeError, match="Connection closed"):  # no failure of its own
        _run(Returns(lambda x: torch.zeros(len(x), C)), images, tmp_path / "t.npy", ranks=ranks)
