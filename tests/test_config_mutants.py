"""TrainConfig.validate, value coercion of presets and --set, and the --steps warm-up cut: each
rule on its own (the CLI tests reach only a few of them through whole commands)."""

from __future__ import annotations

import math

import pytest
import torch

from metapl.errors import ConfigError
from metapl.train.config import (
    TrainConfig,
    apply_overrides,
    first_order_note,
    joined_notes,
    parse_set_options,
    uda_warmup_note,
    warmup_cut_to,
)


def _cfg(**overrides) -> TrainConfig:
    return apply_overrides(TrainConfig(), {"steps": 100, "warmup_steps": 10, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"student_dropout": -0.1}, "student_dropout must be in [0, 1)"),
        ({"ema_decay": 1.0}, "ema_decay must be in [0, 1)"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"unlabeled_ratio": 0}, "unlabeled_ratio must be >= 1"),
        ({"warmup_steps": -1}, "warm-up steps must be >= 0"),
        ({"uda_warmup_steps": -1}, "warm-up steps must be >= 0"),
        ({"finetune_lr": 0.0}, "finetune_lr > 0"),
        ({"finetune_lr": math.nan}, "finetune_lr > 0"),
        ({"finetune_steps": -1}, "finetune_steps must be >= 0"),
        ({"tune_per_class": 2}, "only digits reads it"),  # the default dataset is cifar10-4k
        ({"mpl_estimator": "second_order"}, "mpl_estimator must be exact"),
        ({"mpl_baseline_decay": 1.0}, "mpl_baseline_decay must be < 1"),
        ({"mpl_baseline_decay": math.nan}, "mpl_baseline_decay must be < 1"),
        ({"student_optimizer": "adagrad"}, "student_optimizer must be one of"),
        ({"teacher_optimizer": "lamb"}, "teacher_optimizer must be one of"),
        ({"method": "reduced_mpl"}, "learns from a large teacher"),
        ({"device": "tpu"}, "device must be auto, cpu or cuda"),
        ({"device": "gpu"}, "got 'gpu' (did you mean cuda?)"),
        ({"precision": "fp16"}, "precision must be fp32 or bf16"),
        ({"dataset": "mnist"}, "dataset 'mnist' is not one of"),
        ({"mpl_weight": math.nan}, "mpl_weight must be >= 0"),
        # a negative temperature inverts the targets silently; 0 gives NaN losses later
        ({"uda_temperature": -0.8}, "uda_temperature must be > 0"),
        ({"mpl_temperature": 0.0}, "mpl_temperature must be > 0"),
        ({"student_lr": 0.0}, "student_lr must be > 0"),
        ({"teacher_lr": math.nan}, "teacher_lr must be > 0"),
        ({"uda_factor": -1.0}, "uda_factor must be >= 0"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ({"uda_threshold": 1.5}, "uda_threshold must be in [0, 1]"),  # would mask everything
        ({"uda_threshold": -0.1}, "uda_threshold must be in [0, 1]"),
        ({"warmup_steps": 101}, "must not exceed steps"),
        ({"seed": 2**32}, "seed must be in 0..4294967295"),
        # sizes of a typo (1e15): out-of-memory tracebacks once the data was read, or a kill
        ({"batch_size": 2**20 + 1}, "batch_size must be at most 1,048,576, got 1,048,577"),
        ({"unlabeled_ratio": 2**20}, "the unlabeled batch (batch_size x unlabeled_ratio = 128 x"),
        ({"image_size": 4097}, "image_size must be at most 4,096"),
        ({"teacher_hidden": 10**15}, "teacher_hidden must be at most 8,192"),
        # beyond float32: a RuntimeError traceback inside the optimizer's first step
        ({"student_lr": 1e300}, "student_lr must be at most 3.403e+38 in size (float32's"),
        ({"weight_decay": 1e39}, "weight_decay must be at most 3.403e+38 in size"),
        ({"finetune_lr": 3.5e38}, "finetune_lr must be at most 3.403e+38 in size"),
    ],
)
def test_validate_rejects(overrides, message):
    with pytest.raises(ConfigError) as info:
        _cfg(**overrides).validate()
    assert message in str(info.value)


def test_validate_accepts_the_boundaries():
    _cfg(warmup_steps=100, student_dropout=0.0, finetune_steps=0).validate()
    _cfg(dataset="digits", tune_per_class=2).validate()
    _cfg(method="reduced_mpl", large_teacher="runs/big").validate()
    _cfg(uda_threshold=0.0, uda_factor=0.0, weight_decay=0.0).validate()
    _cfg(uda_threshold=1.0, method="uda_mpl", student_labeled_weight=1.0).validate()
    # numpy's and scikit-learn's largest seed is a seed (a bound off by one went unseen)
    _cfg(seed=0).validate()
    _cfg(seed=2**32 - 1).validate()
    _cfg(batch_size=2**20, unlabeled_ratio=1, image_size=4096, teacher_hidden=8192).validate()
    _cfg(method="supervised", batch_size=2**20, unlabeled_ratio=7).validate()  # reads no ratio
    _cfg(student_lr=3.4e38).validate()


