"""The multi-seed experiments' aggregation on hand-made records and faked runs: what results.json
says (the mean, numpy's default standard deviation, the runs behind each row, the seed-by-seed
pairs and their sign), which run folder and member each record comes from, and what a rerun may
replace."""

from pathlib import Path

import pytest
import torch

from metapl.errors import ConfigError
from metapl.experiments import digits, twomoons
from metapl.experiments.workers import run_record


def test_digits_summary_is_mean_population_std_and_n_of_each_row():
    """ddof=0 as README.md and docs/results.md say; a "_before_finetune" row counts only the runs
    that were fine-tuned, and holds their accuracy before fine-tuning."""
    records = [
        {"method": "uda_mpl", "seed": 0, "accuracy": 0.9, "accuracy_before_finetune": 0.5},
        {"method": "uda_mpl", "seed": 1, "accuracy": 0.7, "accuracy_before_finetune": 0.7},
        {"method": "uda_mpl", "seed": 2, "accuracy": 0.8},
        {"method": "uda", "seed": 0, "accuracy": 0.6},
    ]
    summary = digits.summarize(records)
    assert summary["uda_mpl"]["mean"] == pytest.approx(0.8)
    assert summary["uda_mpl"]["std"] == pytest.approx((0.02 / 3) ** 0.5)
    assert summary["uda_mpl"]["n"] == 3
    assert summary["uda_mpl_before_finetune"] == pytest.approx({"mean": 0.6, "std": 0.1, "n": 2})
    assert summary["uda"] == {"mean": 0.6, "std": 0.0, "n": 1}


def test_twomoons_summary_is_mean_population_std_and_n():
    records = [{"method": "mpl", "seed": s, "accuracy": a} for s, a in enumerate((0.8, 1.0))]
    assert twomoons.summarize(records) == {"mpl": (pytest.approx(0.9), pytest.approx(0.1), 2)}


def test_run_record_keeps_the_steps_and_the_accuracy_before_finetuning():
    record = {"accuracy": 0.9, "steps": 10, "accuracy_before_finetune": 0.8, "finetune_steps": 2}
    assert run_record(record, "uda_mpl", 3) == {
        "method": "uda_mpl",
        "seed": 3,
        "accuracy": 0.9,
        "steps": 10,
        "accuracy_before_finetune": 0.8,
        "finetune_steps": 2,
    }


def test_twomoons_records_are_each_seeds_own():
    """Seed i's record is member i's accuracy; the cosines are a row per seed, a column per
    measured step."""
    cfg = twomoons.TwoMoonsConfig(
        seeds=[4, 5, 6], steps=4, cosine_every=2, methods=("supervised",), hidden=8
    )
    result = twomoons.run(cfg)
    acc = twomoons.accuracy(result["models"]["supervised"], result["data"].x, result["data"].y)
    assert len(set(acc.tolist())) == 3  # the check below tells the members apart
    got = {r["seed"]: r["accuracy"] for r in result["records"] if r["method"] == "supervised"}
    assert got == {seed: float(acc[i]) for i, seed in enumerate(cfg.seeds)}
    assert result["cosines"]["supervised"].shape == (3, 2)


def _fake_runs(monkeypatch, module, accuracy):
    """``module``'s runs replaced by records of ``accuracy(method, seed)``, in the jobs' order."""

    def map_runs(pool, run, jobs, desc, show_progress):
        return [{"method": m, "seed": s, "accuracy": accuracy(m, s)} for m, s, *_ in jobs]

    monkeypatch.setattr(module, "map_runs", map_runs)


def test_digits_results_are_sorted_and_paired_seed_by_seed(tmp_path, monkeypatch, capsys):
    """Whatever order the workers finish in: records by method then seed, each +MPL row minus its
    baseline (not the other way round), Figure 9 from the first seed."""
    from metapl.experiments import figure9

    _fake_runs(monkeypatch, digits, lambda m, s: 0.5 + 0.1 * (m == "uda_mpl") + 0.01 * s)
    figures = []
    monkeypatch.setattr(figure9, "plot_figure9", lambda out, seed, path: figures.append(seed))
    cfg = digits.DigitsConfig(seeds=[3, 1], methods=("uda_mpl", "uda", "supervised"), workers=1)
    payload = digits.run_digits(cfg, tmp_path, show_progress=False)
    order = [(r["method"], r["seed"]) for r in payload["results"]]
    assert order == [(m, s) for m in ("supervised", "uda", "uda_mpl") for s in (1, 3)]
    assert payload["paired"]["uda_mpl - uda"]["mean"] == pytest.approx(0.1)
    assert payload["paired"]["uda_mpl - uda"]["wins_ties_losses"] == [2, 0, 0]
    assert figures == [3]
    capsys.readouterr()


