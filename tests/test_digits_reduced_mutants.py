"""Gaps a mutation audit of `metapl digits` and `metapl reduced` (metapl.experiments.digits and
.reduced) found: which runs and figures each command makes, what its results.json pairs and
summarizes, and how its options reach each run's config. Training is replaced by stand-ins that
return fixed accuracies."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metapl.errors import ConfigError
from metapl.experiments import digits, figure9, figure10, reduced


def _fake_runs(monkeypatch, module, accuracy):
    """``module``'s runs replaced by records of ``accuracy(method, seed)``, in the jobs' order
    (the signature of :func:`metapl.experiments.workers.map_runs`)."""

    def map_runs(pool, run, jobs, desc, show_progress):
        return [{"method": m, "seed": s, "accuracy": accuracy(m, s)} for m, s, *_ in jobs]

    monkeypatch.setattr(module, "map_runs", map_runs)


def _fake_train(monkeypatch, calls, results):
    """The engine's ``train`` (same signature) recording (config, run folder) per call."""
    from metapl.train import engine

    def train(cfg, out_dir, show_progress=True):
        calls.append((cfg, Path(out_dir)))
        return {"results": results}

    monkeypatch.setattr(engine, "train", train)


def _in_worker(fn, *args):
    threads = torch.get_num_threads()
    try:  # a worker's run sets one thread for its process
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def test_digits_pairs_uda_mpl_with_label_spreading_too():
    """The reference row is compared seed by seed like every other method."""
    records = [
        {"method": m, "seed": s, "accuracy": a + 0.01 * s}
        for m, a in (("uda_mpl", 0.9), ("label_spreading", 0.8))
        for s in range(3)
    ]
    paired = digits.paired_differences(records)
    assert set(paired) == {"uda_mpl - label_spreading"}
    assert paired["uda_mpl - label_spreading"]["mean"] == pytest.approx(0.1)


def test_digits_labels_per_class_may_be_100():
    digits.DigitsConfig(labels_per_class=100, methods=("label_spreading",)).validate()
    with pytest.raises(ConfigError, match="between 1 and 100"):
        digits.DigitsConfig(labels_per_class=101, methods=("label_spreading",)).validate()
    with pytest.raises(ConfigError, match=r"label_spreading \(did you mean uda_mpl\?\)$"):
        digits.DigitsConfig(methods=("udampl",)).validate()


def test_digits_set_with_an_empty_method_name_is_refused():
    with pytest.raises(ConfigError, match="expected key=value or METHOD:key=value"):
        digits.parse_method_overrides([":steps=3"])


def test_the_device_option_reaches_every_run():
    """The presets say device=auto: a --device cpu run would otherwise take a GPU."""
    assert digits._method_config("uda", 0, digits.DigitsConfig(device="cpu")).device == "cpu"
    cfg = reduced.ReducedConfig(device="cpu")
    assert reduced._stage_config("supervised", 0, cfg, Path(".")).device == "cpu"


def test_reduced_labels_per_class_reaches_every_stage():
    cfg = reduced.ReducedConfig(labels_per_class=3)
    for stage in reduced.STAGES:
        assert reduced._stage_config(stage, 0, cfg, Path(".")).labels_per_class == 3


def test_reduced_other_datasets_are_refused():
    for dataset in ("svhn", "imagenet", "cifar10"):
        with pytest.raises(ConfigError, match="only digits runs end to end"):
            reduced.ReducedConfig(dataset=dataset).validate()
    for k in (0, 101):
        with pytest.raises(
            ConfigError, match=rf"^--labels-per-class must be between 1 and 100, got {k}$"
        ):
            reduced.ReducedConfig(labels_per_class=k).validate()
    reduced.ReducedConfig(labels_per_class=100).validate()
    with pytest.raises(ConfigError, match=r"reduced_mpl \(did you mean noisy_student\?\)$"):
        reduced.ReducedConfig(students=("noisystudent",)).validate()
    with pytest.raises(ConfigError, match=r"^unknown --dataset 'digit' \(did you mean digits\?\)$"):
        reduced.ReducedConfig(dataset="digit").validate()
    with pytest.raises(
        ConfigError, match=r"choose from large_teacher, .* \(did you mean reduced_mpl\?\)$"
    ):
        reduced.ReducedConfig(overrides={"reducedmpl": {"steps": "3"}}).validate()


