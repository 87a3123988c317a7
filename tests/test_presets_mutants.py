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
