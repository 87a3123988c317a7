"""Bad input found by an adversarial pass over every subcommand: each is one line on stderr, exit
code 2, and nothing written or changed.

Each of these used to be a traceback after files were written (a pad too large for the images, a
negative momentum or seed, a model that cannot take the dataset's images, a checkpoint whose
contents do not fit the run), a silent acceptance (a negative ``unlabeled_per_class``, a zero-width
reduced teacher, an infinite weight, ``metapl digits --set seed=5``, which trained every seed as
seed 5 and reported it as seeds 0-4), or a traceback after the whole benchmark had run (``metapl
bench --json`` naming a folder).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from cli_helpers import for_preset
from fake_datasets import write_svhn
from test_train_cli import one_error_line, tiny, train_cli

from metapl.cli import main
from metapl.train.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def files(folder) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "pad=8"], "pad 8 is too large for this dataset's 8-pixel images"),
        (["--set", "pad=-1"], "pad must be >= 0, got -1"),
        # trained on strong views that were all gray (a preset's cutout after --set image_size)
        (["--set", "cutout=8"], "cutout 8 is not smaller than this dataset's 8-pixel images"),
        (["--set", "cutout=-1"], "cutout must be >= 0, got -1"),
        (["--set", "randaugment_ops=-1"], "randaugment_ops must be >= 0, got -1"),
        (["--set", "randaugment_magnitude=-5"], "randaugment_magnitude must be >= 0"),
        (["--set", "momentum=-1"], "momentum must be in [0, 1), got -1.0"),
        (["--set", "momentum=1.5"], "momentum must be in [0, 1), got 1.5"),
        (["--set", "unlabeled_per_class=-1"], "unlabeled_per_class must be >= 0, got -1"),
        (["--set", "teacher_hidden=0"], "teacher_hidden must be >= 1, got 0"),
        (["--set", "mpl_weight=inf"], "mpl_weight must be a finite number, got inf"),
        (["--set", "student_lr=inf"], "student_lr must be a finite number, got inf"),
        # a RuntimeError traceback in the optimizer's first step (beyond float32), and an
        # out-of-memory one once the data was read
        (["--set", "student_lr=1e300"], "student_lr must be at most 3.403e+38 in size"),
        (["--set", "batch_size=1e15"], "batch_size must be at most 1,048,576"),
        (["--seed", "-1"], "seed must be in 0..4294967295, got -1"),
        # numpy's and scikit-learn's limit: the digits split raised sklearn's error as a traceback
        (["--seed", "4294967296"], "seed must be in 0..4294967295, got 4294967296"),
        # OverflowError (float infinity to integer) as a traceback
        (["--set", "steps=1e400"], "steps expects an integer, got '1e400'"),
        # trained 2 steps without a word
        (["--set", "steps=2.5e0", "--set", "warmup_steps=0"], "steps expects an integer"),
        (["--set", "model=mlp"], "model mlp cannot take this data's images (1 channel, 8x8)"),
        (["--set", "model=small_cnn"], "model small_cnn cannot take this data's images"),
    ],
)
def test_bad_training_options_exit_2_before_anything_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert (
        main(["train", "--preset", "digits-randaugment-mpl", "--out", str(out), "--quiet", *args])
        == 2
    )
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("metapl train: error: ") and message in err, err
    assert not out.exists()


def test_a_cutout_as_large_as_the_images_is_fine_for_a_method_without_strong_views(tmp_path):
    """Supervised learning on the weak view never cuts out: its preset's cutout is not read."""
    out = tmp_path / "run"
    assert train_cli("digits-supervised", out, *tiny(2), "--set", "cutout=16", "--quiet") == 0


