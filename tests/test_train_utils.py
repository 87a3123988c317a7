"""Training utilities: LR schedule, EMA, atomic checkpoints, RNG capture, metrics log, NaN guards."""

from __future__ import annotations

import csv
import math
import os
import random
import shlex
import warnings
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import torch
from test_nonfinite_watch import check_once
from torch import nn

from metapl.errors import CheckpointError, ConfigError, NonFiniteLossError
from metapl.train import checkpoint as ckpt_mod
from metapl.train.checkpoint import (
    REQUIRED_KEYS,
    capture_rng,
    check_resumable,
    config_fingerprint,
    load_checkpoint,
    prev_path,
    restore_rng,
    save_checkpoint,
)
from metapl.train.ema import EMA
from metapl.train.guards import to_floats
from metapl.train.metrics_log import MetricsLogger
from metapl.train.schedule import make_scheduler, warmup_cosine

# ----------------------------------------------------------------------------- schedule


def test_warmup_cosine_shape():
    total, warmup = 100, 10
    values = [warmup_cosine(s, total, warmup) for s in range(total + 1)]
    assert values[0] == pytest.approx(1 / warmup) and values[0] > 0
    assert values[warmup - 1] == 1.0 and values[warmup] == 1.0
    assert values[total] == 0.0 and warmup_cosine(total + 5, total, warmup) == 0.0
    assert all(a < b for a, b in zip(values[:warmup], values[1:warmup]))
    assert all(a > b for a, b in zip(values[warmup:], values[warmup + 1 :]))
    # Midway through the decay the cosine is at one half.
    assert warmup_cosine(warmup + (total - warmup) // 2, total, warmup) == pytest.approx(0.5)


def test_warmup_cosine_without_warmup_and_bad_lengths():
    assert warmup_cosine(0, 10, 0) == 1.0
    assert warmup_cosine(10, 10, 0) == 0.0
    with pytest.raises(ConfigError, match=r"between 0 and the number of steps \(10\), got 11"):
        warmup_cosine(0, 10, 11)
    with pytest.raises(ConfigError, match="^steps must be at least 1, got 0"):
        warmup_cosine(0, 0, 0)


def test_warmup_as_long_as_the_run_then_zero():
    """``warmup_steps == total_steps`` is allowed: a pure linear ramp whose last step reaches 1,
    then 0 from ``total_steps`` on (never the cosine's 0 / 0)."""
    assert [warmup_cosine(s, 4, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 0.0, 0.0]
    # one step, no warm-up: the only step runs at the full rate
    assert [warmup_cosine(s, 1, 0) for s in range(3)] == [1.0, 0.0, 0.0]


def test_negative_warmup_is_refused():
    """A negative warm-up would skip the ramp and start the cosine past its top."""
    with pytest.raises(ConfigError, match="warmup steps must be between 0"):
        warmup_cosine(0, 10, -1)
    with pytest.raises(ConfigError, match="warmup steps must be between 0"):
        make_scheduler(_sgd(), 10, -1)


def test_resume_with_more_steps_keeps_the_counter_and_takes_the_new_length():
    """The scheduler's state holds only the counter: loaded into a scheduler for a longer run,
    the next LR follows the longer schedule from the saved step."""
    opt = _sgd()
    sched = make_scheduler(opt, 10, 2)
    _run(opt, sched, 6)
    state = sched.state_dict()
    opt2 = _sgd()
    sched2 = make_scheduler(opt2, 30, 2)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()  # the step after the saved one: 0-based optimizer step 6 -> LR of step 7
    assert sched2.last_epoch == 7
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5 * warmup_cosine(7, 30, 2))


def _sgd(lr: float = 0.5) -> torch.optim.Optimizer:
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))]
    return torch.optim.SGD(
        [{"params": params[:1]}, {"params": params[1:], "lr": 0.1}], lr=lr, momentum=0.9
    )


