"""`metapl compare`: groups of records over seeds, their mean ± std, paired differences against a
baseline, and one-line errors for what it cannot read. Most cases write small results.json files in
the formats the commands write; one reads a real `metapl train` run, so that a change in what a run
records breaks this file too."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_train_cli import one_error_line

from metapl.cli import main
from metapl.report import format_seeds

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TRAIN_CONFIG = {
    "preset": "digits-uda-mpl",
    "method": "uda_mpl",
    "dataset": "digits",
    "labels_per_class": 5,
    "tune_per_class": 0,
    "tuning": False,
    "steps": 100,
    "mpl_weight": 1.0,
    "data_dir": None,
    "device": "cpu",
    "eval_every": 50,
    "seed": 0,
}


def train_run(folder: Path, seed: int, accuracy: float | None, **config) -> Path:
    """A finished `metapl train` run's results.json (the parts compare reads), as engine writes it:
    the record's dataset is the split's name, which holds the seed."""
    cfg = {**TRAIN_CONFIG, **config, "seed": seed}
    record = {
        "method": cfg["method"],
        "seed": seed,
        "dataset": f"{cfg['dataset']}-5pc-seed{seed}",
        "accuracy": accuracy,
        "tune_accuracy": 0.5,
        "student_labeled_accuracy": 1.0,
    }
    folder.mkdir(parents=True)
    payload = {"command": "train", "config": cfg, "results": [record], "seconds_this_session": 1.0}
    (folder / "results.json").write_text(json.dumps(payload))
    return folder


def experiment(folder: Path, accuracies: dict[str, list[float]], noise: float = 0.1) -> Path:
    """A `metapl twomoons` results.json: several methods' records over seeds 0..n-1."""
    records = [
        {"method": m, "seed": s, "accuracy": a, "noise": noise}
        for m, accs in accuracies.items()
        for s, a in enumerate(accs)
    ]
    n = len(next(iter(accuracies.values())))
    config = {"seeds": list(range(n)), "noise": noise, "steps": 50, "methods": list(accuracies)}
    folder.mkdir(parents=True)
    payload = {"command": "twomoons", "config": config, "results": records, "summary": {}}
    (folder / "results.json").write_text(json.dumps(payload))
    return folder