def test_each_seeds_students_read_that_seeds_large_teacher(tmp_path):
    cfg = reduced.ReducedConfig(seeds=[3, 4])
    got = reduced._stage_config("noisy_student", 4, cfg, tmp_path).large_teacher
    assert got == str(tmp_path / "large_teacher" / "seed4")


def test_a_reduced_run_trains_its_seed_into_its_folder(monkeypatch, tmp_path):
    calls: list = []
    _fake_train(monkeypatch, calls, [{"accuracy": 0.7, "steps": 5}])
    record = _in_worker(
        reduced._run, ("reduced_mpl", 4, reduced.ReducedConfig(seeds=[3, 4]), str(tmp_path))
    )
    [(cfg, folder)] = calls
    assert cfg.seed == 4 and folder == tmp_path / "reduced_mpl" / "seed4"
    # and the label budget it had, the preset's here (the file's config says null: metapl compare)
    assert record == {
        "method": "reduced_mpl",
        "seed": 4,
        "accuracy": 0.7,
        "steps": 5,
        "labels_per_class": 30,
    }


def test_label_spreading_learns_from_the_labeled_images_only(monkeypatch):
    """The unlabeled images are marked unlabeled (-1), not given a class: on two clusters with one
    labeled image each, every test image is classified by its own cluster's label."""
    from metapl.data import digits as digits_data

    rng = np.random.default_rng(0)

    def images(value, n):  # 8x8 images near one grey level
        return np.clip(value + rng.integers(-5, 6, (n, 8, 8)), 0, 255).astype(np.uint8)

    def digits_split(seed, labels_per_class, tune_per_class=0):
        assert (seed, labels_per_class) == (3, 1)
        return SimpleNamespace(
            x_labeled=np.concatenate([images(20, 1), images(230, 1)]),
            y_labeled=np.array([0, 1]),
            x_unlabeled=np.concatenate([images(20, 20), images(230, 20)]),
            x_test=np.concatenate([images(20, 5), images(230, 5)]),
            y_test=np.array([0] * 5 + [1] * 5),
        )

    monkeypatch.setattr(digits_data, "digits_split", digits_split)
    assert digits.label_spreading_accuracy(3, 1) == 1.0


def test_figure9_and_its_line_only_with_both_of_its_runs(monkeypatch, tmp_path, capsys):
    _fake_runs(monkeypatch, digits, lambda m, s: 0.5)
    figures = []
    monkeypatch.setattr(figure9, "plot_figure9", lambda out, seed, path: figures.append(seed))
    cfg = digits.DigitsConfig(seeds=[0], methods=("uda_mpl",), workers=1)
    digits.run_digits(cfg, tmp_path, show_progress=False)
    assert figures == []
    assert "figure9.png" not in capsys.readouterr().out


def test_figure10_and_its_line_only_with_a_reduced_mpl_student(monkeypatch, tmp_path, capsys):
    _fake_runs(monkeypatch, reduced, lambda m, s: 0.5)
    figures = []
    monkeypatch.setattr(figure10, "plot_figure10", lambda series, path: figures.append(series))
    cfg = reduced.ReducedConfig(seeds=[0], students=("supervised",), workers=1)
    reduced.run_reduced(cfg, tmp_path, show_progress=False)
    assert figures == []
    assert "figure10.png" not in capsys.readouterr().out


def test_a_rerun_with_other_workers_replaces_the_results(monkeypatch, tmp_path, capsys):
    """The number of worker processes does not change the results: not another configuration."""
    _fake_runs(monkeypatch, digits, lambda m, s: 0.5)
    _fake_runs(monkeypatch, reduced, lambda m, s: 0.5)
    monkeypatch.setattr(figure10, "plot_figure10", lambda series, path: None)
    for workers in (1, 2):
        cfg = digits.DigitsConfig(seeds=[0], methods=("label_spreading",), workers=workers)
        digits.run_digits(cfg, tmp_path / "digits", show_progress=False)
        cfg_r = reduced.ReducedConfig(seeds=[0], workers=workers)
        reduced.run_reduced(cfg_r, tmp_path / "reduced", show_progress=False)
        for folder in ("digits", "reduced"):  # the rerun's file, not the first one kept
            written = json.loads((tmp_path / folder / "results.json").read_text())
            assert written["config"]["workers"] == workers, folder
    capsys.readouterr()