def _run(optimizer, scheduler, n: int) -> list[list[float]]:
    lrs = []
    for _ in range(n):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def test_scheduler_follows_lambda_and_resumes_exactly():
    total, warmup = 20, 4
    opt = _sgd()
    sched = make_scheduler(opt, total, warmup)
    full = _run(opt, sched, total)
    assert [lrs[0] for lrs in full] == [0.5 * warmup_cosine(s, total, warmup) for s in range(total)]
    assert opt.param_groups[0]["lr"] == 0.0 and opt.param_groups[1]["lr"] == 0.0

    opt = _sgd()
    sched = make_scheduler(opt, total, warmup)
    first = _run(opt, sched, 7)
    saved = {"opt": opt.state_dict(), "sched": sched.state_dict()}
    opt2 = _sgd()
    sched2 = make_scheduler(opt2, total, warmup)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert first + _run(opt2, sched2, total - 7) == full


# ----------------------------------------------------------------------------- EMA


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


def test_ema_matches_closed_form_and_copies_buffers():
    torch.manual_seed(0)
    model = _Tiny()
    decay = 0.9
    ema = EMA(model, decay)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())

    start = model.linear.weight.detach().clone()
    history = []
    for k in range(5):
        with torch.no_grad():
            model.linear.weight.add_(torch.randn_like(model.linear.weight))
        model.train()(torch.randn(8, 3))  # moves the BatchNorm running stats
        history.append(model.linear.weight.detach().clone())
        ema.update(model)
        # decay^(k+1) * start + sum_i (1 - decay) decay^(k - i) w_i
        expected = decay ** (k + 1) * start
        for i, w in enumerate(history):
            expected = expected + (1 - decay) * decay ** (k - i) * w
        torch.testing.assert_close(ema.module.linear.weight, expected, rtol=1e-6, atol=1e-6)
    for name, buffer in model.named_buffers():
        assert torch.equal(dict(ema.module.named_buffers())[name], buffer)
    assert int(ema.module.bn.num_batches_tracked) == 5
    assert not ema.module.training


def test_ema_state_dict_round_trip_and_structure_check():
    model = _Tiny()
    ema = EMA(model, 0.5)
    with torch.no_grad():
        model.linear.bias.fill_(2.0)
    ema.update(model)
    other = EMA(_Tiny(), 0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module.linear.bias, ema.module.linear.bias)
    plain = _Tiny()
    plain.load_state_dict(ema.state_dict())  # the EMA weights load into a plain model
    with pytest.raises(ValueError):
        ema.update(nn.Linear(3, 2))
    with pytest.raises(ValueError):
        EMA(model, 1.5)


def test_ema_decay_bounds_are_inclusive():
    """Decay 0 copies the model at every update, decay 1 keeps the weights it started from;
    anything outside [0, 1] (a negative decay extrapolates past the model) is refused."""
    torch.manual_seed(0)
    model = _Tiny()
    start = model.linear.weight.detach().clone()
    copy_ema, frozen_ema = EMA(model, 0.0), EMA(model, 1.0)
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    copy_ema.update(model)
    frozen_ema.update(model)
    assert torch.equal(copy_ema.module.linear.weight, model.linear.weight)
    assert torch.equal(frozen_ema.module.linear.weight, start)
    for bad in (-0.1, 1.0 + 1e-9):
        with pytest.raises(ValueError, match="EMA decay must be in"):
            EMA(model, bad)


class _Swapped(nn.Module):
    """``_Tiny``'s names and shapes, registered in the other order (bn first)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.linear = nn.Linear(3, 2)


class _Renamed(nn.Module):
    """``_Tiny``'s parameter count and shapes under other names."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)


def test_ema_matches_parameters_by_name_not_position():
    """Same names in another order still average each weight with its namesake; same count
    under other names is refused rather than averaged by position."""
    torch.manual_seed(0)
    ema = EMA(_Tiny(), 0.5)
    start = {k: v.clone() for k, v in ema.module.named_parameters()}
    other = _Swapped()
    ema.update(other)
    for name, p in other.named_parameters():
        torch.testing.assert_close(ema.module.get_parameter(name), 0.5 * (start[name] + p))
    with pytest.raises(ValueError, match="parameters differ"):
        ema.update(_Renamed())


# ----------------------------------------------------------------------------- checkpoints


def _state(step: int) -> dict:
    return {
        "format_version": 1,
        "step": step,
        "student": {"w": torch.full((4,), float(step))},
        "config": {"lr": 0.1, "dims": (1, 2), "name": "x"},
    }