def compare(capsys, *argv) -> tuple[int, str, str]:
    code = main(["compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def command_run(folder: Path, command: str, config: dict, methods, seeds) -> Path:
    """A `metapl digits`/`reduced` results.json: ``methods`` x ``seeds`` records of 0.9."""
    records = [{"method": m, "seed": s, "accuracy": 0.9} for m in methods for s in seeds]
    folder.mkdir()
    payload = {"command": command, "config": config, "results": records}
    (folder / "results.json").write_text(json.dumps(payload))
    return folder


def group_seeds(capsys, tmp_path: Path, folders) -> dict:
    """`metapl compare` of ``folders``: each group's name -> its seeds."""
    code, out, err = compare(capsys, *folders, "--json", tmp_path / "c.json")
    assert code == 0, err
    return {g["name"]: g["seeds"] for g in json.loads((tmp_path / "c.json").read_text())["groups"]}


def test_runs_of_one_configuration_are_one_group_with_mean_std_and_a_paired_difference(
    tmp_path, capsys
):
    """Seeds in separate folders form one group, also where they differ in what does not change a
    result (the data's folder, the device, how often they evaluate); the paired difference is the
    mean of the per-seed differences, with their sample s.e. and wins/ties/losses."""
    base = {0: 0.80, 1: 0.90, 2: 0.70}
    other = {0: 0.85, 1: 0.90, 2: 0.60}
    runs = [
        train_run(tmp_path / f"uda{s}", s, a, preset="digits-uda", method="uda", device=d)
        for (s, a), d in zip(base.items(), ("cpu", "cuda", "auto"))
    ]
    runs += [
        train_run(tmp_path / f"mpl{s}", s, a, data_dir=f"/data{s}", eval_every=10 * (s + 1))
        for s, a in other.items()
    ]
    code, out, err = compare(capsys, *runs, "--json", tmp_path / "c.json")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "accuracy, mean +- std over seeds:"
    assert lines[1].split() == ["digits-uda", "80.00", "+-", "8.16", "%", "(n=3,", "seeds", "0-2)"]
    assert lines[2].split()[:4] == ["digits-uda-mpl", "78.33", "+-", "13.12"]
    assert lines[3] == "paired differences against digits-uda, seed by seed:"
    d = np.array([other[s] - base[s] for s in range(3)])
    se = d.std(ddof=1) / math.sqrt(3)
    assert (
        f"{100 * d.mean():+6.2f} points paired (s.e. {100 * se:.2f}; 1 wins, 1 ties, 1 losses"
        in (lines[4])
    )
    assert lines[4].lstrip().startswith("digits-uda-mpl - digits-uda")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["command"] == "compare" and saved["baseline"] == "digits-uda"
    groups = {g["name"]: g for g in saved["groups"]}
    assert groups["digits-uda"]["values"] == [0.80, 0.90, 0.70]
    assert groups["digits-uda"]["seeds"] == [0, 1, 2]
    assert groups["digits-uda-mpl"]["runs"] == sorted(str(r / "results.json") for r in runs[3:])
    assert groups["digits-uda-mpl"]["std"] == pytest.approx(float(np.std(list(other.values()))))
    pair = saved["paired"]["digits-uda-mpl - digits-uda"]
    assert pair["mean"] == pytest.approx(d.mean()) and pair["standard_error"] == pytest.approx(se)
    assert pair["wins_ties_losses"] == [1, 1, 1] and pair["n"] == 3


def test_a_setting_that_changes_the_result_splits_a_group_and_names_it(tmp_path, capsys):
    """An ablation (mpl_weight=0) of the same preset is another group; both names say the setting
    in which they differ, and nothing else."""
    runs = [train_run(tmp_path / f"a{s}", s, 0.9) for s in (0, 1)]
    runs += [train_run(tmp_path / f"b{s}", s, 0.8, mpl_weight=0.0) for s in (0, 1)]
    code, out, err = compare(capsys, *runs)
    assert code == 0, err
    names = [line.split("  ")[1].strip() for line in out.splitlines()[1:3]]
    assert names == ["digits-uda-mpl (mpl_weight=1.0)", "digits-uda-mpl (mpl_weight=0.0)"]
    assert "digits-uda-mpl (mpl_weight=0.0) - digits-uda-mpl (mpl_weight=1.0)" in out
    assert "-10.00 points paired" in out


def test_group_names_differ_when_only_the_method_or_the_command_does(tmp_path, capsys):
    """`--set method=...` on a preset: the name says the method. Two commands' files of the same
    configuration (an early results.json without a command, say): the name says the command."""
    runs = [train_run(tmp_path / f"a{s}", s, 0.9, method="uda") for s in (0, 1)]
    runs += [train_run(tmp_path / f"b{s}", s, 0.8) for s in (0, 1)]
    old = experiment(tmp_path / "old", {"mpl": [0.5, 0.6]})
    new = experiment(tmp_path / "new", {"mpl": [0.5, 0.6]})
    payload = json.loads((old / "results.json").read_text())
    del payload["command"]
    (old / "results.json").write_text(json.dumps(payload))
    code, out, err = compare(capsys, *runs, new, old, "--json", tmp_path / "c.json")
    assert code == 0, err
    names = [g["name"] for g in json.loads((tmp_path / "c.json").read_text())["groups"]]
    assert names == [
        "digits-uda-mpl (method=uda)",
        "digits-uda-mpl (method=uda_mpl)",
        "mpl [twomoons]",
        "mpl [no command]",
    ]


def test_an_experiment_folder_gives_a_group_per_method_and_baseline_picks_the_reference(
    tmp_path, capsys
):
    run = experiment(tmp_path / "tm", {"supervised": [0.8, 0.7, 0.9], "mpl": [0.9, 0.7, 0.95]})
    code, out, err = compare(capsys, run, "--baseline", "mpl", "--json", tmp_path / "c.json")
    assert code == 0, err
    assert json.loads((tmp_path / "c.json").read_text())["baseline"] == "mpl"
    assert "paired differences against mpl, seed by seed:" in out
    assert "supervised - mpl   -5.00 points paired" in out
    assert "0 wins, 1 ties, 2 losses over 3 seeds" in out
    code, out, err = compare(capsys, run, "--baseline", "MPL")
    assert code == 2 and out == ""
    assert one_error_line(err) == (
        "metapl compare: error: --baseline 'MPL' is none of the groups: supervised; mpl\n"
    )


def test_only_keeps_the_methods_or_presets_named(tmp_path, capsys):
    """--only picks rows of an experiment by method and train runs by preset, so that a folder's
    other methods neither print nor clash with another folder's."""
    run = experiment(tmp_path / "tm", {"supervised": [0.8, 0.7], "mpl": [0.9, 0.7], "x": [0, 0]})
    rerun = experiment(tmp_path / "tm2", {"supervised": [0.8, 0.7]})  # clashes unless left out
    trains = [train_run(tmp_path / f"t{s}", s, 0.9) for s in (0, 1)]
    code, out, err = compare(capsys, run, rerun, *trains, "--only", "mpl,digits-uda-mpl")
    assert code == 0, err
    names = [line.split("  ")[1].strip() for line in out.splitlines()[1:3]]
    assert names == ["mpl", "digits-uda-mpl"]
    assert "supervised" not in out and "x " not in out
    code, out, err = compare(capsys, run, "--only", "mpl,MPL")
    assert code == 2 and out == ""
    assert one_error_line(err) == (
        "metapl compare: error: --only MPL: none of the runs has it; they have: mpl, supervised, "
        "x\n"
    )
    code, out, err = compare(capsys, run, "--only", ",")
    assert code == 2 and "--only is empty" in one_error_line(err)


def test_groups_on_other_data_or_too_few_common_seeds_are_not_paired_and_say_why(tmp_path, capsys):
    a = experiment(tmp_path / "a", {"supervised": [0.8, 0.7]})
    b = experiment(tmp_path / "b", {"supervised": [0.6, 0.5]}, noise=0.05)
    one = train_run(tmp_path / "one", 0, 0.9)
    two = train_run(tmp_path / "two", 0, 0.9, preset="digits-uda", method="uda")
    code, out, err = compare(capsys, a, b, one, two, "--json", tmp_path / "c.json")
    assert code == 0, err
    assert "  supervised (noise=0.05): not paired: other data (noise 0.05, not 0.1)" in out
    # the train runs: dataset digits against the experiment's none, and a single seed
    assert (
        "  digits-uda-mpl: not paired: data not recorded alike (dataset digits, not unrecorded"
        in out
    )
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["paired"] == {}
    assert set(saved["not_paired"]) == {"supervised (noise=0.05)", "digits-uda-mpl", "digits-uda"}
    code, out, err = compare(capsys, one, two)
    assert code == 0, err
    assert (
        "digits-uda: not paired: only one seed in common with digits-uda-mpl; 2 are needed" in out
    )


def test_your_own_datas_folder_is_which_data_it_is(tmp_path, capsys):
    """Where CIFAR-10 lies does not matter; where your own images lie says which they are: two
    folders are two groups, not paired."""
    own = {"preset": "folder-uda-mpl", "dataset": "folder"}
    runs = [train_run(tmp_path / f"a{s}", s, 0.9, **own, data_dir="cats") for s in (0, 1)]
    runs += [train_run(tmp_path / f"b{s}", s, 0.8, **own, data_dir="dogs") for s in (0, 1)]
    code, out, err = compare(capsys, *runs)
    assert code == 0, err
    assert out.splitlines()[1].split()[:2] == ["folder-uda-mpl", "(data_dir=cats)"]
    assert (
        "  folder-uda-mpl (data_dir=dogs): not paired: other data (data_dir dogs, not cats)" in out
    )


def test_the_records_of_a_real_train_run_are_read(tmp_path, capsys):
    """What `metapl train` writes, not a copy of it: seed, method, preset and accuracy."""
    out = tmp_path / "run"
    argv = ["train", "--preset", "digits-supervised", "--steps", "2", "--seed", "3", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    accuracy = json.loads((out / "results.json").read_text())["results"][0]["accuracy"]
    code, text, err = compare(capsys, out / "results.json")
    assert code == 0, err
    assert text.splitlines()[1].split() == [
        "digits-supervised",
        f"{100 * accuracy:.2f}",
        "+-",
        "0.00",
        "%",
        "(n=1,",
        "seeds",
        "3)",
    ]


def test_early_twomoons_files_that_hold_only_the_records_are_read(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"method": "mpl", "seed": s, "accuracy": 0.5} for s in (4, 5, 7)]))
    code, out, err = compare(capsys, path)
    assert code == 0, err
    assert out.splitlines()[1].split()[-3:] == ["seeds", "4-5,", "7)"]


