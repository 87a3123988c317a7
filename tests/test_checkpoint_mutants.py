"""Kill surviving mutants of what keeps a user's work safe: the durability order of an atomic write
(data on disk, then the rename, then the folder entry), temporaries beside their destination and
gone after a failed rename, and the precomputed distributions' claim only of rows already on disk."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import metapl.reduced.precompute as precompute_mod
from metapl.atomic import write_json_atomically
from metapl.errors import CheckpointError
from metapl.train.checkpoint import load_checkpoint, prev_path, save_checkpoint


def _state(step: int) -> dict:
    return {"format_version": 1, "step": step, "student": {"w": torch.full((3,), float(step))}}


@pytest.fixture
def disk_events(monkeypatch):
    """Every ``os.fsync`` (the inode it flushed and whether it is a folder) and ``os.replace``
    (source, destination, and the source's inode), in order."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", info.st_ino, stat.S_ISDIR(info.st_mode)))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", Path(src), Path(dst), os.stat(src).st_ino))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _check_replaces(events: list[tuple], destinations: list[Path]) -> None:
    """Each destination is renamed onto from a temporary beside it, named after it, whose data was
    fsync'ed before the rename."""
    replaces = [e for e in events if e[0] == "replace"]
    assert [e[2] for e in replaces] == destinations
    for event in replaces:
        _, src, dst, inode = event
        assert src.parent == dst.parent and src.name.startswith(f".{dst.name}."), src
        flushed = events[: events.index(event)]
        assert ("fsync", inode, False) in flushed, f"{dst}: renamed before its data was on disk"


def test_a_json_result_is_on_disk_before_it_is_renamed_into_place(tmp_path, disk_events):
    path = tmp_path / "results.json"
    write_json_atomically(path, {"a": 1})
    write_json_atomically(path, {"a": 2})
    _check_replaces(disk_events, [path, path])


def test_a_checkpoint_save_flushes_data_then_renames_then_flushes_the_folder(tmp_path, disk_events):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    _check_replaces(disk_events, [path, prev_path(path), path])
    # Each checkpoint's rename is made durable: the folder is fsync'ed after it, before anything
    # else is renamed.
    folder = tmp_path.stat().st_ino
    renames = [i for i, e in enumerate(disk_events) if e[0] == "replace"] + [len(disk_events)]
    for i, after in zip(renames, renames[1:]):
        if disk_events[i][2] == path:
            assert ("fsync", folder, True) in disk_events[i + 1 : after], disk_events
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(prev_path(path))["step"] == 1


def test_a_failed_rename_leaves_the_old_files_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(src, dst, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, _state(3))
    with pytest.raises(OSError, match="No space"):
        write_json_atomically(tmp_path / "results.json", {"a": 1})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _no_hard_links(*args, **kwargs):
    raise OSError(1, "Operation not permitted")


def _killed_half_written(what, dst, *args, **kwargs):
    if hasattr(dst, "write"):  # torch.save writes checkpoints through a Python file
        dst.write(b"half a file")
        dst.flush()
    else:
        Path(dst).write_bytes(b"half a file")
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "kill",
    [
        {(torch, "save"): _killed_half_written},
        {(os, "link"): _killed_half_written},
        {(os, "link"): _no_hard_links, (shutil, "copyfile"): _killed_half_written},
    ],
    ids=["writing-the-new-one", "linking-the-previous-one", "copying-the-previous-one"],
)
def test_a_save_killed_midway_keeps_the_checkpoint_and_the_previous_one(
    tmp_path, monkeypatch, kill
):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for (module, name), fake in kill.items():
        monkeypatch.setattr(module, name, fake)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(3))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_without_hard_links_the_previous_checkpoint_is_a_copy(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    monkeypatch.setattr(os, "link", _no_hard_links)
    save_checkpoint(path, _state(2))
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(prev_path(path))["step"] == 1
    assert os.stat(path).st_nlink == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_a_save_killed_at_its_last_rename_leaves_the_old_checkpoint_in_place(tmp_path, monkeypatch):
    """The previous checkpoint is a copy (a link) made beside it, never the checkpoint moved away:
    killed just before the new file's rename, ``checkpoint.pt`` is still there, whole."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    real_replace = os.replace

    def killed_onto_the_checkpoint(src, dst, *args, **kwargs):
        if Path(dst) == path:
            raise KeyboardInterrupt
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", killed_onto_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(3))
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(prev_path(path))["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: what a tampered checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "ran"
    torch.save({"format_version": 1, "step": 1, "x": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="corrupt or not a metapl checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


# --- precomputed distributions: the sidecar claims only rows already on disk ----------------------


def test_precompute_claims_rows_only_after_they_are_flushed(tmp_path, monkeypatch):
    """The sidecar (claiming 0 rows) exists before the ``.npy``; the ``.npy``'s header is fsync'ed
    and each chunk's rows flushed before a sidecar claims them, so a crash (or power loss) never
    leaves a sidecar that vouches for rows of zeros."""
    out = tmp_path / "teacher.npy"
    events: list[tuple] = []
    real_write, real_fsync, real_flush = (
        precompute_mod.write_json_atomically,
        precompute_mod.fsync_file,
        np.memmap.flush,
    )

    def write(path, meta, **kwargs):
        events.append(("claim", meta["completed_rows"], out.exists()))
        return real_write(path, meta, **kwargs)

    def fsync(path):
        events.append(("fsync", Path(path)))
        return real_fsync(path)

    def flush(self):
        events.append(("flush",))
        return real_flush(self)

    monkeypatch.setattr(precompute_mod, "write_json_atomically", write)
    monkeypatch.setattr(precompute_mod, "fsync_file", fsync)
    monkeypatch.setattr(np.memmap, "flush", flush)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images = np.random.default_rng(0).integers(0, 256, size=(7, 2, 2, 3), dtype=np.uint8)
    precompute_mod.precompute_distributions(
        model, images, out, batch_size=2, chunk_size=4, progress=False
    )
    claims = [e for e in events if e[0] == "claim"]
    assert [c[1] for c in claims] == [0, 4, 7]
    assert claims[0] == ("claim", 0, False), "the .npy was created before its sidecar"
    assert ("fsync", out) in events[events.index(claims[0]) : events.index(claims[1])]
    for claim in claims[1:]:
        assert events[events.index(claim) - 1] == ("flush",), (
            f"{claim} before its rows were flushed"
        )


# --- the resume check ------------------------------------------------------------------------


def test_every_training_option_but_length_cadence_and_device_guards_a_resume():
    """A run folder resumes only under the same options: changing any option of a run (the seed,
    a learning rate, the model...) changes the fingerprint; only its length, the logging,
    evaluation and checkpoint cadence, the device and how image files are decoded (threads, a
    step ahead: the same batches either way) may change."""
    from metapl.train.checkpoint import config_fingerprint
    from metapl.train.config import TrainConfig

    config = TrainConfig().to_dict()
    may_change = {"steps", "checkpoint_every", "eval_every", "log_every", "device"}
    may_change |= {"data_threads", "data_prefetch"}
    fingerprint = config_fingerprint(config)
    for key in config:
        changed = config_fingerprint({**config, key: ["another value"]}) != fingerprint
        assert changed == (key not in may_change), key


# --- a checkpoint written inside the fine-tuning phase ---------------------------------------------


@pytest.mark.usefixtures("single_torch_thread")
def test_a_checkpoint_written_inside_fine_tuning_restores_its_optimizer_and_schedule(tmp_path):
    """The fine-tuning optimizer (its momentum) and schedule are in the checkpoint: a run put back
    to a checkpoint written mid-fine-tuning takes exactly the step it took the first time."""
    from test_engine import _digits_config

    from metapl.train import engine
    from metapl.train.config import apply_overrides

    overrides = {"method": "supervised", "steps": 1, "warmup_steps": 0, "finetune_steps": 4}
    cfg = apply_overrides(_digits_config(), overrides)
    split, cpu = engine.load_data(cfg), torch.device("cpu")
    run = engine.Run(cfg, split, cpu)
    source = engine.BatchSource(split, cfg, run.method.views, cpu)
    for _ in range(3):  # one supervised step, two fine-tuning steps
        run.advance(source)
    assert run.finetune is not None and run.finetune.optimizers["student"].state
    save_checkpoint(tmp_path / "checkpoint.pt", run.state_dict("fingerprint"))
    taken = []
    for _ in range(2):  # the 4th step, then the 4th step again from the checkpoint
        run.advance(source)
        weights = {k: v.clone() for k, v in run.method.models["student"].state_dict().items()}
        taken.append((run.learning_rates(), weights))
        run.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt"))
    (want_lr, want), (got_lr, got) = taken
    assert got_lr == want_lr
    for key, value in want.items():
        assert torch.equal(got[key], value), key
