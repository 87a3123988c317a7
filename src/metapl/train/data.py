"""Each step's batch, drawn and augmented deterministically from (seed, step).

Nothing here carries state between steps: the batch of step s depends only on the seed and s. So a
run resumed at step s sees exactly the batches an uninterrupted run would have seen, and the
"data position" in a checkpoint is simply the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from metapl.augment import StrongAugment, WeakAugment
from metapl.augment.rng import Share
from metapl.data.arrays import to_tensor_nchw
from metapl.data.decoding import PendingImages, submit
from metapl.data.imagenet import LazyImages
from metapl.data.splits import SSLSplit
from metapl.errors import ConfigError
from metapl.methods.base import Batch
from metapl.train.config import TrainConfig
from metapl.transfer import to_device


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple (seed, stream name, step ...), stable across runs and platforms."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def model_input(
    images: np.ndarray, device: torch.device, channels_last: bool | None = None
) -> Tensor:
    """uint8 ``[N, H, W, C]`` images -> the float32 ``[N, C, H, W]`` batch in ``[0, 1]`` a model takes,
    on ``device``, in the models' memory format (``channels_last``; default: on CUDA only, as
    ``memory_format="auto"`` builds them).

    The one preprocessing of training, evaluation and ``metapl predict``: pixels are scaled to
    ``[0, 1]`` by :func:`~metapl.data.arrays.to_tensor_nchw` and nothing else (no mean/std
    normalization), so predictions on image files match the run's reported accuracy.
    """
    x = to_device(to_tensor_nchw(images), device)
    if channels_last is None:
        channels_last = device.type == "cuda"
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class EpochIndices:
    """Batches of indices that walk through shuffled epochs; epoch e's order is seeded by e."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: str):
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(stream_seed(self.seed, self.stream, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).numpy()
        assert self._perm is not None  # steps, hence epochs, count from 0: never the initial -1
        return self._perm

    def at(self, step: int) -> np.ndarray:
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = positions // self.n
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = self._permutation(int(epoch))[positions[here] % self.n]
        return out


class BatchSource:
    """Labeled and unlabeled batches with the views a method asks for, on ``device``."""

    def __init__(
        self,
        split: SSLSplit,
        cfg: TrainConfig,
        views: tuple[str, ...],
        device,
        teacher_probs: tuple[np.ndarray, np.ndarray] | None = None,
        shard: tuple[int, int] = (0, 1),
    ):
        """``teacher_probs``: the large teacher's distributions of the labeled and the unlabeled
        images (ReducedMPL, NoisyStudent), row-aligned with ``split``.

        ``shard=(rank, world_size)`` (data parallelism): every tensor of the batch is rank's
        contiguous slice of the global batch (``cfg.batch_size`` labeled, ``batch_size *
        unlabeled_ratio`` unlabeled; batch_size divisible by world_size). Each rank reads,
        decodes and augments its own slice only, with the random draws of the whole batch, so
        the ranks' slices concatenate to the single-process batch."""
        self.split, self.cfg, self.views, self.device = split, cfg, set(views), device
        self.teacher_probs = teacher_probs
        self.rank, self.world_size = shard
        if cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {self.world_size}")
        self.labeled = EpochIndices(len(split.y_labeled), cfg.batch_size, cfg.seed, "labeled")
        n_u = len(split.x_unlabeled)
        self.unlabeled = EpochIndices(n_u, cfg.batch_size * cfg.unlabeled_ratio, cfg.seed, "unl")
        # Reflect padding needs pad < the image's sides: say so now, not at the first batch.
        smallest = min(min(x.shape[1:3]) for x in (split.x_labeled, split.x_unlabeled))
        if cfg.pad >= smallest:
            raise ConfigError(
                f"pad {cfg.pad} is too large for this dataset's {smallest}-pixel images (reflect "
                f"padding needs pad < {smallest}); lower it with --set pad=N"
            )
        # A cutout square as large as the images leaves most of each strong view gray (all of it
        # from twice the side): a preset's cutout kept after --set image_size, say.
        if cfg.cutout >= smallest and any(view.endswith("_strong") for view in self.views):
            raise ConfigError(
                f"cutout {cfg.cutout} is not smaller than this dataset's {smallest}-pixel images "
                "(the strong views would be mostly gray); lower it with --set cutout=N (the "
                "presets use half the side)"
            )
        self.weak = WeakAugment(pad=cfg.pad, flip_prob=0.5 if cfg.flip else 0.0)
        self.strong = StrongAugment(
            num_ops=cfg.randaugment_ops, max_magnitude=cfg.randaugment_magnitude, cutout=cfg.cutout
        )
        # Lazily decoded image files (ImageNet, large folders of your own) are decoded a step
        # ahead, on metapl.data.decoding's threads: "labeled" / "unlabeled" -> (step, images being
        # decoded). In-memory arrays need no such thing.
        self._ahead: dict[str, tuple[int, PendingImages]] = {}

    def _mine(self, indices: np.ndarray) -> tuple[np.ndarray, Share | None]:
        """This rank's rows of a global batch's ``indices`` (all of them in one process), and
        where they sit in it for the augmentations, which draw for the whole batch and keep these
        rows' draws (None in one process: the whole batch)."""
        if self.world_size == 1:
            return indices, None
        share = len(indices) // self.world_size
        start = self.rank * share
        return indices[start : start + share], Share(start=start, total=len(indices))

    def _images(self, role: str, source, indices: np.ndarray, step: int) -> Tensor:
        """The images of ``indices`` (this rank's rows), from the look-ahead where it decoded
        them."""
        ahead = self._ahead.pop(role, None)
        if ahead is not None and ahead[0] == step and np.array_equal(ahead[1].indices, indices):
            images = ahead[1].result()  # an unreadable file raises here, at the step that reads it
        else:
            if ahead is not None:  # decoded for a step that did not come (a resume, a jump)
                ahead[1].cancel()
            images = source[indices]
        # Contiguous for augmentation (its ops return contiguous images whatever they get); the
        # finished views are put in the models' layout by _to_model_layout.
        return model_input(images, self.device, channels_last=False)

    def _decode_ahead(self, step: int) -> None:
        """Start decoding the lazily decoded images of ``step`` (the next one) in the background.
        Its indices are taken here, in the calling thread: EpochIndices caches one epoch's order
        and is not safe to share between threads."""
        if not self.cfg.data_prefetch or step >= self.cfg.steps + self.cfg.finetune_steps:
            return
        roles = [("labeled", self.split.x_labeled, self.labeled)]
        # fine-tuning's steps (from cfg.steps on) read the labeled images only (Run.advance)
        if self.views & {"unlabeled_weak", "unlabeled_strong"} and step < self.cfg.steps:
            roles.append(("unlabeled", self.split.x_unlabeled, self.unlabeled))
        for role, source, order in roles:
            if isinstance(source, LazyImages) and role not in self._ahead:
                self._ahead[role] = (step, submit(source, self._mine(order.at(step))[0]))

    def close(self) -> None:
        """Drop the images being decoded ahead (the run ends, or stops); returns once none is."""
        for _, pending in self._ahead.values():  # all dropped before waiting for any
            pending.cancel(wait_for_running=False)
        for _, pending in self._ahead.values():
            pending.cancel()
        self._ahead.clear()

    def batch(self, step: int, views: tuple[str, ...] | None = None) -> Batch:
        """The batch of ``step`` with ``views`` (default: the views given at construction)."""
        wanted = self.views if views is None else set(views)
        gen = torch.Generator().manual_seed(stream_seed(self.cfg.seed, "augment", step))
        # Under torchrun: this rank's rows of the global batch, which it alone reads, decodes and
        # augments (with the whole batch's random draws: metapl.augment.rng.Share).
        idx, share_l = self._mine(self.labeled.at(step))
        x_l = self._images("labeled", self.split.x_labeled, idx, step)
        unlabeled = None
        if wanted & {"unlabeled_weak", "unlabeled_strong"}:
            idx_u, share_u = self._mine(self.unlabeled.at(step))
            unlabeled = idx_u, self._images("unlabeled", self.split.x_unlabeled, idx_u, step)
        # the next step's files decode while this step augments and trains
        self._decode_ahead(step + 1)
        # no wait for the GPU's queued work (metapl.transfer)
        y_l = to_device(torch.from_numpy(self.split.y_labeled[idx]), self.device)
        batch = Batch(self.weak(x_l, gen, share_l), y_l, step=step)
        if "labeled_strong" in wanted:
            batch.x_labeled_strong = self.strong(self.weak(x_l, gen, share_l), gen, share_l)
        if unlabeled is not None:
            idx_u, x_u = unlabeled
            if self.teacher_probs is not None:
                probs_l, probs_u = self.teacher_probs
                batch.t_labeled = to_device(torch.from_numpy(np.asarray(probs_l[idx])), self.device)
                batch.t_unlabeled = to_device(
                    torch.from_numpy(np.asarray(probs_u[idx_u])), self.device
                )
            if "unlabeled_weak" in wanted:
                batch.x_unlabeled_weak = self.weak(x_u, gen, share_u)
            if "unlabeled_strong" in wanted:
                batch.x_unlabeled_strong = self.strong(self.weak(x_u, gen, share_u), gen, share_u)
        return self._to_model_layout(batch)

    def _to_model_layout(self, batch: Batch) -> Batch:
        """Image views in the models' memory format (channels_last on CUDA by default), so the
        first convolution does not convert them."""
        if self.cfg.channels_last(self.device):
            for f in dataclasses.fields(batch):
                value = getattr(batch, f.name)
                if isinstance(value, Tensor) and value.dim() == 4:
                    setattr(batch, f.name, value.contiguous(memory_format=torch.channels_last))
        return batch


def evaluate(model, images, labels: np.ndarray, cfg: TrainConfig, device, amp=None) -> float:
    """Top-1 accuracy in eval mode (no augmentation), in batches."""
    return evaluate_models({"model": model}, images, labels, cfg, device, amp)["model"]


@torch.no_grad()
def evaluate_models(
    models: dict[str, torch.nn.Module],
    images,
    labels: np.ndarray,
    cfg: TrainConfig,
    device,
    amp=None,
    shard: tuple[int, int] = (0, 1),
    sum_over_ranks: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Top-1 accuracy of each model in eval mode (no augmentation), in one pass over the images:
    image files (ImageNet's) are decoded once for all the models, the next batch while the models
    classify this one.

    ``shard=(rank, world_size)`` (torchrun): this process reads and classifies only its share of
    the images (contiguous rows; the shares cover them all), and ``sum_over_ranks`` (an
    all-reduce, which every rank must call) adds up the ranks' counts of correct predictions. The
    models must be the same on every rank, buffers included."""
    if len(labels) == 0:
        return dict.fromkeys(models, float("nan"))
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    correct = torch.zeros(len(models), dtype=torch.long, device=device)
    rank, world_size = shard
    mine = np.array_split(np.arange(len(labels)), world_size)[rank]
    batches = [
        mine[start : start + cfg.eval_batch_size]
        for start in range(0, len(mine), cfg.eval_batch_size)
    ]
    lazy = isinstance(images, LazyImages) and batches
    ahead = submit(images, batches[0]) if lazy else None
    try:
        for i, idx in enumerate(batches):
            if ahead is not None:
                pixels = ahead.result()
                ahead = submit(images, batches[i + 1]) if i + 1 < len(batches) else None
            else:
                pixels = images[idx]
            x = model_input(pixels, device, cfg.channels_last(device))
            # one host sync in all, at the end: the labels' copies do not wait for the GPU either
            y = to_device(torch.from_numpy(labels[idx]), device)
            for m, model in enumerate(models.values()):
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    pred = model(x).argmax(-1)
                correct[m] += (pred == y).sum()
    finally:
        if ahead is not None:  # an error, or Ctrl-C: the next batch is not needed
            ahead.cancel()
        for name, model in models.items():
            model.train(was_training[name])
    if sum_over_ranks is not None:
        correct = sum_over_ranks(correct)
    return {name: int(count) / len(labels) for name, count in zip(models, correct.tolist())}