def test_the_plot_is_a_png_and_the_json_and_plot_must_differ(tmp_path, capsys):
    run = experiment(tmp_path / "tm", {"supervised": [0.8, 0.7], "mpl": [0.9, 0.7]})
    code, _, err = compare(capsys, run, "--plot", tmp_path / "c.png")
    assert code == 0, err
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = compare(capsys, run, "--json", tmp_path / "x", "--plot", tmp_path / "x")
    assert code == 2 and out == "" and not (tmp_path / "x").exists()
    assert "--json and --plot are both" in one_error_line(err)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "nope", "{d}/nope does not exist: give a finished run's folder or its"),
        (lambda d: d, "{d} holds no results.json (a finished metapl run writes it into its --out)"),
        (
            lambda d: (d / "checkpoint.pt").write_bytes(b"x") and d,
            "{d} holds no results.json: the run has not finished (its command, run again, resumes",
        ),
        (
            lambda d: (d / "best.toml").write_text("") == 0 and d,
            "{d} holds no results.json: a `metapl tune` study's folder; its trials are run folders: "
            "{d}/trials/*/*",
        ),
        (
            lambda d: (d / "results.json").write_text('{"results": [') and d,
            "{d}/results.json: cannot read it (not valid JSON); a metapl results.json is JSON",
        ),
        (  # `metapl bench --json`: results without a method and a seed
            lambda d: (
                (d / "b.json").write_text('{"machine": {}, "results": [{"name": "exact"}]}')
                and d / "b.json"
            ),
            "{d}/b.json holds no records of a method and a seed: compare reads the results.json",
        ),
        (  # a seed that is not an integer
            lambda d: (
                (d / "r.json").write_text('[{"method": "mpl", "seed": true}]') and d / "r.json"
            ),
            "{d}/r.json holds no records of a method and a seed",
        ),
    ],
    ids=[
        "missing",
        "empty-folder",
        "unfinished-run",
        "tune-study",
        "broken-json",
        "bench-file",
        "bool-seed",
    ],
)
def test_what_compare_cannot_read_is_one_line_naming_it(tmp_path, capsys, make, message):
    run = make(tmp_path)
    code, out, err = compare(capsys, run)
    assert code == 2 and out == ""
    assert one_error_line(err).startswith("metapl compare: error: " + message.format(d=tmp_path)), (
        err
    )