def test_checkpoint_round_trip_and_prev(tmp_path: Path):
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    loaded = load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["student"]["w"], torch.full((4,), 1.0))
    assert loaded["config"]["dims"] == (1, 2)
    assert not prev_path(path).exists()
    save_checkpoint(path, _state(2))
    assert load_checkpoint(path)["step"] == 2
    assert prev_path(path) == tmp_path / "run" / "checkpoint.prev.pt"
    assert load_checkpoint(prev_path(path))["step"] == 1
    save_checkpoint(path, _state(3))
    assert load_checkpoint(prev_path(path))["step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_checkpoint_save_is_atomic_under_a_crash(tmp_path: Path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # garbage in the temporary file, then the "kill"
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(2))
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]

    # A kill -9 leaves its temporary file behind: loading ignores it, the next save removes it.
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert load_checkpoint(path)["step"] == 1
    save_checkpoint(path, _state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_checkpoint_save_rejects_unplain_state(tmp_path: Path):
    with pytest.raises(TypeError, match=r"\['config'\]\['out'\]"):
        save_checkpoint(tmp_path / "c.pt", {**_state(1), "config": {"out": Path("x")}})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "c.pt", {**_state(1), "np": np.float64(1.0)})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path / "c.pt", {"format_version": 1})
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("damage", ["truncate", "random", "text"])
def test_corrupt_checkpoint_names_the_file_and_the_previous_one(tmp_path: Path, damage: str):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    data = path.read_bytes()
    corrupt = {
        "truncate": data[: len(data) // 2],
        "random": np.random.default_rng(0).bytes(len(data)),
        "text": b"not a checkpoint\n",
    }[damage]
    path.write_bytes(corrupt)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "corrupt" in message
    assert f"mv {prev_path(path)} {path}" in message

    prev_path(path).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="unreadable too"):
        load_checkpoint(path)
    prev_path(path).unlink()
    with pytest.raises(CheckpointError, match="no previous checkpoint"):
        load_checkpoint(path)