def test_a_model_error_names_how_to_choose_another(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "digits-uda", "--out", str(out), "--set", "model=mlp"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "choose a model for them with --set model=NAME" in err
    assert not out.exists()


def test_a_checkpoint_that_does_not_fit_the_run_is_exit_2_and_changes_nothing(tmp_path, capsys):
    """It passes the configuration check (same fingerprint) but its weights have another shape:
    a damaged file, or one written by another version. config.json used to be rewritten first, so
    a finished run then looked unfinished to `metapl predict`."""
    out = tmp_path / "run"
    assert train_cli("digits-supervised", out, *tiny(4)) == 0
    ckpt, prev = out / "checkpoint.pt", out / "checkpoint.prev.pt"
    state = load_checkpoint(ckpt)
    name = next(iter(state["student"]))
    state["student"][name] = torch.zeros(3, 3)
    save_checkpoint(ckpt, state)
    before = files(out)
    capsys.readouterr()

    # A longer run of the same configuration: config.json would change if anything were written.
    assert train_cli("digits-supervised", out, *tiny(6)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"checkpoint {ckpt} does not fit this run" in err and f"size mismatch for {name}" in err
    assert f"mv {prev} {ckpt}" in err
    assert files(out) == before

    # Without a previous checkpoint the message offers no mv.
    prev.unlink()
    before = files(out)
    assert train_cli("digits-supervised", out, *tiny(6)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "delete it to start this run over" in err and "mv " not in err
    assert files(out) == before


def test_a_checkpoint_without_optimizer_state_is_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli("digits-supervised", out, *tiny(2)) == 0
    ckpt = out / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    del state["optimizers"]
    save_checkpoint(ckpt, state)
    before = files(out)
    capsys.readouterr()
    assert train_cli("digits-supervised", out, *tiny(4)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "does not fit this run" in err and "it lacks 'optimizers'" in err
    assert files(out) == before


@pytest.mark.parametrize(
    "command, message",
    [
        # a set of what the command's own options set
        (["digits", "--set", "seed=5"], "--set seed=...: --seeds sets seed for every run"),
        (["digits", "--set", "uda:seed=5"], "use --seeds"),
        (
            ["digits", "--set", "uda:labels_per_class=7"],
            "--labels-per-class sets labels_per_class for every run",
        ),
        (["reduced", "--set", "large_teacher:seed=3"], "--seeds sets seed for every run"),
        # --steps 2 with --set steps=3 trained 3 steps (the warm-up cut to 2) and reported 2
        (["digits", "--set", "steps=3"], "--steps and --set steps=... both set steps; give one"),
        (["reduced", "--set", "steps=3"], "--steps and --set steps=... both set steps"),
        (
            ["reduced", "--labels-per-class", "5", "--set", "labels_per_class=4"],
            "--labels-per-class and --set labels_per_class=... both set labels_per_class",
        ),
        # trained UDA in every method's (stage's) folder and reported it as that method
        (["digits", "--set", "method=uda"], "--set method=...: --methods sets method"),
        (["digits", "--set", "supervised:method=uda"], "use --methods"),
        (["reduced", "--set", "supervised:method=uda"], "--methods sets method"),
        # trained on another dataset and reported it as digits (or a model's channel error)
        (["digits", "--set", "dataset=npz"], "`metapl digits` trains on scikit-learn's digits"),
        (["reduced", "--set", "dataset=npz"], "--dataset sets dataset for every run"),
        # a model that cannot take digits' images
        (["digits", "--set", "uda_mpl:model=mlp"], "choose a model for them with --set uda_mpl:"),
        (["digits", "--set", "model=wrn28_2"], "model wrn28_2 cannot take this data's images"),
        # ignored without a word: a method that --methods does not run, or no trained method
        (
            ["digits", "--methods", "supervised", "--set", "uda:steps=3"],
            "--set uda:...: method uda does not train here (--methods supervised)",
        ),
        (
            ["digits", "--methods", "label_spreading", "--set", "student_lr=0.1"],
            "no method of --methods label_spreading trains a model",
        ),
        (
            ["reduced", "--set", "reduced_mpl:model=wrn28_2"],
            "stage reduced_mpl: model wrn28_2 cannot take this data's images (1 channel, 8x8)",
        ),
    ],
)
def test_experiments_refuse_bad_options_before_any_run(tmp_path, capsys, command, message):
    """`metapl digits --seeds 0-4 --set seed=5` trained every run as seed 5 and reported them as
    seeds 0-4, with LabelSpreading on another split. A model that did not fit was one line too,
    but only once its run started: in `metapl reduced`, after every large teacher had trained."""
    out = tmp_path / "out"
    assert main([*command, "--seeds", "0", "--steps", "2", "--out", str(out), "--quiet"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert message in err
    assert not out.exists()


def test_bench_checks_json_and_model_before_timing(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    # another command's results: `--json RUN/results.json` replaced them with the timings, exit 0
    results = tmp_path / "run" / "results.json"
    results.parent.mkdir()
    results.write_text('{"command": "train", "results": {}}')
    quick = ["bench", "--device", "cpu", "--batch-size", "1", "--repeats", "1", "--quiet"]
    cases = [
        (["--json", str(results)], f"--json {results} would replace a file that `metapl train`"),
        (["--json", str(folder)], f"--json {folder} is a folder; give a file name"),
        (["--json", str(a_file / "b.json")], f"{a_file} is a file, not a folder"),
        (["--model", "mlp"], "model mlp cannot take this data's images (3 channels, 32x32)"),
        # an out-of-memory traceback (76 PiB of images)
        (["--batch-size", "1000000000000"], "--batch-size must be at most 149,796"),
        (["--json", ""], "--json is empty; give a file name"),  # said "--json . is a folder"
    ]
    # `metapl tune`'s best.toml (beside its trials/) and a study's SQLite storage: replaced too
    best = tmp_path / "tune" / "best.toml"
    (best.parent / "trials").mkdir(parents=True)
    best.write_text("method = 'supervised'\n")
    study = tmp_path / "study.db"
    sqlite3.connect(study).execute("create table t (x)").connection.close()
    cases += [
        (["--json", str(best)], f"--json {best} would replace a file that `metapl tune` wrote"),
        (["--json", str(study)], f"--json {study} would replace an SQLite database"),
    ]
    if Path("/proc/self").is_dir():  # root passes os.access there: the write failed at the end
        cases.append((["--json", "/proc/x.json"], "--json /proc/x.json: cannot write in /proc"))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for args, message in cases:
        assert main([*quick, "--model", "small_cnn", *args]) == 2
        err = one_error_line(capsys.readouterr().err)
        assert err.startswith("metapl bench: error: ") and message in err, err
        assert "--model NAME" in err or args[0] != "--model"
    assert a_file.read_text() == "keep me" and not any(folder.iterdir())
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("model", ["no_such_model", "mlp"])
def test_bench_names_a_bad_model_before_its_progress_bar(capsys, model):
    """Without --quiet, `metapl bench --model mlp` drew its progress bar, then the error: two lines
    on stderr for a mistake in the input, which the README says is one."""
    quick = ["bench", "--device", "cpu", "--batch-size", "1", "--repeats", "1", "--model", model]
    assert main(quick) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("metapl bench: error: ") and model in err, err


@pytest.mark.parametrize("command", ["train", "tune"])
def test_a_mistake_after_a_warmup_cut_is_still_one_line(tmp_path, capsys, command):
    """--steps below the preset's warm-up prints a note, but a mistake in the same command (here
    --out naming a file) is the one line on stderr: the note came first, before the check."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    args = [command, "--preset", "digits-uda-mpl", "--steps", "2", "--out", str(a_file)]
    if command == "tune":
        args += ["--trials", "1", "--storage", f"sqlite:///{tmp_path / 'study.db'}"]
        args += ["--set", "tune_per_class=2"]
    assert main(args) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "is a file" in err and "warmup_steps lowered" not in err, err
    assert a_file.read_text() == "keep me"
    # and without the mistake the note is there
    good = [a if a != str(a_file) else str(tmp_path / "out") for a in args]
    if command == "train":
        assert main([*good, "--quiet", "--set", "finetune_steps=0"]) == 0
        assert "warmup_steps lowered from" in capsys.readouterr().err


@pytest.mark.parametrize(
    "preset, args, message",
    [
        ("digits-uda-mpl", ["--set", "model=no_such_model"], "unknown model 'no_such_model'"),
        ("digits-uda-mpl", ["--set", "model=mlp"], "model mlp cannot take this data's images"),
        ("cifar10-4k-uda", ["--data-dir", "{missing}"], "--data-dir {missing} does not exist"),
        ("cifar10-4k-uda", [], "cifar10-4k needs --data-dir"),
    ],
)
def test_a_data_or_model_mistake_after_a_warmup_cut_is_one_line(
    tmp_path, capsys, preset, args, message
):
    """The engine finds these (the data, the models, the checkpoint), after `metapl train` had
    printed its note on the warm-up that --steps cut: two lines on stderr, the first no error."""
    missing = tmp_path / "no_such_folder"
    args = [a.format(missing=missing) for a in args]
    out = tmp_path / "run"
    assert main(["train", "--preset", preset, "--steps", "2", "--out", str(out), *args]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert message.format(missing=missing) in err and "warmup_steps" not in err, err
    assert not out.exists()


def test_a_resume_refused_after_a_warmup_cut_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    quick = ["--device", "cpu", "--quiet", "--set", "finetune_steps=0"]
    assert train_cli("digits-supervised", out, "--steps", "2", *quick) == 0
    capsys.readouterr()
    before = files(out)
    assert train_cli("digits-supervised", out, "--steps", "3", "--seed", "7", *quick) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "different configuration (seed: 0 -> 7)" in err and "warmup_steps" not in err, err
    assert files(out) == before


@pytest.mark.parametrize("command", ["predict", "export"])
def test_an_output_inside_a_file_says_so(tmp_path, capsys, command):
    run = tmp_path / "run"
    assert train_cli("digits-supervised", run, *tiny(2)) == 0
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    target = a_file / "x"
    if command == "predict":
        image = tmp_path / "img.png"
        from PIL import Image

        Image.new("L", (8, 8)).save(image)
        args = ["predict", "--run", str(run), "--json", str(target), str(image)]
    else:
        args = ["export", "--run", str(run), "--format", "torchscript", "--output", str(target)]
    capsys.readouterr()
    assert main(args) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"{target}: {a_file} is a file, not a folder" in err, err
    assert a_file.read_text() == "keep me"


def test_too_small_a_dataset_gives_advice_the_command_line_can_follow(tmp_path, capsys):
    """The split sizes are the paper's; `metapl train` has no num_labeled option to lower."""
    write_svhn(tmp_path / "svhn", train=500, test=10)
    out = tmp_path / "run"
    args = ["--data-dir", str(tmp_path / "svhn"), "--set", "warmup_steps=0", "--quiet"]
    assert train_cli("svhn-1k-supervised", out, *args) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "has only 500 images, but svhn-1k needs 1000" in err
    assert "calling metapl.data.splits yourself" in err
    assert not out.exists()


COMMANDS = {  # each writes results.json into --out; the runs are a few steps long
    "train": ["train", "--preset", "digits-supervised", *for_preset("digits-supervised", tiny(2))],
    "twomoons": ["twomoons", "--seeds", "0", "--steps", "2"],
    "digits": ["digits", "--seeds", "0", "--methods", "supervised", "--steps", "2"],
    "reduced": ["reduced", "--seeds", "0", "--methods", "supervised", "--steps", "2"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_holding_another_commands_results_is_refused(tmp_path, capsys, command):
    """`metapl twomoons --out RUN` into a `metapl train` run would overwrite its results.json."""
    other = "reduced" if command == "train" else "train"
    (tmp_path / "results.json").write_text(f'{{"command": "{other}", "results": []}}')
    before = files(tmp_path)
    assert main([*COMMANDS[command], "--out", str(tmp_path), "--quiet"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"holds the results of `metapl {other}`" in err and "choose another --out" in err
    assert files(tmp_path) == before


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A `metapl train` run folder without results.json, as a run stopped before its end has."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    assert main([*COMMANDS["train"], "--out", str(run), "--quiet"]) == 0
    (run / "results.json").unlink()
    return run


@pytest.mark.parametrize("command", ["twomoons", "digits", "reduced"])
def test_a_train_run_stopped_before_its_results_is_refused(tmp_path, capsys, stopped_run, command):
    """A `metapl train` run stopped (Ctrl-C) before its first results.json: `metapl twomoons --out
    RUN` wrote its own results.json there, and the run could then not be resumed ("holds the
    results of `metapl twomoons`")."""
    run = shutil.copytree(stopped_run, tmp_path / "run")
    before = files(run)
    capsys.readouterr()
    assert main([*COMMANDS[command], "--out", str(run), "--quiet"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "holds the results of `metapl train`" in err and "choose another --out" in err, err
    assert files(run) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_with_the_users_own_files_of_a_result_name_is_refused(tmp_path, capsys, command):
    """`metapl train --out myproject` replaced the project's own config.json and metrics.csv (and
    any command a results.json that was not metapl's) with its own, exit code 0."""
    (tmp_path / "config.json").write_text('{"name": "my app", "port": 80}')
    (tmp_path / "results.json").write_text('{"score": 1}')
    before = files(tmp_path)
    assert main([*COMMANDS[command], "--out", str(tmp_path), "--quiet"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "holds results.json, config.json, which metapl did not write" in err, err
    assert "move them or choose another --out" in err, err
    assert files(tmp_path) == before


@pytest.mark.parametrize(
    "results",
    [[{"method": "uda", "seed": 0}], {"results": [{"method": "uda", "seed": 0}]}],
    ids=["records", "under-results"],
)
def test_an_older_metapls_results_are_not_taken_for_the_users(tmp_path, results):
    """A results.json of a metapl from before it recorded its command (its records alone, or
    under "results") is metapl's: the folder is not refused as holding the user's own files."""
    from metapl.report import output_folder, release_output_folders

    (tmp_path / "results.json").write_text(json.dumps(results))
    try:
        assert output_folder(tmp_path, command="twomoons") == tmp_path
    finally:
        release_output_folders()


@pytest.mark.parametrize("text", ["score: 1\n", '{"command": "twomoons", "config": {'])
def test_a_results_json_that_is_not_json_is_refused_saying_so(tmp_path, capsys, text):
    """A results.json metapl cannot read (another program's, or metapl's own cut short): refused
    in one line, not a traceback. A damaged one of metapl's, beside its twomoons.png, was called
    a file "which metapl did not write", with the figures."""
    (tmp_path / "results.json").write_text(text)
    (tmp_path / "twomoons.png").write_bytes(b"\x89PNG")
    assert main([*COMMANDS["twomoons"], "--out", str(tmp_path), "--quiet"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"--out {tmp_path}: its results.json is not valid JSON (another program's" in err, err
    assert "move it or choose another --out" in err and "twomoons.png" not in err, err
    assert (tmp_path / "results.json").read_text() == text


def test_a_train_run_stopped_before_its_first_checkpoint_still_resumes(tmp_path, capsys):
    """Its config.json is metapl's: the rerun starts it over instead of refusing the folder."""
    out = tmp_path / "run"
    assert main([*COMMANDS["train"], "--out", str(out), "--quiet"]) == 0
    for name in ("results.json", "checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).unlink(missing_ok=True)
    assert main([*COMMANDS["train"], "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert (out / "results.json").is_file()


def test_a_folder_where_a_figure_goes_is_refused_before_the_run(tmp_path, capsys):
    """`metapl twomoons` wrote results.json, then failed with a traceback on twomoons.png."""
    (tmp_path / "twomoons.png").mkdir()
    assert main([*COMMANDS["twomoons"], "--out", str(tmp_path), "--quiet"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'twomoons.png'} is a folder, where metapl writes a file" in err
    assert [p.name for p in tmp_path.iterdir()] == ["twomoons.png"]


@pytest.mark.parametrize(
    "command, name, message",
    [
        # TensorBoard's folder: a traceback after config.json and metrics.csv were written
        ("train", "tb", "tb is a file, where metapl writes a folder"),
        # a method's run folders: a traceback from inside the worker process
        ("digits", "supervised", "supervised/seed0 is inside"),
        # a later run's folder: found after the earlier runs had trained (uda runs first)
        ("digits-two", "supervised", "supervised/seed0 is inside"),
        # a student's folder: found after the large teacher had trained
        ("reduced", "supervised", "supervised/seed0 is inside"),
    ],
)
def test_a_file_where_a_run_writes_a_folder_is_one_line(tmp_path, capsys, command, name, message):
    (tmp_path / name).write_text("keep me")
    argv = COMMANDS[command.removesuffix("-two")]
    if command == "digits-two":
        argv = [*argv[:4], "supervised,uda", *argv[5:]]
    assert main([*argv, "--out", str(tmp_path), "--quiet"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert message in err and "choose another --out" in err, err
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("command", ["train", "twomoons"])
def test_results_name_the_command_that_wrote_them_and_a_rerun_may_overwrite(tmp_path, command):
    for _ in range(2):  # the second run finds its own command's results: not refused
        assert main([*COMMANDS[command], "--out", str(tmp_path), "--quiet"]) == 0
        assert json.loads((tmp_path / "results.json").read_text())["command"] == command


@pytest.mark.parametrize(
    "option, message",
    [
        ("=3", "a config key is empty: write --set key=value"),  # was every key as "did you mean"
        ("ab=1", "unknown config key 'ab'; `metapl train --help` lists them"),
        ("student_lr=abc", "student_lr expects a number, got 'abc'"),  # was "expects a float"
        ("flip=maybe", "flip expects true or false, got 'maybe'"),
    ],
)
def test_set_mistakes_read_well(tmp_path, capsys, option, message):
    assert (
        main(["train", "--preset", "digits-uda", "--out", str(tmp_path / "r"), "--set", option])
        == 2
    )
    assert one_error_line(capsys.readouterr().err).endswith(f"error: {message}\n")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--set", "seed=3", "--seed", "4"], "--seed and --set seed=... both set seed"),
        (["--set", "steps=3"], "--steps and --set steps=... both set steps"),
        # the option's name as it is typed (--checkpoint-every, not --checkpoint_every)
        (
            ["--set", "checkpoint_every=5", "--checkpoint-every", "4"],
            "--checkpoint-every and --set checkpoint_every=... both set checkpoint_every",
        ),
    ],
)
def test_a_key_set_by_its_option_and_by_set_is_refused(tmp_path, capsys, options, message):
    """The --set value was dropped without a word, whatever the order: --seed and --steps won.
    (Two --set of one key keep the last, an override of a shared list of options.)"""
    out = tmp_path / "r"
    argv = ["train", "--preset", "digits-uda", "--out", str(out), "--quiet", "--steps", "2"]
    assert main([*argv, *options]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch, command):
    """`--out ""` (an unset $VAR) trained into the current folder and said "wrote /results.json"."""
    monkeypatch.chdir(tmp_path)
    assert main([*COMMANDS[command], "--out", "", "--quiet"]) == 2
    assert "error: --out is empty; give a folder name" in one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", ["twomoons", "train"])
def test_an_out_that_cannot_be_created_is_one_line(capsys, command):
    """/proc takes no new folders even from root, for whom the up-front os.access check passes:
    mkdir's FileNotFoundError was a traceback."""
    out = "/proc/metapl-no-such-folder/run"
    args = ["--seeds", "0"] if command == "twomoons" else ["--preset", "digits-supervised"]
    assert main([command, *args, "--out", out, "--quiet"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"--out {out}: cannot create it" in err, err


@pytest.mark.parametrize("command", ["train", "tune", "digits", "reduced"])
def test_set_preset_is_refused(tmp_path, capsys, command):
    """`--set preset=foo` trained the --preset run (or digits' own presets) under the name foo:
    config.json, the progress bar and the summary line named a preset that never trained."""
    out = tmp_path / "out"
    argv = {
        "train": ["train", "--preset", "digits-supervised", "--steps", "2"],
        "tune": ["tune", "--preset", "digits-supervised", "--steps", "2", "--trials", "1"],
        "digits": COMMANDS["digits"],
        "reduced": COMMANDS["reduced"],
    }[command]
    if command == "tune":
        argv += ["--storage", f"sqlite:///{tmp_path / 'study.db'}", "--set", "tune_per_class=2"]
    assert main([*argv, "--out", str(out), "--quiet", "--set", "preset=foo"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "preset only records the preset a run came from" in err and "--preset" in err, err
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize(
    "args",
    [
        ["twomoons", "--seeds", "0", "--steps", "2", "--quiet", "--out"],
        ["train", "--preset", "digits-supervised", "--quiet", "--out"],
        ["bench", "--quiet", "--json"],
        ["compare"],
        ["export", "--format", "onnx", "--run"],
        ["predict", "image.png", "--run"],
    ],
    ids=lambda a: a[0],
)
def test_a_name_too_long_for_the_file_system_is_one_line(tmp_path, capsys, args):
    """A 300-byte folder or file name was a traceback (OSError: File name too long) from the first
    check of the path, in every command."""
    name = tmp_path / ("n" * 300)
    assert main([*args, str(name)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "the name is too long for the file system" in err and "choose a shorter path" in err
    assert len(err) < 400  # the 300-byte name is cut short, its length said
    assert f": error: {str(name)[:100]}..." in err, err  # the name the system refused
    assert list(tmp_path.iterdir()) == []


def test_an_out_starting_with_a_tilde_the_shell_left_is_refused(tmp_path, capsys, monkeypatch):
    """`--out=~/runs/a` (bash leaves that ~ alone) made a folder named ~ in the current folder and
    ran into it, exit code 0; a ~ folder the user made is still used."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main([*COMMANDS["twomoons"], "--out=~/runs/a", "--quiet"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "starts with a ~ that the shell did not expand" in err
    assert f"write --out {tmp_path / 'home' / 'runs' / 'a'}" in err
    assert list(tmp_path.iterdir()) == []
    # ~name of a user unknown here: no advice to write the same path again
    assert main([*COMMANDS["twomoons"], "--out=~nosuchuser29/a", "--quiet"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "did not expand" in err and "give the full path" in err
    assert "write --out" not in err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "~").mkdir()
    assert main([*COMMANDS["twomoons"], "--out=~/runs/a", "--quiet"]) == 0
    assert (tmp_path / "~" / "runs" / "a" / "results.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [*COMMANDS["twomoons"], "--quiet", "--out"],
            "is a link to {target}, which does not exist; create that folder",
        ),
        (["compare", "run", "--json"], "is a link to {target}, whose folder does not exist"),
    ],
    ids=["--out", "--json"],
)
def test_a_dangling_link_is_named_as_one(tmp_path, capsys, monkeypatch, args, message):
    """A link to a missing folder said "--out link: cannot create it (File exists)", and a link
    whose target's folder is missing "--json link: folder . does not exist"."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "gone" / "x"
    Path("link").symlink_to(target)
    assert main([*args, "link"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert message.format(target=target) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "--quiet", "--json"],
        ["compare", "run", "--plot"],
    ],
    ids=lambda a: a[0],
)
def test_an_output_file_named_as_a_folder_is_refused(tmp_path, capsys, monkeypatch, args):
    """`--json results/` (meant as a folder to create) wrote a file named `results`, as Path drops
    the slash."""
    monkeypatch.chdir(tmp_path)
    assert main([*args, "results/"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "results/ ends with a /, as a folder's name does" in err, err
    assert list(tmp_path.iterdir()) == []