def test_label_spreading_alone_minds_no_run_folder(monkeypatch, tmp_path, capsys):
    """LabelSpreading writes no run folder: a file of that name in --out is no obstacle."""
    _fake_runs(monkeypatch, digits, lambda m, s: 0.5)
    (tmp_path / "label_spreading").write_text("keep me")
    cfg = digits.DigitsConfig(seeds=[0], methods=("label_spreading",), workers=1)
    digits.run_digits(cfg, tmp_path, show_progress=False)
    assert (tmp_path / "label_spreading").read_text() == "keep me"
    capsys.readouterr()


def test_a_file_where_a_large_teacher_trains_is_refused_before_any_run(monkeypatch, tmp_path):
    """Checked with the students' folders, before the other seeds' large teachers train."""
    runs: list = []

    def map_runs(pool, run, jobs, desc, show_progress):
        runs.append(desc)
        return []

    monkeypatch.setattr(reduced, "map_runs", map_runs)
    (tmp_path / "large_teacher").write_text("keep me")
    with pytest.raises(ConfigError, match="large_teacher/seed0 is inside"):
        reduced.run_reduced(reduced.ReducedConfig(seeds=[0, 1], workers=1), tmp_path)
    assert runs == []


@pytest.mark.parametrize("command", ["digits", "reduced"])
def test_results_of_an_older_metapl_are_rerun_at_a_new_keys_default(
    monkeypatch, tmp_path, capsys, command
):
    """A results.json written before a config key existed (here the key is dropped from it): the
    same command was refused as "another configuration (KEY=None)". The key counts as its default,
    the old behaviour; another value of it is still another configuration."""
    _fake_runs(monkeypatch, digits, lambda m, s: 0.5)
    _fake_runs(monkeypatch, reduced, lambda m, s: 0.5)
    monkeypatch.setattr(figure10, "plot_figure10", lambda series, path: None)
    if command == "digits":
        run, key, other = digits.run_digits, "labels_per_class", 6

        def config(**changed):
            return digits.DigitsConfig(seeds=[0], methods=("label_spreading",), **changed)
    else:
        run, key, other = reduced.run_reduced, "students", ("supervised",)

        def config(**changed):
            return reduced.ReducedConfig(seeds=[0], **changed)

    run(config(), tmp_path, show_progress=False)
    path = tmp_path / "results.json"
    results = json.loads(path.read_text())
    default = results["config"].pop(key)
    path.write_text(json.dumps(results))
    older = path.read_text()
    with pytest.raises(ConfigError, match=re.escape(f"another configuration ({key}={default})")):
        run(config(**{key: other}), tmp_path, show_progress=False)
    assert path.read_text() == older
    run(config(), tmp_path, show_progress=False)
    assert json.loads(path.read_text())["config"][key] == default
    capsys.readouterr()


def test_a_set_of_steps_without_steps_is_the_runs_length():
    """Only --steps together with --set steps=... is refused (two lengths): without --steps, a
    --set steps is the one length the runs take."""
    digits.DigitsConfig(seeds=[0], overrides={"*": {"steps": "400"}}).validate()
    reduced.ReducedConfig(seeds=[0], overrides={"supervised": {"steps": "400"}}).validate()
    assert (
        reduced._stage_config(
            "supervised",
            0,
            reduced.ReducedConfig(seeds=[0], overrides={"supervised": {"steps": "400"}}),
            Path("."),
        ).steps
        == 400
    )


def test_a_reduced_rerun_says_which_share_of_its_runs_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reduced, "_train_and_report", lambda cfg, out, show_progress: {})
    cfg = reduced.ReducedConfig(seeds=[0, 1], students=("reduced_mpl",))
    reduced.run_reduced(cfg, tmp_path / "rd")
    assert "resuming" not in capsys.readouterr().err  # nothing there yet
    run = tmp_path / "rd" / "large_teacher" / "seed1"
    run.mkdir(parents=True)
    for name in ("checkpoint.pt", "config.json"):  # a `metapl train` run's, stopped
        (run / name).write_bytes(b"{}")
    reduced.run_reduced(cfg, tmp_path / "rd")
    assert capsys.readouterr().err == (
        f"metapl reduced: resuming in {tmp_path / 'rd'}: 1 of its 4 training runs have a "
        "checkpoint there, and continue from it\n"
    )
    reduced.run_reduced(cfg, tmp_path / "rd", show_progress=False)  # --quiet
    assert capsys.readouterr().err == ""