def _flip_a_bit_of_the_weights(path: Path) -> None:
    """One bit of the largest record's data (the tensor's bytes) flipped, as a disk or copy can."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)
    data = bytearray(path.read_bytes())
    # the record's bytes follow its 30-byte local header, its name and its extra field (whose
    # lengths end the header; torch pads the extra field to align the data)
    at = record.header_offset
    name_len, extra_len = (
        int.from_bytes(data[at + 26 : at + 28], "little"),
        int.from_bytes(data[at + 28 : at + 30], "little"),
    )
    data[at + 30 + name_len + extra_len + record.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_checkpoint_is_a_corrupt_checkpoint(tmp_path: Path):
    """torch.load does not check the archive's CRC-32s: a flipped bit in a weight loaded as another
    weight, and `metapl train` resumed from it without a word (and rotated it into .prev.pt)."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, {**_state(2), "student": {"w": torch.arange(4096.0)}})
    _flip_a_bit_of_the_weights(path)
    assert torch.load(path, weights_only=True)["step"] == 2  # torch itself reads it
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "corrupt" in message and "does not match its checksum" in message
    assert f"mv {prev_path(path)} {path}" in message  # the previous one is intact

    # Checksums are written even when this process turned them off for torch.save.
    torch.serialization.set_crc32_options(False)
    try:
        save_checkpoint(path, _state(3))
    finally:
        torch.serialization.set_crc32_options(True)
    assert load_checkpoint(path)["step"] == 3
    # A file saved without checksums (every CRC 0) cannot be checked, and still loads.
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(_state(4), path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert load_checkpoint(path)["step"] == 4


@pytest.mark.parametrize("saved", ["model", "function of a blocked module"])
def test_a_torch_save_of_a_model_is_named_as_such_without_torchs_advice(tmp_path: Path, saved):
    """torch's weights-only error came through: terminal escape codes in the one line, and advice
    to load the file with weights_only=False (which runs the code a pickle holds). torch words
    it otherwise for a global of a module it blocks (os.getcwd), without its unpickler's marker."""
    path = tmp_path / "checkpoint.pt"
    torch.save(torch.nn.Linear(2, 2) if saved == "model" else {"f": os.getcwd}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "it holds Python objects, not only tensors: a torch.save of a model" in message
    assert "\x1b" not in message and "weights_only" not in message, message


def test_bytes_that_are_no_pickle_are_not_named_a_torch_save_of_a_model(tmp_path: Path):
    """torch's weights-only error says "Weights only load failed" of any bytes it cannot read
    (found by session 31's docs audit: `echo garbage > checkpoint.pt` was "a torch.save of a
    model or optimizer")."""
    path = tmp_path / "checkpoint.pt"
    for data, reason in (
        (b"garbage\n", "unsupported operand"),
        # torch's reader of old files: a KeyError whose message was only the key ("(101)")
        (b"hello", "torch's reader failed on key 101"),
    ):
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert f"it is not a file torch.save wrote: {reason}" in message, message
        assert "Python objects" not in message and "\n" not in message
        assert "weights_only" not in message


def test_missing_checkpoint_and_missing_keys(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    for key in REQUIRED_KEYS:
        state = _state(1)
        del state[key]
        torch.save(state, tmp_path / "c.pt")
        with pytest.raises(CheckpointError, match=f"lacks {key}"):
            load_checkpoint(tmp_path / "c.pt")
    torch.save([1, 2], tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint(tmp_path / "c.pt")
    # a step that is no count of steps (hand-edited): a resume went on from step -5
    for step in (-5, 2.5, "3"):
        torch.save({**_state(1), "step": step}, tmp_path / "c.pt")
        with pytest.raises(CheckpointError, match=f"its step is {step!r}, not a count of steps"):
            load_checkpoint(tmp_path / "c.pt")
    save_checkpoint(tmp_path / "v.pt", _state(1))
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(tmp_path / "v.pt", format_version=2)


def _draws(generator: torch.Generator) -> list:
    return [
        torch.rand(3).tolist(),
        torch.randn(2, generator=generator).tolist(),
        np.random.rand(3).tolist(),
        np.random.randn(1).tolist(),  # uses numpy's cached gaussian
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
    ]


def test_rng_capture_restore_through_a_checkpoint(tmp_path: Path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    generator = torch.Generator().manual_seed(7)
    np.random.randn(1)  # leave a cached gaussian in numpy's state
    random.gauss(0, 1)
    state = capture_rng({"augment": generator})
    expected = _draws(generator)
    _draws(generator)  # move every stream on

    save_checkpoint(tmp_path / "c.pt", {"format_version": 1, "step": 0, "rng": state})
    loaded = load_checkpoint(tmp_path / "c.pt")["rng"]  # weights_only=True round trip
    restore_rng(loaded, {"augment": generator})
    assert _draws(generator) == expected

    with pytest.raises(CheckpointError, match="other"):
        restore_rng(loaded, {"augment": generator, "other": torch.Generator()})


# ----------------------------------------------------------------------------- resume check


def test_config_fingerprint_ignores_only_the_listed_keys():
    base = {"lr": 0.1, "steps": 100, "device": "cpu", "train": {"log_every": 10, "wd": 5e-4}}
    fp = config_fingerprint(base)
    assert len(fp) == 64
    same = {
        "train": {"wd": 5e-4, "log_every": 1},
        "device": "cuda",
        "lr": 0.1,
        "steps": 9,
        "eval_every": 3,
        "checkpoint_every": 4,
    }
    assert config_fingerprint(same) == fp
    assert config_fingerprint({**base, "lr": 0.2}) != fp
    assert config_fingerprint({**base, "train": {"wd": 0.0}}) != fp
    assert config_fingerprint({**base, "steps": 1}, ignore=()) != fp
    assert config_fingerprint({"a": (1, 2)}) == config_fingerprint({"a": [1, 2]})
    assert config_fingerprint({"p": Path("x")}) == config_fingerprint({"p": "x"})


def test_check_resumable():
    config = {"lr": 0.1, "model": "wrn28_2", "steps": 10}
    fp = config_fingerprint(config)
    ckpt = {"config_fingerprint": fp, "config": config}
    check_resumable(ckpt, config_fingerprint({**config, "steps": 50}), "out/checkpoint.pt")

    new = {**config, "lr": 0.05, "steps": 50}
    with pytest.raises(CheckpointError) as info:
        check_resumable(ckpt, config_fingerprint(new), "out/checkpoint.pt", config=new)
    message = str(info.value)
    assert message.startswith("out/checkpoint.pt was written by a run with a different config")
    assert "lr: 0.1 -> 0.05" in message and "steps" not in message
    assert message.endswith("use a new --out or the same options")
    with pytest.raises(CheckpointError, match=fp[:12]):
        check_resumable(ckpt, config_fingerprint(new), "out/checkpoint.pt")
    with pytest.raises(CheckpointError, match="no configuration fingerprint"):
        check_resumable({}, fp, "out/checkpoint.pt")


def test_save_removes_stale_temporaries_of_both_files(tmp_path: Path):
    """A save killed while writing ``.prev.pt`` leaves ``.checkpoint.prev.pt.*.tmp``: the next
    save removes those too, not only the checkpoint's own."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    (tmp_path / ".checkpoint.pt.x1.tmp").write_bytes(b"half")
    (tmp_path / ".checkpoint.prev.pt.x2.tmp").write_bytes(b"half")
    (tmp_path / ".other.pt.x3.tmp").write_bytes(b"not ours")
    save_checkpoint(path, _state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.pt.x3.tmp",
        "checkpoint.prev.pt",
        "checkpoint.pt",
    ]


def test_a_folder_in_place_of_the_checkpoint(tmp_path: Path):
    """A folder named like the checkpoint is reported as such, not as a corrupt checkpoint."""
    (tmp_path / "checkpoint.pt").mkdir()
    with pytest.raises(CheckpointError, match="is not a file") as info:
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert "corrupt" not in str(info.value)


def test_corrupt_checkpoint_mv_hint_is_quoted_for_the_shell(tmp_path: Path):
    """The suggested ``mv`` command works as pasted when the run folder has a space in it."""
    path = tmp_path / "my run" / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    path.write_bytes(b"junk")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    command = str(info.value).split("to resume from it run: ")[1]
    assert shlex.split(command) == ["mv", str(prev_path(path)), str(path)]


def test_load_checkpoint_honours_map_location(tmp_path: Path):
    """Tensors land where ``map_location`` says (the engine maps a GPU run's checkpoint to CPU)."""
    save_checkpoint(tmp_path / "c.pt", _state(1))
    state = load_checkpoint(tmp_path / "c.pt", map_location="meta")
    assert state["student"]["w"].is_meta


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"config": {"dims": [1, Path("x")]}}, r"\['config'\]\['dims'\]\[1\]"),
        ({"config": (np.int64(3),)}, r"\['config'\]\[0\]"),
        ({"config": {Path("k"): 1}}, r"\['config'\] key \w*Path\('k'\)"),
    ],
    ids=["in-a-list", "in-a-tuple", "a-key"],
)
def test_checkpoint_save_rejects_unplain_values_at_any_depth(tmp_path: Path, bad, where):
    """Lists, tuples and dict keys are checked too: anything that would not load with
    weights_only=True fails at the save, naming where it is, and nothing is written."""
    with pytest.raises(TypeError, match=where):
        save_checkpoint(tmp_path / "c.pt", {**_state(1), **bad})
    assert not (tmp_path / "c.pt").exists()


class _Color(Enum):
    RED = "red"


def test_config_fingerprint_enums_by_value_and_unknown_types_refused():
    """Enums hash as their value; a value with no stable text form (a repr may hold a memory
    address, different in every process) is an error, not a fingerprint that never matches."""
    assert config_fingerprint({"c": _Color.RED}) == config_fingerprint({"c": "red"})
    with pytest.raises(TypeError, match="cannot be fingerprinted"):
        config_fingerprint({"f": object()})


def test_check_resumable_fills_only_options_the_checkpoint_lacks():
    """``defaults`` stand in for options added after the checkpoint was written; the resume goes
    on only if the run uses exactly those defaults, and a saved option is never overridden."""
    old = {"lr": 0.05}
    ckpt = {"config_fingerprint": config_fingerprint(old), "config": old}
    defaults = {"lr": 0.1, "memory_format": "auto"}
    same = {"lr": 0.05, "memory_format": "auto"}
    check_resumable(ckpt, config_fingerprint(same), "c.pt", config=same, defaults=defaults)
    other = {"lr": 0.05, "memory_format": "channels_last"}
    with pytest.raises(CheckpointError, match="memory_format: 'auto' -> 'channels_last'"):
        check_resumable(ckpt, config_fingerprint(other), "c.pt", config=other, defaults=defaults)
    at_default_lr = {"lr": 0.1, "memory_format": "auto"}
    with pytest.raises(CheckpointError, match="lr: 0.05 -> 0.1"):
        check_resumable(
            ckpt, config_fingerprint(at_default_lr), "c.pt", config=at_default_lr, defaults=defaults
        )


def test_check_resumable_lists_at_most_four_differences():
    """A long list of changed options is cut to four, with a count of the rest."""
    old = {f"o{i}": i for i in range(6)}
    new = {f"o{i}": i + 10 for i in range(6)}
    ckpt = {"config_fingerprint": config_fingerprint(old), "config": old}
    with pytest.raises(CheckpointError) as info:
        check_resumable(ckpt, config_fingerprint(new), "c.pt", config=new)
    message = str(info.value)
    assert "o0: 0 -> 10, o1: 1 -> 11, o2: 2 -> 12, o3: 3 -> 13, and 2 more" in message
    assert "o4" not in message


# ----------------------------------------------------------------------------- metrics log


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_metrics_logger_csv_resume_and_tensorboard(tmp_path: Path):
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"loss": 0.5, "acc": 1})
        log.log(2, {"loss": 0.25})
        log.log(3, {"loss": 0.125, "eval/acc": 0.75})
    assert _rows(tmp_path / "metrics.csv") == [
        ["step", "name", "value"],
        ["1", "acc", "1.0"],
        ["1", "loss", "0.5"],
        ["2", "loss", "0.25"],
        ["3", "eval/acc", "0.75"],
        ["3", "loss", "0.125"],
    ]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    # Killed mid-write after step 3; the checkpoint is at step 2.
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("4,loss,0.06")
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=2) as log:
        log.log(3, {"loss": 0.1})
    assert _rows(tmp_path / "metrics.csv")[1:] == [
        ["1", "acc", "1.0"],
        ["1", "loss", "0.5"],
        ["2", "loss", "0.25"],
        ["3", "loss", "0.1"],
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    MetricsLogger(tmp_path, tensorboard=False).close()  # a fresh run starts a fresh log
    assert _rows(tmp_path / "metrics.csv") == [["step", "name", "value"]]


def test_metrics_logger_without_tensorboard_warns_once(tmp_path: Path, monkeypatch):
    import builtins

    from metapl.train import metrics_log

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.setattr(metrics_log, "_tb_warning_given", False)
    with pytest.warns(UserWarning, match="metrics.csv only"):
        first = MetricsLogger(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = MetricsLogger(tmp_path / "b")
    for log in (first, second):
        log.log(1, {"x": 2.0})
        log.close()
    assert _rows(tmp_path / "a" / "metrics.csv")[1] == ["1", "x", "2.0"]
    assert not (tmp_path / "a" / "tb").exists()


# ----------------------------------------------------------------------------- guards


def test_check_finite_and_to_floats():
    metrics = {"b_loss": torch.tensor(1.5), "a_acc": 0.25, "c": torch.tensor(2, dtype=torch.int64)}
    check_once(metrics, step=3)
    floats = to_floats(metrics)
    assert floats == {"b_loss": 1.5, "a_acc": 0.25, "c": 2.0}
    assert list(floats) == list(metrics) and all(type(v) is float for v in floats.values())

    bad = {"z_loss": torch.tensor(math.nan), "teacher_loss": torch.tensor(math.nan), "ok": 1.0}
    with pytest.raises(NonFiniteLossError, match=r"^step 1234: teacher_loss is nan; the run stop"):
        check_once(bad, step=1234)
    with pytest.raises(NonFiniteLossError, match="step 5: a is inf"):
        check_once({"a": math.inf, "b": torch.tensor(1.0)}, step=5)
    with pytest.raises(NonFiniteLossError, match="grads contains -inf"):
        check_once({"grads": torch.tensor([1.0, -math.inf]), "x": torch.tensor(0.0)}, step=1)
    with pytest.raises(ValueError, match="not a scalar"):
        to_floats({"v": torch.ones(2)})
