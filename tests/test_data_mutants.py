"""The training batches (metapl.train.data) row by row: epochs without replacement, labels and the
large teacher's distributions aligned with their images, augmentation that follows the config and
changes from step to step, and evaluation in eval mode over every test image.

Images here encode their own index (image i is a constant image of value i), so every row of a
batch can be traced back to the example it came from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from metapl.data.splits import SSLSplit
from metapl.train.config import TrainConfig, apply_overrides
from metapl.train.data import BatchSource, EpochIndices, evaluate

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CPU = torch.device("cpu")
C = 3


def _indexed_images(n: int, size: int = 4) -> np.ndarray:
    """uint8 [n, size, size, 1]: image i is constant with value i (n <= 256)."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 1))


def _decode(x: torch.Tensor) -> np.ndarray:
    """The index each (unaugmented) image of a batch encodes."""
    return (x[:, 0, 0, 0] * 255).round().long().numpy()


def _probs(n: int, seed: int) -> np.ndarray:
    p = np.random.default_rng(seed).random((n, C)).astype(np.float32)
    return p / p.sum(1, keepdims=True)


def _split(n_l: int = 10, n_u: int = 30) -> SSLSplit:
    x_l, x_u = _indexed_images(n_l), _indexed_images(n_u)
    y_l = (np.arange(n_l) * 7 % C).astype(np.int64)
    empty = np.zeros((0, 4, 4, 1), np.uint8)
    return SSLSplit(x_l, y_l, x_u, empty, np.zeros(0, np.int64), x_l, y_l, C, "indexed")


def _cfg(**overrides) -> TrainConfig:
    base = dict(batch_size=4, unlabeled_ratio=2, pad=0, flip=False, cutout=0, seed=3)
    return apply_overrides(TrainConfig(), {**base, **overrides})


def test_epoch_indices_walk_shuffled_epochs_without_replacement():
    """Consecutive batches concatenate to a sequence of permutations of range(n), one per epoch
    (batches straddle epoch ends), different from epoch to epoch, and batch s is the same from
    a fresh object (a resumed run sees the same batches)."""
    for seed in range(3):
        walk = EpochIndices(10, 4, seed, "labeled")
        seq = np.concatenate([walk.at(s) for s in range(10)])  # 40 positions = 4 epochs
        epochs = seq.reshape(4, 10)
        for e in epochs:
            assert sorted(e.tolist()) == list(range(10))
        assert len({tuple(e) for e in epochs}) > 1
        fresh = EpochIndices(10, 4, seed, "labeled")
        assert np.array_equal(fresh.at(7), seq[28:32])


def test_labels_and_teacher_distributions_stay_aligned_with_their_images():
    """y_labeled, t_labeled and t_unlabeled of every row belong to that row's image (ReducedMPL
    and NoisyStudent learn from t_*; a shuffled row would be a silently wrong target)."""
    split = _split()
    probs_l, probs_u = _probs(10, 0), _probs(30, 1)
    views = ("unlabeled_weak",)
    source = BatchSource(split, _cfg(), views, CPU, teacher_probs=(probs_l, probs_u))
    for step in range(6):
        b = source.batch(step)
        i, j = _decode(b.x_labeled), _decode(b.x_unlabeled_weak)
        assert len(j) == 8  # batch_size * unlabeled_ratio
        assert np.array_equal(b.y_labeled.numpy(), split.y_labeled[i])
        assert np.array_equal(b.t_labeled.numpy(), probs_l[i])
        assert np.array_equal(b.t_unlabeled.numpy(), probs_u[j])