def test_a_run_given_twice_is_refused_naming_both_files(tmp_path, capsys):
    run = train_run(tmp_path / "r", 0, 0.9)
    copy = train_run(tmp_path / "copy", 0, 0.9, device="cuda")
    code, out, err = compare(capsys, run, copy)
    assert code == 2 and out == ""
    assert one_error_line(err) == (
        f"metapl compare: error: {run}/results.json and {copy}/results.json both hold seed 0 of "
        "digits-uda-mpl under the same configuration (one run given twice, or a rerun): a group takes "
        "one result per seed; give each run once, and compare a rerun on its own\n"
    )


def test_a_missing_or_invalid_metric_names_the_accuracies_the_runs_hold(tmp_path, capsys):
    no_test = train_run(tmp_path / "own", 0, None)
    code, out, err = compare(capsys, no_test)
    assert code == 2 and out == ""
    assert one_error_line(err) == (
        f"metapl compare: error: {no_test}/results.json: the uda_mpl record of seed 0 has no "
        "accuracy (no test set: its accuracies: student_labeled_accuracy, tune_accuracy); choose "
        "one with --metric\n"
    )
    code, out, err = compare(capsys, no_test, "--metric", "tune_accuracy")
    assert code == 0, err
    assert out.splitlines()[1].split()[1] == "50.00"
    code, out, err = compare(capsys, no_test, "--metric", "seconds")
    assert code == 2 and "--metric seconds: compare reads accuracies" in one_error_line(err)
    odd = train_run(tmp_path / "odd", 0, 97.5)  # a percentage where a fraction belongs
    code, out, err = compare(capsys, odd)
    assert code == 2
    assert "accuracy 97.5 of uda_mpl seed 0 is not an accuracy in [0, 1]" in one_error_line(err)
    text = train_run(tmp_path / "text", 0, "0.9")  # there, but a string: was "has no accuracy"
    code, out, err = compare(capsys, text)
    assert code == 2
    assert "accuracy of uda_mpl seed 0 is '0.9', not a number" in one_error_line(err)