def test_digits_notes_the_first_order_estimator_at_a_weight_not_set(tmp_path, monkeypatch, capsys):
    """As `metapl train` does (once for the +MPL rows that share the note); a weight set for the
    method, or for every method, silences it."""
    _fake_runs(monkeypatch, digits, lambda m, s: 0.5)
    first_order = {"mpl_estimator": "first_order"}
    methods = ("uda_mpl", "supervised_mpl", "uda")
    cfg = digits.DigitsConfig(seeds=[0], methods=methods, workers=1, overrides={"*": first_order})
    digits.run_digits(cfg, tmp_path / "a", show_progress=False)
    err = capsys.readouterr().err
    line = "metapl digits: note: mpl_estimator=first_order sums its REINFORCE term over the 200 "
    assert err.count(line) == 1, err
    silent = (
        {"uda_mpl": {**first_order, "mpl_weight": "0.005"}},
        {"*": {**first_order, "mpl_weight": "0.005"}},
        {"uda_mpl": {"mpl_estimator": "exact"}},
    )
    for i, overrides in enumerate(silent):
        cfg = digits.DigitsConfig(seeds=[0], methods=("uda_mpl",), workers=1, overrides=overrides)
        digits.run_digits(cfg, tmp_path / str(i), show_progress=False)
        assert "note" not in capsys.readouterr().err


def test_reduced_notes_the_first_order_estimator_at_a_weight_not_set(tmp_path, monkeypatch, capsys):
    """As `metapl train` does, for the ReducedMPL student (the one stage with an MPL step)."""
    from metapl.experiments import figure10, reduced

    _fake_runs(monkeypatch, reduced, lambda m, s: 0.5)
    monkeypatch.setattr(figure10, "plot_figure10", lambda series, path: None)
    first_order = {"mpl_estimator": "first_order"}
    cfg = reduced.ReducedConfig(seeds=[0], workers=1, overrides={"reduced_mpl": first_order})
    reduced.run_reduced(cfg, tmp_path / "a", show_progress=False)
    line = "metapl reduced: note: mpl_estimator=first_order sums its REINFORCE term over the 192 "
    assert capsys.readouterr().err.count(line) == 1
    for i, overrides in enumerate(({"*": {**first_order, "mpl_weight": "0.005"}}, {})):
        cfg = reduced.ReducedConfig(seeds=[0], workers=1, overrides=overrides)
        reduced.run_reduced(cfg, tmp_path / str(i), show_progress=False)
        assert "note" not in capsys.readouterr().err


def test_reduced_results_are_paired_as_reduced_mpl_minus_the_others(tmp_path, monkeypatch, capsys):
    from metapl.experiments import figure10, reduced

    _fake_runs(monkeypatch, reduced, lambda m, s: 0.5 + 0.1 * (m == "reduced_mpl") + 0.01 * s)
    figures = []
    monkeypatch.setattr(figure10, "plot_figure10", lambda series, path: figures.append(series))
    cfg = reduced.ReducedConfig(seeds=[2, 0], workers=1)
    payload = reduced.run_reduced(cfg, tmp_path, show_progress=False)
    assert set(payload["paired"]) == {"reduced_mpl - noisy_student", "reduced_mpl - supervised"}
    for p in payload["paired"].values():
        assert p["mean"] == pytest.approx(0.1) and p["wins_ties_losses"] == [2, 0, 0]
    assert figures == [tmp_path / "reduced_mpl" / "seed2" / "figure10.json"]
    order = [(r["method"], r["seed"]) for r in payload["results"]]
    assert order == [(m, s) for m in reduced.STAGES for s in (0, 2)]
    # a rerun with fewer students would replace these results: refused
    with pytest.raises(ConfigError, match="another configuration"):
        reduced.run_reduced(
            reduced.ReducedConfig(seeds=[2, 0], workers=1, students=("supervised",)), tmp_path
        )
    capsys.readouterr()


def test_label_spreading_row_is_on_each_seeds_split(monkeypatch, tmp_path):
    monkeypatch.setattr(digits, "label_spreading_accuracy", lambda seed, k: seed + k / 100)
    threads = torch.get_num_threads()
    try:  # a worker's run sets one thread for its process
        record = digits._train_one(("label_spreading", 7, digits.DigitsConfig(), str(tmp_path)))
    finally:
        torch.set_num_threads(threads)
    assert record == {"method": "label_spreading", "seed": 7, "accuracy": 7.05}


def test_short_runs_fine_tune_for_the_presets_share_of_the_steps():
    """--steps 20 on presets that fine-tune 300 after 1,500 steps: 4 fine-tuning steps."""
    from metapl.experiments import reduced

    assert digits._method_config("uda_mpl", 0, digits.DigitsConfig(steps=20)).finetune_steps == 4
    cfg = reduced.ReducedConfig(steps=20)
    assert reduced._stage_config("reduced_mpl", 0, cfg, Path(".")).finetune_steps == 4