def test_flip_setting_reaches_the_weak_and_strong_views():
    """flip=false leaves the weak view alone (pad 0); flip=true mirrors about half of the images,
    in the weak view and in the strong view (RandAugment runs on a weak view)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(1, 6, 6, 1), dtype=np.uint8).repeat(30, 0)
    x_u = x.copy()
    y = np.zeros(30, np.int64)
    empty = np.zeros((0, 6, 6, 1), np.uint8)
    split = SSLSplit(x, y, x_u, empty, np.zeros(0, np.int64), x, y, C, "one-image")
    image = torch.from_numpy(x[0]).permute(2, 0, 1).float() / 255
    mirror = image.flip(-1)
    views = ("unlabeled_weak", "unlabeled_strong")

    def mirrored_fraction(batch: torch.Tensor) -> float:
        assert all(torch.equal(v, image) or torch.equal(v, mirror) for v in batch)
        return sum(torch.equal(v, mirror) for v in batch) / len(batch)

    plain = BatchSource(split, _cfg(batch_size=30, flip=False), views, CPU).batch(0)
    assert (
        mirrored_fraction(plain.x_labeled) == 0 and mirrored_fraction(plain.x_unlabeled_weak) == 0
    )
    cfg = _cfg(batch_size=30, flip=True, randaugment_ops=0)
    flipped = BatchSource(split, cfg, views, CPU).batch(0)
    for view in (flipped.x_labeled, flipped.x_unlabeled_weak, flipped.x_unlabeled_strong):
        assert 0.2 < mirrored_fraction(view) < 0.8


def test_augmentation_draws_change_with_the_step_and_repeat_for_the_same_step():
    """The same images at two steps get different augmentations; the same step twice (a resumed
    run) gets the very same batch."""
    x = np.random.default_rng(0).integers(0, 256, size=(1, 6, 6, 1), dtype=np.uint8)
    y = np.zeros(1, np.int64)
    empty = np.zeros((0, 6, 6, 1), np.uint8)
    split = SSLSplit(x, y, x, empty, y[:0], x, y, C, "one-image")  # every batch: 4 x image 0
    cfg = _cfg(pad=2, flip=True)
    a = BatchSource(split, cfg, (), CPU)
    b = BatchSource(split, cfg, (), CPU)
    assert torch.equal(a.batch(1).x_labeled, b.batch(1).x_labeled)
    assert not torch.equal(a.batch(0).x_labeled, a.batch(1).x_labeled)


def test_strong_augment_follows_the_config():
    cfg = _cfg(randaugment_ops=3, randaugment_magnitude=4.5, cutout=5)
    strong = BatchSource(_split(), cfg, (), CPU).strong
    assert (strong.num_ops, strong.max_magnitude, strong.cutout) == (3, 4.5, 5)


class _CountsAndMode(nn.Module):
    """Predicts class (index % C) in eval mode and always class 0 in train mode."""

    def forward(self, x):
        i = (x[:, 0, 0, 0] * 255).round().long()
        cls = i % C if not self.training else torch.zeros_like(i)
        return nn.functional.one_hot(cls, C).float()


def test_evaluate_scores_every_image_in_eval_mode_and_restores_the_mode():
    """Accuracy over all test images, batched (7 images in batches of 3: a partial last batch),
    with the model in eval mode; the model's training mode is restored afterwards."""
    n = 7
    images = _indexed_images(n)
    labels = np.arange(n) % C
    labels[2] = (labels[2] + 1) % C  # one wrong prediction; the last image (alone in the
    # last batch) is right, so skipping it would show
    model = _CountsAndMode().train()
    acc = evaluate(model, images, labels, _cfg(eval_batch_size=3), CPU)
    assert acc == pytest.approx(6 / 7)
    assert model.training
    assert np.isnan(evaluate(model, images[:0], labels[:0], _cfg(), CPU))


def test_every_copy_to_the_device_goes_through_transfer_to_device(monkeypatch):
    """Images, labels and teacher distributions reach the device by metapl.transfer.to_device
    (from pinned memory, without a wait for the GPU's queued work): a plain ``.to(device)`` is a
    host sync per copy on a GPU, which no CPU test sees otherwise."""
    import metapl.train.data as data
    from metapl.transfer import to_device

    copied: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def recording(t, device):
        copied.append((t.dtype, tuple(t.shape)))
        return to_device(t, device)

    monkeypatch.setattr(data, "to_device", recording)
    source = BatchSource(_split(), _cfg(), ("unlabeled_weak",), CPU, (_probs(10, 0), _probs(30, 1)))
    source.batch(0)
    assert sorted(copied, key=str) == sorted(
        [
            (torch.float32, (4, 1, 4, 4)),  # labeled images
            (torch.int64, (4,)),  # their labels
            (torch.float32, (4, C)),  # the teacher's distributions on them
            (torch.float32, (8, 1, 4, 4)),  # unlabeled images
            (torch.float32, (8, C)),  # and on those
        ],
        key=str,
    )
    copied.clear()
    evaluate(_CountsAndMode(), _indexed_images(5), np.arange(5) % C, _cfg(eval_batch_size=3), CPU)
    assert copied == [
        (torch.float32, (3, 1, 4, 4)),
        (torch.int64, (3,)),
        (torch.float32, (2, 1, 4, 4)),
        (torch.int64, (2,)),
    ]
