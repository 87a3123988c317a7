"""Kill hand-made mutants of :mod:`metapl.predict`, :mod:`metapl.export`,
:mod:`metapl.train.run_model` and :mod:`metapl.train.large_teacher` that survived the rest of the
suite (tests/test_predict_export.py above all); each test is what a surviving mutant broke unseen:

- the progress bar of `metapl predict` is off for a single batch, exactly ``BATCH`` images
  included;
- an unreadable image's error says why PIL could not read it, not just "unreadable";
- an output file under a file (not a folder) is named as such, by predict and by export;
- the export's check of its trace uses its own random generator, and notices a difference of a
  hundredth in the probabilities, not only gross ones;
- a folder with config.json but no checkpoint.pt is "not a run folder"; every file `metapl
  train` writes in a run (the previous checkpoint, Figure 10's data, a large teacher's files, tb/)
  is refused as an output, and the same names elsewhere are not;
- a checkpoint without the classifier's weights, or without any weights, is a CheckpointError
  (was a KeyError or TypeError traceback); the loaded model asks for no gradients;
- a missing large teacher is named by its option; ReducedMPL's selection drops the tuning
  images' indices into the whole pool, passes ``progress`` on, keeps an image folder lazy, and a
  teacher that cannot take the images is one line.

Most tests need no trained run: a run folder is made by hand (a fresh digits_cnn as a finished
1-step run), or the large teacher and its precompute are stubbed. The first test that loads a run
pays torch's one-off start-up of the meta device (a few seconds on a loaded machine), as any
first load_run_model in a process does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metapl import export as export_command
from metapl import predict as predict_command
from metapl.cli import main
from metapl.errors import CheckpointError, ConfigError, DataError
from metapl.models import create_model
from metapl.predict import read_images
from metapl.report import check_output_file
from metapl.train.checkpoint import FORMAT_VERSION, save_checkpoint
from metapl.train.config import TrainConfig, apply_overrides
from metapl.train.large_teacher import load_large_teacher
from metapl.train.run_model import (
    InputSpec,
    check_not_a_run_file,
    check_run_folder,
    load_run_model,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_the_progress_bar_is_off_for_one_batch_exactly_full():
    """One batch is classified in one go: no bar for up to BATCH images, the terminal's choice
    (None) from BATCH + 1 on."""
    batch = predict_command.BATCH
    assert predict_command._bar_disabled(1) is True
    assert predict_command._bar_disabled(batch) is True
    assert predict_command._bar_disabled(batch + 1) is None


def test_an_unreadable_image_says_why(tmp_path):
    """The error keeps PIL's own reason (the decoder raises "from None", keeping it only as the
    context), so a truncated or mislabelled file is told from a missing one."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError) as info:
        read_images([str(bad)], InputSpec(8, 1))
    message = str(info.value)
    assert message.startswith(f"{bad} is not a readable image (UnidentifiedImageError: ")
    assert message.endswith("; expected a PNG or JPEG file")


def test_an_output_under_a_file_says_the_file_is_no_folder(tmp_path):
    """--json notes.txt/p.json: the parent is a file, which the message says (not "does not
    exist", which sent users looking for a folder that is there, as a file)."""
    parent = tmp_path / "notes.txt"
    parent.write_text("a file")
    with pytest.raises(ConfigError, match=f"--json {parent}/p.json: {parent} is a file, not a"):
        check_output_file(str(parent / "p.json"), "--json")
    with pytest.raises(ConfigError, match=f"folder {tmp_path}/no does not exist"):
        check_output_file(str(tmp_path / "no" / "p.json"), "--json")


