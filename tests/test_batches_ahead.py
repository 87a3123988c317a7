"""BatchesAhead: the next step's batch made on a background thread gives the very batches of the
source, in order, with the source called from one thread only, and errors at the step they
belong to. It runs on the CPU too (without streams), which is how these tests see it; the
engine uses it on GPUs only (batches_for)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import pytest
import torch

from metapl.errors import ConfigError
from metapl.methods.base import Batch
from metapl.train.batches_ahead import BatchesAhead, batches_for


def _digits_source():
    return _digits_source_on("cpu")


def _digits_source_on(device: str):
    from metapl.data.digits import digits_split
    from metapl.train.config import apply_overrides
    from metapl.train.data import BatchSource
    from metapl.train.presets import load_preset

    cfg = apply_overrides(load_preset("digits-uda-mpl"), {"batch_size": 6, "unlabeled_ratio": 3})
    views = ("labeled_strong", "unlabeled_weak", "unlabeled_strong")
    return lambda: BatchSource(digits_split(0, 5), cfg, views, torch.device(device))


def _assert_same(a: Batch, b: Batch) -> None:
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def test_the_batches_are_the_sources_in_order_views_switch_included():
    make = _digits_source()
    ahead = BatchesAhead(make(), "cpu", last_step=9)
    reference = make()
    try:
        for step in range(4):
            _assert_same(ahead.batch(step), reference.batch(step))
        # fine-tuning's views from step 4 (the batch made ahead had the default views)
        for step in (4, 5):
            _assert_same(ahead.batch(step, views=()), reference.batch(step, views=()))
        # a jump (a resume elsewhere): the batch asked for, not the one made ahead
        _assert_same(ahead.batch(8), reference.batch(8))
    finally:
        ahead.close()


class _Recording:
    """A source that records which steps it made, on which thread, and fails at ``bad``."""

    def __init__(self, bad: int | None = None):
        self.made: list[tuple[int, object]] = []
        self.threads: set[int] = set()
        self.bad, self.closed = bad, False

    def batch(self, step, views=None):
        self.threads.add(threading.get_ident())
        self.made.append((step, views))
        if step == self.bad:
            raise ConfigError(f"image file {step}.png is damaged")
        return Batch(torch.full((1,), float(step)), torch.zeros(1, dtype=torch.long), step=step)

    def close(self):
        self.closed = True


def test_one_worker_thread_calls_the_source_and_nothing_is_made_past_the_last_step():
    source = _Recording()
    ahead = BatchesAhead(source, "cpu", last_step=2)  # type: ignore[arg-type]
    got = [ahead.batch(s).step for s in range(3)]
    ahead.close()
    assert got == [0, 1, 2]
    assert source.made == [(0, None), (1, None), (2, None)]
    assert len(source.threads) == 1 and threading.get_ident() not in source.threads
    assert source.closed


def test_an_error_is_raised_at_the_step_it_belongs_to_and_dropped_if_that_step_never_comes():
    source = _Recording(bad=2)
    ahead = BatchesAhead(source, "cpu", last_step=5)  # type: ignore[arg-type]
    assert ahead.batch(0).step == 0
    assert ahead.batch(1).step == 1  # step 2's batch fails on the worker meanwhile
    with pytest.raises(ConfigError, match="2.png is damaged"):
        ahead.batch(2)
    ahead.close()

    source = _Recording(bad=2)
    ahead = BatchesAhead(source, "cpu", last_step=5)  # type: ignore[arg-type]
    ahead.batch(1)
    ahead.close()  # the run stopped after step 1: step 2's error is nobody's
    assert (2, None) in source.made and source.closed


def test_the_cpu_draws_from_the_source_itself():
    source = _Recording()
    assert batches_for(source, "cpu", last_step=3) is source  # type: ignore[arg-type]


class _Counted:
    """A BatchSource that records the (step, views) of every batch it makes."""

    made: list = []

    def __init__(self, source):
        self.source = source
        _Counted.made = []

    def batch(self, step, views=None):
        _Counted.made.append((step, views))
        return self.source.batch(step, views)

    def close(self):
        self.source.close()


def test_metapl_train_with_batches_made_ahead_trains_exactly_as_without(tmp_path, monkeypatch):
    """The engine's loop with BatchesAhead (as on a GPU, here forced on the CPU), through
    fine-tuning's switch of views: the same weights as drawing from the source itself."""
    from metapl.cli import main
    from metapl.train import engine
    from metapl.train.checkpoint import load_checkpoint

    settings = {
        "batch_size": 8,
        "unlabeled_ratio": 2,
        "warmup_steps": 1,
        "uda_warmup_steps": 2,
        "finetune_steps": 2,
        "eval_every": 100,
        "checkpoint_every": 100,
    }
    args = ["--steps", "3", "--device", "cpu", "--quiet"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    made_ahead: list[int] = []

    def ahead(source, device, last_step, views_at):
        made_ahead.append(last_step)
        return BatchesAhead(_Counted(source), device, last_step, views_at)

    weights = {}
    for name in ("source", "ahead"):
        if name == "ahead":
            monkeypatch.setattr(engine, "batches_for", ahead)
        out = tmp_path / name
        assert main(["train", "--preset", "digits-uda-mpl", "--out", str(out), *args]) == 0
        weights[name] = load_checkpoint(out / "checkpoint.pt")["student"]
    assert made_ahead == [4]  # 3 steps + 2 of fine-tuning: the last is step 4
    # each batch made once: step 3's with fine-tuning's views, none dropped at the switch
    assert _Counted.made == [(0, None), (1, None), (2, None), (3, ()), (4, ())]
    for key, value in weights["source"].items():
        assert torch.equal(weights["ahead"][key], value), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the worker's own CUDA stream")
def test_on_a_gpu_the_batches_made_on_the_workers_stream_are_the_sources():
    make = _digits_source_on("cuda")
    ahead = BatchesAhead(make(), "cuda", last_step=9)
    reference = make()
    try:
        for step in range(3):
            got = ahead.batch(step)
            # the step's stream reads it: its values once the worker's kernels are done
            doubled = got.x_unlabeled_strong * 2
            _assert_same(got, reference.batch(step))
            assert torch.equal(doubled, reference.batch(step).x_unlabeled_strong * 2)
    finally:
        ahead.close()


def test_the_views_of_the_next_step_are_asked_for_not_guessed():
    """At the switch to fine-tuning (views_at), the batch made ahead has fine-tuning's views: none
    is made for nothing (with ImageNet's files, a whole unlabeled batch decoded in vain)."""
    source = _Recording()
    ahead = BatchesAhead(
        source,  # type: ignore[arg-type]
        "cpu",
        last_step=3,
        views_at=lambda step: None if step < 2 else (),
    )
    got = [ahead.batch(s, None if s < 2 else ()).step for s in range(4)]
    ahead.close()
    assert got == [0, 1, 2, 3]
    assert source.made == [(0, None), (1, None), (2, ()), (3, ())]


def test_on_a_gpu_the_worker_makes_the_ranks_device_its_own(monkeypatch):
    """Under torchrun rank r's batches are made on cuda:r. A new thread's current device is
    cuda:0, and leaving the worker's stream context made it current there: a CUDA context on GPU 0
    for every rank. The worker sets its device first (CUDA replaced by stand-ins here)."""
    set_on: list[tuple[int, object]] = []

    class Stream:
        def __init__(self, device=None):
            self.device = torch.device(device)

        def wait_event(self, event):
            pass

    class Event:
        def record(self, stream=None):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
    monkeypatch.setattr(
        torch.cuda, "set_device", lambda d: set_on.append((threading.get_ident(), d))
    )
    source = _Recording()
    ahead = BatchesAhead(source, "cuda:1", last_step=1)  # type: ignore[arg-type]
    assert ahead.batch(0).step == 0 and ahead.batch(1).step == 1
    ahead.close()
    assert set_on == [(next(iter(source.threads)), torch.device("cuda:1"))]