def test_outputs_are_checked_before_reading_and_never_replace_a_runs_results(tmp_path, capsys):
    run = train_run(tmp_path / "r", 0, 0.9)
    before = (run / "results.json").read_text()
    code, out, err = compare(capsys, run, "--json", run / "results.json")
    assert code == 2 and out == ""
    assert "would replace a file that `metapl train` wrote" in one_error_line(err)
    assert (run / "results.json").read_text() == before
    code, out, err = compare(capsys, tmp_path / "missing", "--plot", tmp_path / "no" / "c.png")
    assert code == 2  # the output's folder is reported first, before any run is read
    assert f"--plot {tmp_path}/no/c.png: folder {tmp_path}/no does not exist" in one_error_line(err)


def test_format_seeds_joins_consecutive_seeds():
    assert format_seeds([7, 0, 1, 2, 3, 9, 10]) == "0-3, 7, 9-10"
    assert format_seeds([5]) == "5"
    assert format_seeds([-3, -2, -1, 0, 4]) == "-3 to 0, 4"  # not "-3-0"
    assert format_seeds([-5, -4, 2, 3]) == "-5 to -4, 2-3"


def test_a_train_option_an_older_run_lacks_counts_as_its_default(tmp_path, capsys):
    """A run by an older metapl, whose config lacks an option added since (compile, session 27),
    ran with that option's default, as its resume assumes: it joins the newer runs that record
    the default, and stays apart from those that set another value (named by it)."""
    new = [train_run(tmp_path / f"new{s}", s, 0.9, compile=False) for s in (0, 1)]
    old = [train_run(tmp_path / f"old{s}", s, 0.5) for s in (2, 3)]
    compiled = [train_run(tmp_path / f"c{s}", s, 0.7, compile=True) for s in (0, 1)]
    code, out, err = compare(capsys, *new, *old, *compiled, "--json", tmp_path / "c.json")
    assert code == 0, err
    groups = json.loads((tmp_path / "c.json").read_text())["groups"]
    assert [(g["name"], sorted(g["seeds"])) for g in groups] == [
        ("digits-uda-mpl (compile=false)", [0, 1, 2, 3]),
        ("digits-uda-mpl (compile=true)", [0, 1]),
    ]