def test_an_export_under_a_file_says_the_file_is_no_folder(capsys, tmp_path):
    """As for predict's --json: --output notes.txt/m.pt names the file that is in the way. (The
    refusal comes before the run is loaded: the run folder here only has its two files' names.)"""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "checkpoint.pt"):
        (run / name).write_text("")
    parent = tmp_path / "notes.txt"
    parent.write_text("a file")
    argv = ["export", "--run", str(run), "--format", "torchscript"]
    assert main([*argv, "--output", str(parent / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"metapl export: error: --output {parent}/m.pt: {parent} is a file, not a folder\n"
    )


class _Softmax(torch.nn.Module):
    def forward(self, images):
        return torch.softmax(images.float().flatten(1), dim=-1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_checking_the_trace_leaves_the_global_random_state_alone():
    """The export checks its trace on random pixels of its own generator: a script that seeds
    torch, exports, then trains or samples gets the numbers it got without the export."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    export_command._trace(_Softmax(), torch.zeros((2, 8, 8, 1), dtype=torch.uint8))
    assert torch.equal(torch.rand(4), expected)


# --- run_model: a run folder made by hand (a digits_cnn "trained" for 1 step) -----------------


def _hand_made_run(folder: Path, **state) -> Path:
    """config.json and checkpoint.pt of a finished 1-step digits run; ``state`` replaces the
    checkpoint's entries (None deletes one). No fingerprint: held to its architecture only."""
    folder.mkdir(parents=True)
    cfg = apply_overrides(TrainConfig(), {"dataset": "digits", "model": "digits_cnn", "steps": 1})
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    student = create_model("digits_cnn", 10).state_dict()
    checkpoint = {"format_version": FORMAT_VERSION, "step": 1, "student": student, **state}
    save_checkpoint(
        folder / "checkpoint.pt", {k: v for k, v in checkpoint.items() if v is not None}
    )
    return folder


def test_a_folder_with_a_config_but_no_checkpoint_is_not_a_run_folder(tmp_path):
    """config.json alone (a run killed before its first checkpoint, or a copied config) is named
    as what it is, before anything tries to read a checkpoint."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a `metapl train` run folder"):
        check_run_folder(tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "checkpoint.pt",
        "checkpoint.prev.pt",
        "config.json",
        "classes.json",
        "metrics.csv",
        "results.json",
        "figure10.json",
        "curves.png",
        "large_teacher_unlabeled.npy",
        "tb/events.out.tfevents.1",
    ],
)
def test_every_file_train_writes_in_the_run_is_refused_as_an_output(tmp_path, name):
    """`--json`/`--output` naming any file `metapl train` wrote in the run (the previous checkpoint
    and Figure 10's data too, a large teacher's distributions, TensorBoard's logs) would replace
    it; the same name in another folder is an output like any other."""
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="would replace a file that `metapl train` wrote"):
        check_not_a_run_file(run / name, run, "--json")
    check_not_a_run_file(tmp_path / "elsewhere" / name, run, "--json")


def test_a_checkpoint_without_the_classifier_is_a_checkpoint_error(tmp_path):
    """Was a KeyError traceback: the class count is read from the classifier's weights."""
    student = create_model("digits_cnn", 10).state_dict()
    del student["fc.weight"]
    run = _hand_made_run(tmp_path / "run", student=student)
    with pytest.raises(CheckpointError, match="its checkpoint lacks fc.weight of model digits_cnn"):
        load_run_model(run)


def test_a_checkpoint_without_weights_is_a_checkpoint_error(tmp_path):
    """A checkpoint with neither EMA nor student weights (hand-made, or of another program) was a
    TypeError traceback."""
    run = _hand_made_run(tmp_path / "run", student=None)
    with pytest.raises(CheckpointError, match="holds no student weights"):
        load_run_model(run)


def test_the_loaded_model_is_frozen(tmp_path):
    """The reported model is for inference (predict, export, ReducedMPL's large teacher): no
    parameter asks for gradients, so no forward builds an autograd graph around it."""
    loaded = load_run_model(_hand_made_run(tmp_path / "run"))
    assert loaded.num_classes == 10 and loaded.weights == "student"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    out = loaded.model(torch.zeros(2, 1, 8, 8))
    assert out.shape == (2, 10) and out.grad_fn is None


def test_a_missing_large_teacher_is_named_by_its_option(tmp_path):
    """The error says `large_teacher=DIR`, the option the user set, not "run folder DIR"."""
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=rf"^large_teacher={missing} does not exist"):
        load_large_teacher(missing, 10, torch.device("cpu"))


# --- large_teacher: ReducedMPL's consumer of a run's model -------------------------------------


def _small_split(**fields):
    """A digits-shaped split of random pixels: 10 labeled and 40 unlabeled 8x8 grayscale images."""
    from metapl.data.splits import SSLSplit

    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (50, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(10)
    empty = labels[:0]
    split = SSLSplit(
        images[:10], labels, images[10:], images[:0], empty, images[:2], labels[:2], 10, "tiny"
    )
    return dataclasses.replace(split, **fields)


def _stub_teacher(monkeypatch) -> np.ndarray:
    """No teacher to load and no precompute: the 40 unlabeled images of :func:`_small_split` get
    the returned random distributions (the labeled ones uniform ones)."""
    import metapl.train.large_teacher as large_teacher_mod

    pool = np.random.RandomState(0).dirichlet(np.ones(10), size=40).astype(np.float32)

    def precompute(model, images, out_path, **kwargs):
        return pool if len(images) == 40 else np.full((len(images), 10), 0.1, np.float32)

    monkeypatch.setattr(large_teacher_mod, "precompute_distributions", precompute)
    monkeypatch.setattr(large_teacher_mod, "load_large_teacher", lambda *a: torch.nn.Identity())
    monkeypatch.setattr(large_teacher_mod.gc, "collect", lambda: 0)  # no teacher to free
    return pool


def _teacher_config(teacher: Path, **overrides):
    return apply_overrides(
        TrainConfig(),
        {"dataset": "digits", "large_teacher": str(teacher), "eval_batch_size": 512, **overrides},
    )


def test_the_selection_forgets_where_the_tuning_images_were(tmp_path, monkeypatch):
    """Where the unlabeled pool holds the tuning images (cifar10-4k, ImageNet-%), their indices
    address the whole pool: after the top-K selection they would point at other images (or past
    the end), so tuning_view dropped the wrong ones. The selected set holds them no more."""
    import gc

    from metapl.train.large_teacher import prepare_large_teacher_data

    monkeypatch.setattr(gc, "collect", lambda: 0)  # a 1-layer teacher: nothing worth freeing
    teacher = _hand_made_run(tmp_path / "teacher")
    split = _small_split(tune_in_unlabeled=np.arange(37, 40))  # the pool's last 3
    cfg = _teacher_config(teacher, unlabeled_per_class=2)
    kept, (probs_l, probs_u) = prepare_large_teacher_data(cfg, split, tmp_path, torch.device("cpu"))
    assert len(kept.x_unlabeled) == len(probs_u) == 20 and len(probs_l) == 10
    assert kept.tune_in_unlabeled is None


def test_the_precompute_shows_progress_when_asked(tmp_path, monkeypatch):
    """prepare_large_teacher_data(progress=True) (a run not --quiet) passes it on to both
    precomputes, whose bars are then shown; progress=False keeps them quiet."""
    import metapl.train.large_teacher as large_teacher_mod

    _stub_teacher(monkeypatch)
    real, seen = large_teacher_mod.precompute_distributions, []

    def recording(*args, **kwargs):
        seen.append(kwargs["progress"])
        return real(*args, **kwargs)

    monkeypatch.setattr(large_teacher_mod, "precompute_distributions", recording)
    split = _small_split()
    for progress in (True, False):
        large_teacher_mod.prepare_large_teacher_data(
            _teacher_config(tmp_path / "teacher"),
            split,
            tmp_path,
            torch.device("cpu"),
            progress=progress,
        )
    assert seen == [True, True, False, False]


class _Refusing(torch.nn.Module):
    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    def forward(self, x):
        raise self.error


@pytest.mark.parametrize(
    "error, reason",
    [
        (RuntimeError("shapes do not match\n  at layer fc\n  more detail"), "shapes do not match;"),
        (ValueError(), "ValueError;"),
    ],
)
def test_a_teacher_that_cannot_take_the_images_is_one_line(tmp_path, monkeypatch, error, reason):
    """The error keeps the first line of torch's message (or the exception's name when it has
    none): it is printed as one line, `metapl train: error: ...`."""
    import metapl.train.large_teacher as large_teacher_mod

    monkeypatch.setattr(large_teacher_mod, "load_large_teacher", lambda *a: _Refusing(error))
    with pytest.raises(ConfigError) as info:
        large_teacher_mod.check_large_teacher(tmp_path, _small_split(), torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message
    assert (
        f"cannot take this run's images (1 channel, 8x8): {reason} give the run folder" in message
    )


class _SlightlyFrozen(torch.nn.Module):
    """Probabilities that move by a hundredth per image of the batch, which tracing freezes."""

    def forward(self, images):
        shift = 0.01 * len(images) * torch.tensor([1.0, -1.0])
        return (0.25 + shift).expand(images.shape[0], 2)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_the_trace_check_catches_a_small_difference_in_probabilities():
    """The exported model returns probabilities (0 to 1): its check against the model on another
    batch size must notice a difference of 0.01, not only gross ones."""
    example = torch.zeros((2, 8, 8, 1), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="differs from the model on another batch size"):
        export_command._trace(_SlightlyFrozen(), example)


def test_a_selected_image_folder_stays_on_disk(tmp_path, monkeypatch):
    """An unlabeled folder (ImageNet-size, say) is read lazily: the top-K selection keeps the
    chosen files as a lazy set, in the selection's order, rather than decoding them all into
    memory at once."""
    from PIL import Image

    import metapl.train.large_teacher as large_teacher_mod
    from metapl.data.folder import FolderImages
    from metapl.reduced.select import top_k_per_class

    paths = []
    for i in range(40):
        paths.append(str(tmp_path / f"u{i:02d}.png"))
        Image.fromarray(np.full((8, 8), i, np.uint8), "L").save(paths[-1])
    pool = _stub_teacher(monkeypatch)
    split = _small_split(x_unlabeled=FolderImages(paths, 8, root=tmp_path))
    cfg = _teacher_config(tmp_path / "teacher", unlabeled_per_class=2)
    kept, (_, probs_u) = large_teacher_mod.prepare_large_teacher_data(
        cfg, split, tmp_path, torch.device("cpu")
    )
    keep = top_k_per_class(pool, 2)
    assert isinstance(kept.x_unlabeled, FolderImages)
    assert kept.x_unlabeled.paths == [paths[i] for i in keep]
    assert np.array_equal(probs_u, pool[keep])


def test_without_a_selection_every_unlabeled_image_is_kept(tmp_path, monkeypatch):
    """unlabeled_per_class=0 (the default) means no top-K selection: the whole pool, with its
    distributions row for row (a selection of 0 per class was an error or an empty pool)."""
    import metapl.train.large_teacher as large_teacher_mod

    pool = _stub_teacher(monkeypatch)
    split = _small_split()
    cfg = _teacher_config(tmp_path / "teacher")
    assert cfg.unlabeled_per_class == 0
    kept, (_, probs_u) = large_teacher_mod.prepare_large_teacher_data(
        cfg, split, tmp_path, torch.device("cpu")
    )
    assert kept.x_unlabeled is split.x_unlabeled and np.array_equal(probs_u, pool)
