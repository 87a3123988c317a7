"""No host syncs inside a training step (issue 5's lever), checked without a GPU.

A host sync (``.item()``, ``.tolist()``, ``bool(t)``, a boolean mask's index, ``nonzero``..., or
``torch.tensor(numbers, device=gpu)``, a blocking copy from the host) on a tensor that lives on the
GPU makes the CPU wait for all the work queued there, so it cannot prepare
the next kernels while the GPU runs: the step is then as slow as the CPU's launches and the GPU's
work added up. Two checks, each of which would fail if such a read came back:

- The augmentations run on images on PyTorch's ``meta`` device (shapes, no values) with the CPU
  generator of training runs: any read of an image-side value fails there. (RandAugment used to
  read its per-op group sizes from the images' device: a sync per layer and view, every step.)
- A whole training step (batch, augmentation, the method's step, schedulers, EMA) runs on the CPU
  under a function mode that records every call that reads values on the host or makes a tensor
  from Python numbers on a device. What may remain is host-side on a GPU too, each for the reason
  :data:`HOST_SIDE` gives.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from metapl.augment import StrongAugment, WeakAugment, cutout, rand_augment
from metapl.distributed import DataParallel
from metapl.train.config import apply_overrides
from metapl.train.data import BatchSource
from metapl.train.engine import Run, load_data
from metapl.train.guards import NonFiniteWatch
from metapl.train.presets import load_preset

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# Calls that read a tensor's values on the host (or make a shape depend on them).
READS = frozenset(
    {
        "item",
        "tolist",
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
        "cpu",
        "numpy",
        "__array__",
    }
)
# Tensors made from Python numbers on a given device: on a GPU, a copy from the host that waits
# for the GPU's queued work (RandAugment's geometric ops made two per call, every step).
HOST_COPIES = frozenset({"tensor", "as_tensor", "new_tensor"})
# (call, file) pairs that read tensors which stay on the CPU in a GPU run.
HOST_SIDE = {
    # the epoch's permutation, drawn by a CPU generator: indices, not data
    ("numpy", "metapl/train/data.py"),
    # RandAugment's group sizes, from the policy drawn by the CPU generator
    ("tolist", "metapl/augment/randaugment.py"),
    # Adam's step counter, a CPU tensor unless capturable/fused (then it is not read: see
    # update_rules.AdamRule), and torch's own read of it in Adam.step
    ("__float__", "metapl/mpl/update_rules.py"),
    ("item", "torch/optim/optimizer.py"),
}


class HostReads(TorchFunctionMode):
    """Counts (call, file of the innermost metapl or torch.optim frame) of every host read."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else None
        parts = index if isinstance(index, tuple) else (index,)
        mask = any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)
        copy = name in HOST_COPIES and (kwargs or {}).get("device") is not None
        if name in READS or mask or copy:
            frames = [
                f.filename.replace("\\", "/")
                for f in traceback.extract_stack()[:-1]
                if "/metapl/" in f.filename.replace("\\", "/") or "torch/optim/" in f.filename
            ]
            where = frames[-1] if frames else "?"
            for root in ("/src/", "/site-packages/"):
                where = where.split(root)[-1]
            kind = "boolean mask index" if mask else f"{name} on a device" if copy else name
            self.seen[(kind, where)] += 1
        return func(*args, **(kwargs or {}))


def _short_run(preset: str, overrides: dict, device: torch.device):
    """(config, Run, BatchSource) of a 6-step run of ``preset`` on ``device``, as engine.train
    builds them."""
    settings = {"steps": 6, "warmup_steps": 2, "uda_warmup_steps": 2, "device": device.type}
    cfg = apply_overrides(load_preset(preset), {**settings, **overrides}).validate()
    split = load_data(cfg)
    run = Run(cfg, split, device, DataParallel())
    return cfg, run, BatchSource(split, cfg, run.method.views, device, None, shard=(0, 1))