def _experiment_run(folder: Path, command: str, config: dict, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    payload = {"command": command, "config": config, "results": records, "summary": {}}
    (folder / "results.json").write_text(json.dumps(payload))
    return folder


def test_an_experiments_option_left_to_its_presets_is_the_value_its_runs_recorded(tmp_path, capsys):
    """`metapl digits` and `reduced` record an option left to the presets as null in their config,
    and what each run resolved in its record: a run that writes the default out is the same group
    (it was "steps=null" against "steps=1500", and "not paired: other data (labels_per_class 30,
    not null)"); LabelSpreading, which trains no network, has no steps; another value still
    splits."""
    config = {"labels_per_class": 5, "methods": ["uda", "label_spreading"], "overrides": {}}

    def digits(name: str, steps: int | None, resolved: int, seeds: range) -> Path:
        records = []
        for seed in seeds:
            records.append({"method": "uda", "seed": seed, "accuracy": 0.9, "steps": resolved})
            records.append({"method": "label_spreading", "seed": seed, "accuracy": 0.8})
        return _experiment_run(tmp_path / name, "digits", {**config, "steps": steps}, records)

    runs = [digits("d", None, 1500, range(2)), digits("e", 1500, 1500, range(2, 4))]
    runs.append(digits("f", 700, 700, range(4, 6)))
    for name, labels_per_class, seeds in (("r", None, range(2)), ("s", 30, range(2, 4))):
        records = [
            {"method": "reduced_mpl", "seed": seed, "accuracy": 0.9, "labels_per_class": 30}
            for seed in seeds
        ]
        cfg = {"dataset": "digits", "labels_per_class": labels_per_class, "steps": None}
        runs.append(_experiment_run(tmp_path / name, "reduced", cfg, records))
    code, out, err = compare(capsys, *runs, "--json", tmp_path / "c.json")
    assert code == 0, err
    groups = json.loads((tmp_path / "c.json").read_text())["groups"]
    assert [(g["name"], sorted(g["seeds"])) for g in groups] == [
        ("uda (steps=1500)", [0, 1, 2, 3]),
        ("label_spreading", [0, 1, 2, 3, 4, 5]),
        ("uda (steps=700)", [4, 5]),
        ("reduced_mpl", [0, 1, 2, 3]),
    ]


def test_groups_that_read_the_same_still_get_names_of_their_own(tmp_path, capsys):
    """Two configurations that print alike get names of their own: under one name the table kept
    one of them and the paired difference was the group minus itself (+0.00, all ties)."""
    new = [train_run(tmp_path / f"new{s}", s, 0.9) for s in (0, 1)]
    # the string "1" and the number 1 (a hand-edited config): numbered
    text = [
        train_run(tmp_path / f"t{s}", s, 0.7, mpl_weight="1.0", large_teacher=None) for s in (0, 1)
    ]
    code, out, err = compare(capsys, *new[:1], *text, *new[1:], "--json", tmp_path / "c.json")
    assert code == 0, err
    names = [g["name"] for g in json.loads((tmp_path / "c.json").read_text())["groups"]]
    assert names == [f"digits-uda-mpl (mpl_weight=1.0) [train] #{i}" for i in (1, 2)]


@pytest.mark.parametrize("output", ["--json", "--plot"])
def test_an_output_that_is_one_of_the_inputs_is_refused(tmp_path, capsys, output):
    """A results.json copied under another name, or the folder of a results.json written before
    metapl recorded its command (results/digits/k5): the comparison replaced the run's results."""
    copy = tmp_path / "seed0.json"
    copy.write_text((train_run(tmp_path / "r", 0, 0.9) / "results.json").read_text())
    old = experiment(tmp_path / "old", {"mpl": [0.5, 0.6]})
    payload = json.loads((old / "results.json").read_text())
    del payload["command"]
    (old / "results.json").write_text(json.dumps(payload))
    for run, target in ((copy, copy), (old, old / "results.json"), (old, old / "twomoons.png")):
        before = run.read_text() if run.is_file() else (old / "results.json").read_text()
        code, out, err = compare(capsys, run, output, target)
        assert code == 2 and out == "", (target, out)
        assert f"{output} {target} would replace" in one_error_line(err)
        assert (run if run.is_file() else old / "results.json").read_text() == before
        assert not (old / "twomoons.png").exists()


def test_a_reduced_experiments_list_of_students_is_left_aside(tmp_path, capsys):
    """`metapl reduced --methods reduced_mpl` and a run of every student: one configuration of
    reduced_mpl, as `metapl digits --methods` is (each record names its own method)."""
    folders = []
    for name, students, seeds in (
        ("all", ["supervised", "noisy_student", "reduced_mpl"], [0, 1]),
        ("one", ["reduced_mpl"], [2, 3]),
    ):
        config = {
            "dataset": "digits",
            "seeds": seeds,
            "steps": None,
            "labels_per_class": None,
            "device": "cpu",
            "workers": 0,
            "students": students,
            "overrides": {},
        }
        methods = ("large_teacher", *students)
        folders.append(command_run(tmp_path / name, "reduced", config, methods, seeds))
    groups = group_seeds(capsys, tmp_path, folders)
    assert groups["large_teacher"] == groups["reduced_mpl"] == [0, 1, 2, 3], groups


def test_a_metric_that_only_some_methods_record_compares_those(tmp_path, capsys):
    """`metapl reduced`/`digits` record accuracy_before_finetune for the fine-tuned methods only:
    --metric accuracy_before_finetune compares those and says which were left out (it failed on
    the first record without it, naming accuracy_before_finetune among its file's accuracies)."""
    records = [
        {"method": m, "seed": s, "accuracy": 0.9, **({"accuracy_before_finetune": b} if b else {})}
        for m, b in (("large_teacher", None), ("noisy_student", 0.8), ("reduced_mpl", 0.85))
        for s in (0, 1)
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"command": "reduced", "config": {}, "results": records}))
    code, out, err = compare(capsys, path, "--metric", "accuracy_before_finetune")
    assert code == 0, err
    assert out.splitlines()[1].split()[:2] == ["noisy_student", "80.00"]
    assert "reduced_mpl - noisy_student   +5.00 points paired" in out
    assert "left out (no accuracy_before_finetune): large_teacher" in out
    code, out, err = compare(capsys, path, "--metric", "tune_accuracy")  # none has it: an error
    assert code == 2
    assert "has no tune_accuracy (its accuracies: accuracy, accuracy_before_finetune)" in err


