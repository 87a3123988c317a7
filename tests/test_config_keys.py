"""Config keys that a run would not read: set explicitly, they are one-line errors, not ignored.

Presets set some method keys for every row of a dataset (Table 3's column: the supervised row
carries the teacher's learning rate too), so the check is on the keys a user sets (``--set``, the
command's options), never on the resolved values: every preset still trains as it did.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from metapl.cli import main
from metapl.errors import ConfigError
from metapl.experiments.digits import DigitsConfig
from metapl.experiments.reduced import ReducedConfig
from metapl.train.config import METHODS, TrainConfig, apply_overrides
from metapl.train.presets import load_preset, preset_table


@pytest.mark.parametrize(
    ("preset", "sets", "message"),
    [
        ("digits-supervised", ["teacher_lr=0.1"], "teacher_lr applies to the +MPL methods only"),
        ("digits-uda", ["teacher_dropout=0.3"], "teacher_dropout applies to the +MPL methods"),
        ("digits-randaugment", ["teacher_optimizer=adam"], "teacher_optimizer applies to"),
        ("digits-uda", ["teacher_weight_decay=0.01"], "teacher_weight_decay applies to"),
        ("digits-uda", ["mpl_temperature=0.7"], "mpl_temperature applies to the +MPL methods"),
        ("digits-supervised", ["mpl_weight=2"], "mpl_weight applies to the +MPL methods"),
        ("digits-uda", ["mpl_estimator=first_order"], "mpl_estimator applies to"),
        ("digits-uda", ["mpl_jvp=tape"], "mpl_jvp applies to the +MPL methods"),
        (
            "digits-uda-mpl",
            ["mpl_estimator=first_order", "mpl_jvp=tape"],
            "mpl_jvp applies to mpl_estimator=exact only",
        ),
        ("digits-uda", ["mpl_baseline_decay=0.9"], "mpl_baseline_decay applies to the +MPL"),
        (
            "digits-uda-mpl",
            ["mpl_baseline_decay=0.9"],
            "mpl_baseline_decay applies to mpl_estimator=first_order only; mpl_estimator exact",
        ),
        ("digits-uda-mpl", ["teacher_hidden=64"], "teacher_hidden applies to the reduced teacher"),
        ("digits-supervised", ["uda_factor=2"], "uda_factor applies to the UDA methods only"),
        ("digits-supervised-mpl", ["uda_temperature=1.2"], "uda_temperature applies to the UDA"),
        ("digits-randaugment-mpl", ["uda_threshold=0.5"], "uda_threshold applies to the UDA"),
        ("digits-label-smoothing", ["uda_warmup_steps=10"], "uda_warmup_steps applies to"),
        ("digits-supervised", ["unlabeled_ratio=2"], "unlabeled_ratio applies to the methods with"),
        ("digits-supervised-mpl", ["cutout=2"], "cutout applies to the methods with a strong"),
        ("digits-supervised", ["randaugment_ops=1"], "randaugment_ops applies to the methods"),
        ("digits-label-smoothing", ["randaugment_magnitude=5"], "randaugment_magnitude applies"),
        (
            "digits-uda-mpl",
            ["large_teacher=somewhere"],
            "large_teacher applies to the large-teacher",
        ),
        (
            "digits-uda",
            ["unlabeled_per_class=10"],
            "unlabeled_per_class applies to the large-teacher",
        ),
        ("digits-uda", ["finetune_lr=0.1"], "finetune_lr applies only with finetune_steps > 0"),
        ("digits-uda", ["image_size=16"], "image_size applies to imagenet-*, folder and npz only"),
        (
            "digits-uda",
            ["unlabeled_dir=somewhere"],
            "unlabeled_dir does not apply to dataset digits",
        ),
        ("digits-uda", ["data_dir=somewhere"], "data_dir does not apply to dataset digits"),
        ("digits-uda", ["data_threads=2"], "data_threads applies to image files decoded as"),
        ("digits-uda", ["data_prefetch=false"], "data_prefetch applies to image files decoded"),
        (
            "digits-reduced-supervised",  # RMSprop student, no fine-tuning: no SGD anywhere
            ["momentum=0.5"],
            "momentum applies to the sgd optimizers only",
        ),
    ],
)
def test_train_refuses_a_set_key_the_run_would_ignore(tmp_path, capsys, preset, sets, message):
    out = tmp_path / "run"
    args = ["train", "--preset", preset, "--out", str(out), "--device", "cpu", "--steps", "2"]
    args += ["--set", "warmup_steps=1", "--set", "finetune_steps=0"]  # were it to train
    for item in sets:
        args += ["--set", item]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything is written


def test_data_dir_option_on_digits_is_refused(tmp_path, capsys):
    args = ["train", "--preset", "digits-uda", "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*args, "--data-dir", str(tmp_path)]) == 2
    assert "data_dir does not apply to dataset digits" in capsys.readouterr().err


def test_keys_in_a_preset_file_are_not_checked_as_set_keys_are(tmp_path, capsys):
    """README: keys inside a preset file are not checked this way (a dataset's presets share Table
    3's column). A preset file of your own, or a best.toml, may carry the teacher's learning rate
    for a supervised run, and trains; the same key given with --set is refused."""
    preset = tmp_path / "mine.toml"
    preset.write_text(
        'dataset = "digits"\nmodel = "digits_cnn"\nmethod = "supervised"\nteacher_lr = 0.1\n'
        "uda_factor = 2.0\nimage_size = 8\npad = 1\nflip = false\nwarmup_steps = 1\n"
        "batch_size = 10\n"
    )
    args = ["train", "--preset", str(preset), "--steps", "2", "--device", "cpu", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["teacher_lr"] == 0.1
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "set"), "--set", "teacher_lr=0.2"]) == 2
    assert "teacher_lr applies to the +MPL methods only" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("preset", "key", "value"),
    [
        ("digits-uda-mpl", "teacher_lr", "0.1"),
        ("digits-reduced-reduced-mpl", "teacher_hidden", "64"),
        ("digits-uda", "uda_threshold", "0.5"),
        ("digits-supervised-mpl", "unlabeled_ratio", "2"),
        ("digits-randaugment", "cutout", "2"),
        ("digits-reduced-noisy-student", "unlabeled_per_class", "10"),
        ("digits-uda-mpl", "finetune_lr", "0.1"),  # the preset fine-tunes
        ("digits-reduced-noisy-student", "momentum", "0.5"),  # its fine-tuning is SGD
        ("digits-reduced-supervised", "student_optimizer", "sgd"),
        ("digits-uda-mpl", "mpl_jvp", "forward_ad"),
        ("digits-uda-mpl", "mpl_estimator", "first_order"),
    ],
)
def test_a_set_key_the_run_reads_is_accepted(preset, key, value):
    cfg = apply_overrides(load_preset(preset), {key: value, "large_teacher": "RUN"})
    cfg = dataclasses.replace(cfg, large_teacher="RUN" if cfg.uses_large_teacher else None)
    cfg.validate().check_keys_apply([key])


def test_every_preset_passes_its_own_keys():
    """The presets set keys for rows that do not read them (Table 3's column): never an error,
    since only the keys a user sets are checked."""
    for name in preset_table():
        cfg = load_preset(name)
        if cfg.uses_large_teacher:
            cfg = dataclasses.replace(cfg, large_teacher="RUN")
        cfg.validate()


def test_every_method_reads_the_keys_of_its_own_family():
    for method in METHODS:
        cfg = TrainConfig(method=method, large_teacher="RUN")
        assert cfg.ignored_key("student_lr") is None and cfg.ignored_key("seed") is None
        mpl = method.endswith("_mpl")
        assert (cfg.ignored_key("teacher_lr") is None) == mpl
        assert (cfg.ignored_key("uda_factor") is None) == (method in ("uda", "uda_mpl"))


def test_labels_per_class_on_another_dataset_is_refused():
    cfg = apply_overrides(load_preset("cifar10-4k-uda-mpl"), {"labels_per_class": 40})
    with pytest.raises(ConfigError, match="labels_per_class applies to dataset digits only"):
        cfg.validate()


def test_unlabeled_dir_on_a_split_without_one_is_refused_naming_the_splits_that_take_it():
    """svhn-1k's loader refused it later, naming its own loader options (num_labeled,
    include_extra), which no config key sets."""
    cfg = apply_overrides(load_preset("svhn-1k-uda"), {"unlabeled_dir": "/data/unlabeled"})
    with pytest.raises(
        ConfigError,
        match="^unlabeled_dir applies to cifar10-full, svhn-full, imagenet-full only; svhn-1k "
        "takes its unlabeled images from its own split: do not set it$",
    ):
        cfg.check_keys_apply(["unlabeled_dir"])
    full = apply_overrides(load_preset("svhn-1k-uda"), {"dataset": "svhn-full"})
    assert full.ignored_key("unlabeled_dir") is None


def test_digits_command_refuses_a_key_for_a_method_that_ignores_it():
    with pytest.raises(ConfigError, match="teacher_lr applies to the \\+MPL methods"):
        DigitsConfig(overrides={"uda": {"teacher_lr": "0.1"}}).validate()
    # for every method: an error only when none of the trained methods reads it
    with pytest.raises(ConfigError, match="--set teacher_lr: teacher_lr applies"):
        DigitsConfig(
            methods=("supervised", "uda"), overrides={"*": {"teacher_lr": "0.1"}}
        ).validate()
    DigitsConfig(overrides={"*": {"teacher_lr": "0.1"}}).validate()  # uda_mpl reads it


def test_reduced_command_refuses_a_key_for_a_stage_that_ignores_it():
    with pytest.raises(ConfigError, match="stage supervised: teacher_hidden applies to"):
        ReducedConfig(overrides={"supervised": {"teacher_hidden": "64"}}).validate()
    with pytest.raises(ConfigError, match="--set uda_factor: uda_factor applies"):
        ReducedConfig(overrides={"*": {"uda_factor": "2"}}).validate()
    ReducedConfig(overrides={"*": {"teacher_hidden": "64"}}).validate()  # reduced_mpl reads it