def test_values_are_coerced_to_the_field_types():
    cfg = apply_overrides(TrainConfig(), {"steps": "1e3", "student_lr": 1, "batch_size": 64.0})
    assert cfg.steps == 1000 and type(cfg.steps) is int
    assert cfg.student_lr == 1.0 and type(cfg.student_lr) is float
    assert cfg.batch_size == 64 and type(cfg.batch_size) is int
    for text, value in [("yes", True), ("on", True), ("1", True), ("off", False), ("no", False)]:
        assert apply_overrides(TrainConfig(), {"flip": text}).flip is value
    bad_values = (
        {"batch_size": 64.5},
        {"student_lr": True},
        {"steps": True},  # a preset's `steps = true` trained 1 step, saved as "steps": true
        {"seed": False},
        {"flip": "maybe"},
        {"steps": "2.5e0"},  # was cut to 2 without a word
        {"steps": "1e400"},  # was OverflowError
        {"steps": "-inf"},
    )
    for bad in bad_values:
        with pytest.raises(ConfigError):
            apply_overrides(TrainConfig(), bad)


def test_set_options_split_at_the_first_equals_sign():
    assert parse_set_options([" data_dir =/a=b", "steps=5"]) == {"data_dir": "/a=b", "steps": "5"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set_options(["steps"])


def test_steps_cut_the_warmup_only_when_shorter(capsys):
    preset = _cfg(warmup_steps=50)
    assert warmup_cut_to(50, preset, {}, "train") == ({}, None)
    cut, note = warmup_cut_to(20, preset, {}, "train")
    assert cut == {"warmup_steps": 20} and "lowered from 50 to 20" in note
    assert warmup_cut_to(20, preset, {"warmup_steps": "30"}, "train") == ({}, None)  # the user's
    assert capsys.readouterr().err == ""  # the command prints the note once its inputs are checked


def test_the_first_order_estimator_at_a_weight_the_user_did_not_choose_is_noted():
    """Its REINFORCE term sums over the unlabeled batch (here 16 x 7 = 112 images): at the
    presets' mpl_weight that wrecked digits UDA+MPL's teacher. A weight the user set, the exact
    estimator or a method without MPL: no note."""
    cfg = _cfg(method="uda_mpl", mpl_estimator="first_order", batch_size=16, unlabeled_ratio=7)
    note = first_order_note(cfg, "train", ["mpl_estimator"])
    assert note == (
        "metapl train: note: mpl_estimator=first_order sums its REINFORCE term over the 112 "
        "unlabeled images of a batch; at mpl_weight=1 that wrecked the teacher of digits UDA+MPL "
        "(docs/results.md); --set mpl_weight=0.00893 makes it a batch mean, as public "
        "implementations have it, and mpl_baseline_decay=0.99 subtracts a baseline"
    )
    assert first_order_note(cfg, "train", ["mpl_estimator", "mpl_weight"]) is None
    # a weight a preset file chose: the note's "at mpl_weight=1" would not be true
    chosen = _cfg(method="uda_mpl", mpl_estimator="first_order", mpl_weight=0.005)
    assert first_order_note(chosen, "train", ["mpl_estimator"]) is None
    assert first_order_note(_cfg(method="uda_mpl"), "train", []) is None
    assert first_order_note(_cfg(method="uda", mpl_estimator="first_order"), "train", []) is None


def test_a_uda_ramp_longer_than_the_run_is_noted_not_cut():
    """The UDA factor ramps linearly; at the last step (index steps - 1) it is steps / warm-up."""
    cfg = _cfg(method="uda_mpl", steps=300, warmup_steps=10, uda_warmup_steps=5000)
    note = uda_warmup_note(cfg, "train")
    assert note == (
        "metapl train: note: uda_warmup_steps 5000 is longer than the run's 300 steps: the UDA "
        "factor reaches 6% of uda_factor; --set uda_warmup_steps=N to shorten the ramp"
    )
    assert uda_warmup_note(_cfg(method="uda", steps=300, uda_warmup_steps=300), "t") is None
    assert uda_warmup_note(_cfg(method="mpl", steps=3, uda_warmup_steps=5000), "t") is None
    assert "tune: note: uda_warmup_steps 4 is longer than the run's 3 steps" in uda_warmup_note(
        _cfg(method="uda", steps=3, warmup_steps=3, uda_warmup_steps=4), "tune"
    )


def test_joined_notes_keep_the_given_ones_in_order():
    assert joined_notes(None, None) is None
    assert joined_notes("a", None, "b") == "a\nb"
    assert joined_notes(None, "b") == "b"


def test_memory_format_auto_is_channels_last_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not TrainConfig(memory_format="auto").channels_last(cpu)
    assert TrainConfig(memory_format="auto").channels_last(cuda)
    assert TrainConfig(memory_format="channels_last").channels_last(cpu)
    assert not TrainConfig(memory_format="contiguous").channels_last(cuda)
