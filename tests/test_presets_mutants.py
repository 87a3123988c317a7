"""Presets (metapl.train.presets) where a wrong change still passed the other tests: which of a
dataset file's values win, the rows a new dataset file offers, and preset files by path."""

from __future__ import annotations

import pytest

from metapl.errors import ConfigError
from metapl.train import presets
from metapl.train.presets import TABLE1, load_preset, preset_table


def test_a_rows_own_table_overrides_the_rows_method():
    """[methods.large-teacher] says method = "randaugment": the large teacher trains with
    RandAugment, although the row's default method is supervised."""
    table = preset_table()
    for dataset in ("cifar10-full", "svhn-full", "imagenet-full", "digits-reduced"):
        assert table[f"{dataset}-large-teacher"]["method"] == "randaugment"
        assert table[f"{dataset}-supervised"]["method"] == "supervised"
    assert load_preset("digits-reduced-large-teacher").method == "randaugment"


def test_a_new_dataset_file_offers_table1_and_keeps_its_label_smoothing(monkeypatch):
    """A file FAMILIES does not know offers Table 1's rows; label smoothing takes 0.1 only where
    the file says 0."""
    files = {"mine": {"dataset": "digits", "label_smoothing": 0.2}, "zero": {"dataset": "digits"}}
    monkeypatch.setattr(presets, "_dataset_files", lambda: files)
    table = preset_table()
    assert sorted(table) == sorted(f"{d}-{m}" for d in files for m in TABLE1)
    assert table["mine-label-smoothing"]["label_smoothing"] == 0.2
    assert table["zero-label-smoothing"]["label_smoothing"] == 0.1


def test_a_preset_file_by_path_with_any_suffix(tmp_path):
    preset = tmp_path / "best.cfg"
    preset.write_text('dataset = "digits"\nmodel = "digits_cnn"\nstudent_lr = 0.02\n')
    cfg = load_preset(str(preset))
    assert (cfg.student_lr, cfg.preset) == (0.02, str(preset))


def test_a_preset_file_that_is_not_utf8_is_one_config_error(tmp_path):
    preset = tmp_path / "latin1.toml"
    preset.write_bytes('model = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=f"preset file {preset} is not valid TOML"):
        load_preset(str(preset))


def test_which_presets_fine_tune_and_which_students_learn_the_labels():
    """README: `finetune_steps` is 300 in digits' MPL and NoisyStudent presets (and 0 in every
    other preset); the digits ReducedMPL student learns the labels in its own step
    (student_labeled_weight 1), while the CIFAR-10, SVHN and ImageNet ones do not (0), as MPL's
    student in Section 4.1."""
    fine_tuned = {
        "digits-supervised-mpl",
        "digits-randaugment-mpl",
        "digits-uda-mpl",
        "digits-reduced-noisy-student",
        "digits-reduced-reduced-mpl",
    }
    for name in preset_table():
        steps = load_preset(name).finetune_steps
        assert steps == (300 if name in fine_tuned else 0), name
    assert load_preset("digits-reduced-reduced-mpl").student_labeled_weight == 1.0
    for dataset in ("cifar10-full", "svhn-full", "imagenet-full"):
        assert load_preset(f"{dataset}-reduced-mpl").student_labeled_weight == 0.0


def test_imagenets_label_smoothing_row_is_its_supervised_run():
    """README: Table 3's ImageNet column smooths every row's labels by 0.1, so the label-smoothing
    row is the supervised row under another name (and both smooth by 0.1)."""
    table = preset_table()
    smoothing, supervised = (
        table["imagenet-10pct-label-smoothing"],
        table["imagenet-10pct-supervised"],
    )
    assert smoothing["label_smoothing"] == supervised["label_smoothing"] == 0.1
    assert {k: v for k, v in smoothing.items() if k != "method"} == {
        k: v for k, v in supervised.items() if k != "method"
    }


def test_the_folder_preset_is_cifar10s_column_scaled_as_docs_own_data_says():
    """docs/own-data.md's table of the folder-* presets: kept values, and those scaled to about
    1,000 labeled images (batch x 32/128, learning rates with it, steps and warm-ups / 20)."""
    cfg = load_preset("folder-uda-mpl")
    kept = ("student_dropout", "teacher_dropout", "weight_decay", "uda_factor", "uda_temperature")
    kept += ("unlabeled_ratio", "pad", "cutout", "image_size", "model", "uda_threshold")
    cifar = load_preset("cifar10-4k-uda-mpl")
    assert {k: getattr(cfg, k) for k in kept} == {k: getattr(cifar, k) for k in kept}
    assert (cfg.model, cfg.image_size, cfg.pad, cfg.cutout) == ("wrn28_2", 32, 4, 16)
    assert (cfg.batch_size, cfg.student_lr, cfg.teacher_lr) == (32, 0.075, 0.03125)
    assert (cfg.steps, cfg.warmup_steps, cfg.uda_warmup_steps) == (50_000, 100, 250)
    assert (cfg.eval_every, cfg.checkpoint_every) == (1_000, 1_000)
    assert cifar.uda_warmup_steps == 5_000  # README: UDA's warm-up, our choice
    assert load_preset("digits-uda-mpl").uda_warmup_steps == 200  # and digits' own