def test_augmentations_read_no_value_of_the_images_device():
    images = torch.rand(32, 3, 16, 16, device="meta")
    generator = torch.Generator().manual_seed(0)
    out = StrongAugment(cutout=8)(WeakAugment(pad=2)(images, generator=generator), generator)
    assert out.device.type == "meta" and out.shape == images.shape
    out = rand_augment(images[:, :1], num_ops=3, generator=generator)
    assert out.device.type == "meta"
    assert cutout(images, 0.25, generator).device.type == "meta"


def test_the_host_read_check_sees_a_read_in_a_step():
    """The function mode itself: a loss read by .item() in a method's step is recorded."""
    with HostReads() as reads:
        loss = torch.ones(3).sum()
        loss.item()
        torch.zeros(4)[torch.tensor([True, False, True, False])]
        torch.tensor([1.0, 2.0], device=loss.device)
    assert reads.seen == {
        ("item", "?"): 1,
        ("boolean mask index", "?"): 1,
        ("tensor on a device", "?"): 1,
    }


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("digits-uda-mpl", {"finetune_steps": 4}),  # exact, tangent tape; then fine-tuning
        ("digits-uda-mpl", {"ema_decay": 0.99, "mpl_estimator": "first_order"}),
        (
            "digits-uda-mpl",
            {
                "student_optimizer": "adam",
                "teacher_optimizer": "adam",
                "student_grad_clip": 1.0,
                "teacher_grad_clip": 1.0,
                "mpl_jvp": "forward_ad",
            },
        ),
        ("digits-randaugment-mpl", {"label_smoothing": 0.1}),
    ],
    ids=["exact-tape-finetune", "first-order-ema", "adam-clip-forward-ad", "randaugment-mpl"],
)
def test_a_training_step_reads_nothing_of_the_device_on_the_host(preset, overrides):
    """Steady-state steps (the first ones run once-only checks, which may read values): every
    host read is one of HOST_SIDE, none of a loss, a gradient or an image."""
    cfg, run, source = _short_run(preset, overrides, torch.device("cpu"))
    watch = NonFiniteWatch(0)  # the engine's NaN/Inf check of every step's losses
    for _ in range(3):
        watch.observe(run.advance(source))
    reads = HostReads()
    with reads:
        for _ in range(3):
            watch.observe(run.advance(source))
    if cfg.finetune_steps:
        watch.observe(run.advance(source))  # the first fine-tuning step
        with reads:
            for _ in range(2):
                watch.observe(run.advance(source))
    assert run.step == (9 if cfg.finetune_steps else 6)
    unexpected = {k: n for k, n in reads.seen.items() if k not in HOST_SIDE}
    assert not unexpected, unexpected
    assert ("numpy", "metapl/train/data.py") in reads.seen  # the mode saw the step's reads
    watch.check({}, run.step)  # and every loss was finite


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a GPU's own check (torch's sync debug mode)"
)
@pytest.mark.parametrize("overrides", [{}, {"mpl_estimator": "first_order", "ema_decay": 0.99}])
@pytest.mark.parametrize("ahead", [False, True], ids=["in_the_loop", "batches_ahead"])
def test_on_a_gpu_steady_training_steps_make_no_synchronizing_call(overrides, ahead):
    """On CUDA, torch itself reports each synchronizing call (``set_sync_debug_mode``); the
    copies of the batch and of the augmentation's draws (metapl.transfer) are not among them,
    nor the hand-over of a batch made on BatchesAhead's thread and stream (as `metapl train`
    draws them on a GPU)."""
    import warnings

    from metapl.train.batches_ahead import BatchesAhead

    _, run, source = _short_run("digits-uda-mpl", overrides, torch.device("cuda"))
    if ahead:
        source = BatchesAhead(source, "cuda", last_step=10**6)
    watch = NonFiniteWatch(0)  # the engine's NaN/Inf check of every step's losses
    for _ in range(3):
        watch.observe(run.advance(source))
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                watch.observe(run.advance(source))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (torch's notice, once per process, that the mode itself is a prototype is no sync)
    syncs = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if "synchron" in str(w.message) and "is a prototype feature" not in str(w.message)
    ]
    assert not syncs, "\n".join(syncs)
    source.close()
