"""Training utilities: LR schedule, EMA, atomic checkpoints, RNG capture, metrics log, NaN guards."""

from __future__ import annotations

import csv
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
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
from metapl.train.guards import check_finite, to_floats
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
    with pytest.raises(ConfigError):
        warmup_cosine(0, 10, 11)
    with pytest.raises(ConfigError):
        warmup_cosine(0, 0, 0)


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
        Path(f).write_bytes(b"half a checkpoint")  # garbage in the temporary file, then the "kill"
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
    check_finite(metrics, step=3)
    floats = to_floats(metrics)
    assert floats == {"b_loss": 1.5, "a_acc": 0.25, "c": 2.0}
    assert list(floats) == list(metrics) and all(type(v) is float for v in floats.values())

    bad = {"z_loss": torch.tensor(math.nan), "teacher_loss": torch.tensor(math.nan), "ok": 1.0}
    with pytest.raises(NonFiniteLossError, match=r"^step 1234: teacher_loss is nan; the run stop"):
        check_finite(bad, step=1234)
    with pytest.raises(NonFiniteLossError, match="step 5: a is inf"):
        check_finite({"a": math.inf, "b": torch.tensor(1.0)}, step=5)
    with pytest.raises(NonFiniteLossError, match="grads contains -inf"):
        check_finite({"grads": torch.tensor([1.0, -math.inf]), "x": torch.tensor(0.0)}, step=1)
    with pytest.raises(ValueError, match="not a scalar"):
        to_floats({"v": torch.ones(2)})