def test_a_digits_run_records_its_folder_split_and_teacher(monkeypatch, tmp_path):
    """The run trains into METHOD/seedN (what a rerun resumes from); its record holds the MPL
    teacher's accuracy apart from the student's."""
    from metapl.train import engine

    folders = []

    def train(cfg, out, show_progress):
        folders.append((out, cfg.seed, cfg.labels_per_class))
        return {"results": [{"accuracy": 0.9, "steps": 5, "teacher_test_accuracy": 0.4}]}

    monkeypatch.setattr(engine, "train", train)
    threads = torch.get_num_threads()
    try:
        cfg = digits.DigitsConfig(labels_per_class=3)
        record = digits._train_one(("uda_mpl", 7, cfg, str(tmp_path)))
    finally:
        torch.set_num_threads(threads)
    assert folders == [(tmp_path / "uda_mpl" / "seed7", 7, 3)]
    assert record["accuracy"] == 0.9 and record["teacher_accuracy"] == 0.4
    assert record["labels_per_class"] == 3


def test_a_stages_own_set_wins_over_every_stages():
    from metapl.experiments import reduced

    overrides = {"*": {"teacher_lr": "0.1"}, "reduced_mpl": {"teacher_lr": "0.2"}}
    cfg = reduced.ReducedConfig(overrides=overrides)
    assert reduced._stage_config("reduced_mpl", 0, cfg, Path(".")).teacher_lr == 0.2
    cfg = digits.DigitsConfig(overrides={"*": overrides["*"], "uda_mpl": overrides["reduced_mpl"]})
    assert digits._method_config("uda_mpl", 0, cfg).teacher_lr == 0.2
    # whatever the order on the command line (--help: "a METHOD: key beats a plain one, else the
    # last of a key wins")
    items = ["uda_mpl:teacher_lr=0.2", "teacher_lr=0.3", "teacher_lr=0.1"]
    cfg = digits.DigitsConfig(overrides=digits.parse_method_overrides(items))
    assert digits._method_config("uda_mpl", 0, cfg).teacher_lr == 0.2
    assert digits._method_config("uda", 0, cfg).teacher_lr == 0.1


def test_twomoons_results_file_averages_the_cosines_over_seeds(monkeypatch, tmp_path):
    import json

    from metapl.experiments import twomoons_plots

    monkeypatch.setattr(twomoons_plots, "plot_decision_regions", lambda *a: None)
    monkeypatch.setattr(twomoons_plots, "plot_gradient_cosine", lambda *a: None)
    cfg = twomoons.TwoMoonsConfig(seeds=[0, 1, 2], steps=4, cosine_every=2)
    cosines = torch.tensor([[0.1, 0.4], [0.2, 0.5], [0.3, 0.9]], dtype=torch.float64)
    records = [{"method": "mpl", "seed": s, "accuracy": a} for s, a in enumerate((0.7, 0.8, 0.9))]
    twomoons.save({"records": records, "cosines": {"mpl": cosines}}, cfg, tmp_path)
    payload = json.loads((tmp_path / "results.json").read_text())
    cos = payload["grad_cosine"]["mpl"]
    assert cos["steps"] == [0, 2] and cos["mean"] == pytest.approx([0.2, 0.6])
    assert cos["per_seed"] == cosines.tolist()
    assert payload["summary"]["mpl"] == pytest.approx(
        {"mean": 0.8, "std": (0.02 / 3) ** 0.5, "n": 3}
    )


def test_figure9_plots_each_series_from_its_own_run_and_metric(monkeypatch, tmp_path):
    from metapl.experiments import figure9

    value = {
        ("supervised", "student_labeled_accuracy"): 0.1,
        ("uda_mpl", "teacher_labeled_accuracy"): 0.2,
        ("uda_mpl", "student_labeled_accuracy"): 0.3,
    }

    def read_metrics(run_dir):
        assert run_dir.name == "seed2"
        metrics = ("student_labeled_accuracy", "teacher_labeled_accuracy")
        return {m: ([1], [value.get((run_dir.parent.name, m), 0.9)]) for m in metrics}

    monkeypatch.setattr(figure9, "read_metrics", read_metrics)
    series = figure9.plot_figure9(tmp_path, 2, tmp_path / "figure9.png")
    got = {label: s["accuracy"] for label, s in series.items()}
    assert got == {"Supervised": [0.1], "MPL teacher": [0.2], "MPL student": [0.3]}


def test_twomoons_hard_pseudo_labels_are_the_hard_ones(monkeypatch):
    calls = []

    def train_pseudo_label(cfg, data, teacher, soft, gen, tick):
        calls.append(soft)
        return teacher

    monkeypatch.setattr(twomoons, "train_pseudo_label", train_pseudo_label)
    methods = ("supervised", "pseudo_label_hard")
    twomoons.run(twomoons.TwoMoonsConfig(seeds=[0], steps=1, hidden=4, methods=methods))
    assert calls == [False]


@pytest.mark.parametrize("command", ["digits", "reduced"])
def test_a_run_folder_refused_is_one_line_without_the_first_order_note(tmp_path, capsys, command):
    """The note was printed before the run folders were checked: a file where a run's folder goes
    gave the note and the error."""
    from metapl.cli import main

    method = "uda_mpl" if command == "digits" else "reduced_mpl"
    (tmp_path / method).mkdir()
    (tmp_path / method / "seed0").write_text("in the way")
    args = [command, "--seeds", "0", "--steps", "2", "--methods", method, "--quiet"]
    args += ["--set", f"{method}:mpl_estimator=first_order", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and "note" not in err, err
