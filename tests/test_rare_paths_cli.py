"""Command-line behaviour that a coverage run of the whole suite found unexercised: the option
parser's reading of ``--`` and short options, a resume whose config.json is gone and whose
checkpoint is damaged, torchrun's environment, `metapl compare` on files of older or other shapes,
`metapl predict` on a damaged run folder, and the keys `--set` may give.

Each test says what would break it."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from fake_datasets import write_imagenet
from PIL import Image
from test_compare import compare, train_run
from test_train_cli import one_error_line, tiny, train_cli

from metapl import cli, report
from metapl.cli import main
from metapl.data.digits import digits_split
from metapl.errors import CheckpointError, ConfigError, DataError
from metapl.train import engine, run_model
from metapl.train.checkpoint import load_checkpoint, save_checkpoint
from metapl.train.config import TrainConfig, apply_overrides
from metapl.train.presets import load_preset

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def files(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def parse_error(capsys, argv: list[str]) -> str:
    """The one stderr line of an option the parser refuses (argparse exits with code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return one_error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 4-step digits run (about a second); tests damage copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_cli("digits-supervised", out, *tiny(4)) == 0
    return out


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, image in enumerate(digits_split(0, 5).x_test[:2]):
        Image.fromarray(image[..., 0], "L").save(folder / f"d{i}.png")
    return folder


# --- the option parser (`_Parser`'s unknown options) ---------------------------------------------


def test_what_follows_a_double_dash_is_no_option_of_the_command(capsys):
    """`--` ends the options: a missing --preset beside a mistyped option names the typo, and not
    the values after `--`, which are no options at all (`_Parser._unknown_options`: the argv cut at
    `--`). Would break: "unrecognized arguments: --prest --after"."""
    err = parse_error(capsys, ["train", "--prest", "x", "--", "--after"])
    assert err == (
        "metapl train: error: unrecognized arguments: --prest (did you mean --preset?); "
        "see `metapl train --help`\n"
    )


def test_an_unknown_short_option_is_named_when_a_required_option_is_missing(capsys):
    """A short option (`-x`) is never a prefix of a long one: unknown, it is named, instead of
    argparse's "the following arguments are required: --preset" that hides the typo
    (`_Parser._known_option`: only a `--` name may be a prefix). Would break: a short option taken
    as known."""
    err = parse_error(capsys, ["train", "-x", "--out", "unused"])
    assert err == "metapl train: error: unrecognized arguments: -x; see `metapl train --help`\n"


# --- resume with config.json gone and a damaged checkpoint (`cli._earlier_warmup`) ---------------


def test_a_damaged_checkpoint_without_config_json_is_the_engines_one_line_with_its_advice(
    finished_run, tmp_path, capsys
):
    """config.json deleted, the checkpoint damaged: the warm-up is looked up in the checkpoint,
    whose damage is left to the engine to report, with its advice (the previous checkpoint and the
    `mv` that puts it back), after the options' own checks. Would break: the reader's
    CheckpointError raised from the warm-up lookup, before a mistake in the options (which the
    user would meet only after moving the checkpoint back), or a traceback; or any file changed."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "config.json").unlink()
    ckpt, prev = out / "checkpoint.pt", out / "checkpoint.prev.pt"
    ckpt.write_bytes(b"garbage")
    before = files(out)
    capsys.readouterr()
    assert train_cli("digits-supervised", out, *tiny(6)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith(f"metapl train: error: checkpoint {ckpt} is corrupt"), err
    assert f"the previous checkpoint is intact; to resume from it run: mv {prev} {ckpt}" in err
    assert files(out) == before
    # the options are checked first, as for any run: the damage does not hide a typo in them
    assert train_cli("digits-supervised", out, *tiny(6), "--set", "student_lr=-1") == 2
    err = one_error_line(capsys.readouterr().err)
    assert err == "metapl train: error: student_lr must be > 0, got -1.0\n", err
    assert files(out) == before


# --- torchrun's environment and other OS errors (`_check_not_under_torchrun`, `main`) ------------


def test_a_non_integer_world_size_does_not_stop_a_command_that_does_not_read_it(
    monkeypatch, capsys
):
    """WORLD_SIZE=two is torchrun's business: `metapl train` names it (metapl.distributed), the
    other commands do not read it and run (`_check_not_under_torchrun` lets a WORLD_SIZE that is no
    number pass). Would break: a ValueError traceback from `metapl presets`."""
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["presets"]) == 0
    out, err = capsys.readouterr()
    assert "digits-uda-mpl" in out and err == ""


def test_an_os_error_other_than_a_too_long_name_keeps_its_traceback(monkeypatch, capsys):
    """Only ENAMETOOLONG is a mistake in the input (one line, exit 2); any other OSError is a bug
    and propagates with its traceback (`cli.main` re-raises it). Would break: a permission error
    reported as "the name is too long for the file system"."""

    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/file")

    monkeypatch.setattr(cli, "_cmd_presets", denied)
    with pytest.raises(PermissionError):
        main(["presets"])
    assert "too long" not in capsys.readouterr().err


# --- keys --set may give (`TrainConfig.ignored_key`, `TrainConfig.sgd_optimizers`) ---------------


def test_labels_per_class_at_its_default_is_still_refused_for_another_dataset(tmp_path, capsys):
    """`--set labels_per_class=5` (the default, which validate() lets pass) on cifar10-4k sets a key
    the run would ignore: refused by the keys check, one line, nothing written
    (`TrainConfig.ignored_key`). Would break: the run trained on the split's own labeled set without
    a word."""
    out = tmp_path / "run"
    argv = ["train", "--preset", "cifar10-4k-uda-mpl", "--out", str(out)]
    assert main([*argv, "--set", "labels_per_class=5"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err == (
        "metapl train: error: labels_per_class applies to dataset digits only; cifar10-4k does "
        "not use it\n"
    )
    assert not out.exists()


def test_momentum_applies_when_only_the_mpl_teacher_uses_sgd():
    """An Adam student with an SGD teacher (+MPL, no fine-tuning): momentum is read by the teacher's
    optimizer, so `--set momentum` is accepted (`TrainConfig.sgd_optimizers` lists the teacher's);
    without MPL or with an Adam teacher it is refused. Would break: momentum refused for a run that
    reads it."""
    base = {"student_optimizer": "adam", "finetune_steps": 0, "momentum": 0.5}
    cfg = apply_overrides(load_preset("digits-uda-mpl"), base).validate()
    assert cfg.uses_mpl and cfg.sgd_optimizers == ["teacher"]
    assert cfg.ignored_key("momentum") is None
    cfg.check_keys_apply(["momentum"])
    adam = apply_overrides(cfg, {"teacher_optimizer": "adam"}).validate()
    assert adam.sgd_optimizers == []
    with pytest.raises(ConfigError, match="momentum applies to the sgd optimizers only"):
        adam.check_keys_apply(["momentum"])
    no_mpl = apply_overrides(load_preset("digits-uda"), base).validate()
    assert no_mpl.sgd_optimizers == []


# --- `metapl compare` on old or other-shaped files (`_experiment_data`, `_results_overrides`) ----


def digits_file(folder: Path, config: dict, methods, command: str | None = "digits") -> Path:
    """A `metapl digits` results.json of seeds 0 and 1; ``command=None``: a file of a metapl
    from before the files named their command (results/digits/k5)."""
    records = [
        {"method": m, "seed": s, "accuracy": 0.5 + 0.1 * s, "labels_per_class": 5}
        for m in methods
        for s in (0, 1)
    ]
    payload: dict = {"config": config, "results": records}
    if command is not None:
        payload["command"] = command
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(payload))
    return folder


OLD_DIGITS_CONFIG = {  # the config of results/digits/k5/results.json
    "device": "cpu",
    "labels_per_class": 5,
    "methods": ["supervised", "label_spreading"],
    "overrides": {},
    "seeds": [0, 1],
    "steps": None,
    "workers": 0,
}


def test_a_digits_file_that_does_not_name_its_command_still_pairs_with_train_runs(tmp_path, capsys):
    """results/digits/k5 was written before the files named their command: known by its options as
    `metapl digits`' (`compare._experiment_data`, by the options its config holds), its runs' data
    is resolved and they pair with `metapl train` runs on the same splits. Would break: "not paired:
    data not recorded alike"."""
    old = digits_file(tmp_path / "old", OLD_DIGITS_CONFIG, ("supervised", "label_spreading"), None)
    trains = [train_run(tmp_path / f"t{s}", s, 0.7 + 0.1 * s) for s in (0, 1)]
    code, out, err = compare(capsys, old, *trains, "--baseline", "digits-uda-mpl")
    assert code == 0, err
    assert "not paired" not in out, out
    assert "supervised - digits-uda-mpl       -20.00 points paired" in out, out
    assert "label_spreading - digits-uda-mpl  -20.00 points paired" in out, out


def test_a_digits_record_whose_config_cannot_be_resolved_is_compared_unpaired(tmp_path, capsys):
    """A record of a method this metapl does not know (a file of another version): its training
    config cannot be resolved, so its data stays unrecorded (`compare._experiment_data`, where
    run_config_of fails); compare still reports it, as not paired, and says why. Would break: a
    traceback or exit 2."""
    odd = digits_file(tmp_path / "odd", {**OLD_DIGITS_CONFIG, "methods": ["mystery"]}, ["mystery"])
    trains = [train_run(tmp_path / f"t{s}", s, 0.7 + 0.1 * s) for s in (0, 1)]
    code, out, err = compare(capsys, odd, *trains, "--baseline", "digits-uda-mpl")
    assert code == 0, err
    assert "mystery          55.00 +-  5.00 %  (n=2, seeds 0-1)" in out, out
    assert "mystery: not paired: data not recorded alike (dataset unrecorded, not digits" in out


def test_an_experiments_set_of_another_shape_is_kept_whole_as_a_setting(tmp_path, capsys):
    """`overrides` whose per-method entry is no dict (a file of another shape) is kept whole as the
    group's setting (`compare._results_overrides`), not taken apart. Would break: an AttributeError
    traceback ('str' object has no attribute 'items')."""
    config = {**OLD_DIGITS_CONFIG, "methods": ["supervised"], "overrides": {"*": "steps=3"}}
    odd = digits_file(tmp_path / "odd", config, ["supervised"])
    code, out, err = compare(capsys, odd, "--json", tmp_path / "c.json")
    assert code == 0, err
    (group,) = json.loads((tmp_path / "c.json").read_text())["groups"]
    assert group["settings"]["overrides"] == {"*": "steps=3"}
    assert group["seeds"] == [0, 1] and group["mean"] == pytest.approx(0.55)


def test_a_record_whose_data_is_all_recorded_is_not_resolved_again(monkeypatch):
    """When the file records every data key, nothing is resolved (`compare._experiment_data` returns
    at once): the experiment's own config is not even built. Would break: digits' run_config_of
    called (and its answer preferred over what the file recorded)."""
    from metapl import compare as compare_module
    from metapl.experiments import digits

    def unexpected(*args):
        raise AssertionError("run_config_of called though every data key was recorded")

    monkeypatch.setattr(digits, "run_config_of", unexpected)
    data = {key: "recorded" for key in compare_module.DATA_KEYS}
    record = {"method": "supervised", "seed": 0}
    assert compare_module._experiment_data("digits", {"seeds": [0]}, record, data) == {}


# --- report.py's `_is_sqlite_database` and `check_replaceable` -----------------------------------


def test_a_file_that_cannot_be_read_is_not_taken_for_a_database(tmp_path, monkeypatch):
    """An output file that exists but cannot be opened (another user's, say; root reads everything,
    so the refusal is simulated) holds nothing of a study's: --json may name it
    (`report._is_sqlite_database` answers no on an OSError). Would break: the OSError's traceback
    from the check."""
    target = tmp_path / "timings.json"
    target.write_text("{}")
    real_open = Path.open

    def refuse(self, *args, **kwargs):
        if self == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    assert report._is_sqlite_database(target) is False
    report.check_not_a_result(target, "--json")  # no ConfigError


def test_earlier_results_whose_config_is_not_an_object_are_not_compared(tmp_path):
    """A results.json whose "config" is a list (not a file of ours, or hand-edited) has no earlier
    configuration to protect: the check lets the run go on (`report.check_replaceable`). Would
    break: an AttributeError traceback ('list' object has no attribute 'get'), or a refusal."""
    (tmp_path / "results.json").write_text(json.dumps({"config": [1, 2], "results": []}))
    report.check_replaceable(tmp_path, "TwoMoons", {"seeds": [0], "noise": 0.1})
    # an object of another configuration is still refused
    (tmp_path / "results.json").write_text(json.dumps({"config": {"seeds": [1], "noise": 0.1}}))
    with pytest.raises(ConfigError, match=r"holds TwoMoons results of another configuration"):
        report.check_replaceable(tmp_path, "TwoMoons", {"seeds": [0], "noise": 0.1})


# --- `metapl predict` on a damaged run folder (run_model.py's `class_names`, `_num_classes`) -----


def test_a_classes_json_that_is_not_json_is_one_line(finished_run, image_dir, tmp_path, capsys):
    """classes.json holding text that is no JSON: one line naming the file and the parser's reason,
    exit 2 (`run_model.class_names`). Would break: a JSONDecodeError traceback."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "classes.json").write_text("not json")
    assert main(["predict", "--run", str(run), str(image_dir)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err == (
        f"metapl predict: error: {run / 'classes.json'} is not readable JSON (Expecting value: "
        "line 1 column 1 (char 0))\n"
    )
    with pytest.raises(DataError, match="is not readable JSON"):
        run_model.class_names(run, 10)


def test_a_checkpoint_whose_classifier_tensors_disagree_on_the_class_count_is_one_line(
    finished_run, image_dir, tmp_path, capsys
):
    """The classifier's weight says 10 classes and its bias 7 (a hand-edited checkpoint): no class
    count fits, one line (`run_model._num_classes`). Would break: the first tensor's count taken,
    and a size-mismatch traceback or a model of the wrong width."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["student"]["fc.bias"].shape == (10,)
    state["student"]["fc.bias"] = torch.zeros(7)
    save_checkpoint(run / "checkpoint.pt", state)
    assert main(["predict", "--run", str(run), str(image_dir)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err == (
        f"metapl predict: error: run folder {run}: its checkpoint does not fit model digits_cnn\n"
    )
    with pytest.raises(CheckpointError, match="does not fit model digits_cnn"):
        run_model._num_classes("digits_cnn", state["student"], "x")


# --- the engine (`resolve_device`, `load_data`, `_NoMetrics`) ------------------------------------


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """`--device cuda` under torchrun: process LOCAL_RANK=1 of 2 trains on cuda:1
    (`engine.resolve_device`; CUDA's presence simulated: a torch.device needs no GPU). Would break:
    every process on cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert engine.resolve_device("cuda") == torch.device("cuda", 1)
    assert engine.resolve_device("auto") == torch.device("cuda", 1)
    assert engine.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert engine.resolve_device("cuda") == torch.device("cuda")


def test_the_unlabeled_dir_reaches_the_datasets_reader(tmp_path):
    """imagenet-full with an unlabeled_dir reads its unlabeled images from that folder, at the run's
    image_size (`engine.load_data`); without it, the unlabeled set is the training images. Would
    break: the option dropped, and the run's own unlabeled images silently not used."""
    data = write_imagenet(tmp_path / "imagenet", {"n01": 3, "n02": 2}, {"n01": 1, "n02": 1})
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 60, 10, 200)).save(unlabeled / f"u{i}.png")
    cfg = TrainConfig(
        dataset="imagenet-full", data_dir=str(data), unlabeled_dir=str(unlabeled), image_size=8
    )
    split = engine.load_data(cfg)
    assert len(split.x_unlabeled) == 3
    assert split.x_unlabeled.root == unlabeled
    first = split.x_unlabeled[0]
    assert first.shape == (8, 8, 3) and first[0, 0].tolist() == [0, 10, 200]
    without = engine.load_data(
        TrainConfig(dataset="imagenet-full", data_dir=str(data), image_size=8)
    )
    assert len(without.x_unlabeled) == 5


def test_the_metrics_log_of_the_other_ranks_writes_nothing(tmp_path, monkeypatch):
    """Ranks other than 0 log through _NoMetrics: logging and the folder check do nothing
    (engine.py's `_NoMetrics`). Would break: a rank other than 0 writing (or failing on) the run
    folder."""
    monkeypatch.chdir(tmp_path)
    with engine._NoMetrics() as metrics:
        assert metrics.log(1, {"loss": 0.5}) is None
        metrics.check_folder()
    assert list(tmp_path.iterdir()) == []