def test_a_digits_experiments_runs_pair_with_train_runs_on_the_same_split(tmp_path, capsys):
    """`metapl digits` records the label budget only: its runs were "not paired: data not recorded
    alike (dataset digits, not unrecorded)" with `metapl train` runs of the same presets on the
    same splits. Their data is now what each run's training config had; another label budget is
    still other data."""
    from dataclasses import asdict

    from metapl.experiments.digits import DigitsConfig

    def digits_run(folder: Path, labels_per_class: int) -> Path:
        cfg = DigitsConfig(seeds=[0, 1], labels_per_class=labels_per_class)
        config = json.loads(json.dumps(asdict(cfg)))
        del config["workers"]  # a file of an older metapl: the option counts as its default
        records = [
            {"method": m, "seed": s, "accuracy": 0.5 + 0.1 * s, "labels_per_class": 5}
            for m in ("supervised", "label_spreading")
            for s in (0, 1)
        ]
        folder.mkdir()
        payload = {"command": "digits", "config": config, "results": records}
        (folder / "results.json").write_text(json.dumps(payload))
        return folder

    digits = digits_run(tmp_path / "digits", 5)
    trains = [train_run(tmp_path / f"t{s}", s, 0.7 + 0.1 * s) for s in (0, 1)]
    code, out, err = compare(capsys, digits, *trains, "--baseline", "digits-uda-mpl")
    assert code == 0, err
    assert "not paired" not in out, out
    assert "supervised - digits-uda-mpl" in out and "label_spreading - digits-uda-mpl" in out
    other = digits_run(tmp_path / "k10", 10)
    code, out, err = compare(capsys, other, *trains, "--baseline", "digits-uda-mpl")
    assert code == 0, err
    assert "supervised: not paired: other data (labels_per_class 10, not 5)" in out, out


def test_an_experiments_set_of_how_often_it_logs_or_saves_is_left_aside(tmp_path, capsys):
    """`metapl digits --set checkpoint_every=100` measures what the same command without it does:
    one group per method. A --set that changes the result still splits its method's group."""
    folders = []
    for name, overrides, seeds in (
        ("saves", {"*": {"checkpoint_every": "100", "finetune_steps": "0"}}, [0, 1]),
        ("plain", {"*": {"finetune_steps": "0"}}, [2, 3]),
        ("logs", {"*": {"finetune_steps": "0"}, "uda_mpl": {"log_every": "5"}}, [4]),
        (
            "other",
            {"*": {"finetune_steps": "0", "eval_every": "9"}, "uda_mpl": {"mpl_weight": "2"}},
            [5],
        ),
    ):
        config = {"seeds": seeds, "labels_per_class": 5, "device": "cpu", "overrides": overrides}
        methods = ("supervised", "uda_mpl")
        folders.append(command_run(tmp_path / name, "digits", config, methods, seeds))
    groups = group_seeds(capsys, tmp_path, folders)
    assert groups["supervised"] == [0, 1, 2, 3, 4, 5], groups
    assert groups['uda_mpl (overrides={"finetune_steps":"0"})'] == [0, 1, 2, 3, 4], groups
    assert groups['uda_mpl (overrides={"finetune_steps":"0","mpl_weight":"2"})'] == [5], groups
