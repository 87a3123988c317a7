"""`metapl predict` and `metapl export` on a tiny digits run trained through the command line.

What must hold: the model is the run's reported one (here its EMA); image files become exactly the
pixels the run evaluated on, so predict's probabilities are the model's own outputs on the same
arrays; the exported file (preprocessing and softmax inside) returns the same numbers; and every
user mistake is one line on stderr with exit code 2, with nothing half-written.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from metapl import export as export_command
from metapl.cli import main
from metapl.data.arrays import to_tensor_nchw
from metapl.data.digits import digits_split
from metapl.errors import CheckpointError
from metapl.predict import read_images
from metapl.train.checkpoint import config_fingerprint, load_checkpoint, save_checkpoint
from metapl.train.config import TrainConfig
from metapl.train.data import evaluate, model_input
from metapl.train.large_teacher import load_large_teacher
from metapl.train.run_model import load_run_model, pixels_to_input

pytestmark = [
    pytest.mark.usefixtures("single_torch_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated"),  # 2.13 and 2.14's category
]

SEED = 2
TINY = {
    "warmup_steps": 2,
    "batch_size": 10,
    "log_every": 2,
    "eval_every": 4,
    "checkpoint_every": 4,
    "ema_decay": 0.5,  # the reported model is the EMA: predict and export must pick it
    "student_lr": 0.1,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, single_torch_thread) -> Path:
    out = tmp_path_factory.mktemp("predict") / "run"
    args = ["train", "--preset", "digits-supervised", "--out", str(out), "--steps", "8"]
    args += ["--device", "cpu", "--seed", str(SEED), "--quiet"]
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return digits_split(SEED, 5).x_test[:7]  # uint8 [7, 8, 8, 1], as the run evaluated them


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, digits) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, image in enumerate(digits[:5]):
        Image.fromarray(image[..., 0], "L").save(folder / f"d{i}.png")
    return folder


def reference(run: Path, pixels: np.ndarray) -> np.ndarray:
    """The run's reported model on ``pixels`` through the training code's preprocessing."""
    model = load_run_model(run).model
    with torch.no_grad():
        return torch.softmax(model(to_tensor_nchw(pixels)), -1).numpy()


def predict(capsys, run: Path, *args: str) -> list[list[str]]:
    assert main(["predict", "--run", str(run), "--device", "cpu", *args]) == 0
    return [line.split("\t") for line in capsys.readouterr().out.splitlines()]


def fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"metapl {argv[0]}: error: "), err
    return err


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


# --- the model and its input -------------------------------------------------------------------


def test_the_loaded_model_is_the_reported_one(run_dir):
    loaded = load_run_model(run_dir)
    assert (loaded.weights, loaded.step, loaded.finished, loaded.num_classes) == (
        "ema",
        8,
        True,
        10,
    )
    ema = load_checkpoint(run_dir / "checkpoint.pt")["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in loaded.model.state_dict().items())
    (record,) = json.loads((run_dir / "results.json").read_text())["results"]
    split = digits_split(SEED, 5)
    cfg = TrainConfig(eval_batch_size=512)
    accuracy = evaluate(loaded.model, split.x_test, split.y_test, cfg, torch.device("cpu"))
    assert accuracy == record["accuracy"]
    assert (loaded.spec.resolution, loaded.spec.channels) == (8, 1)


def test_batches_decode_ahead_and_an_unreadable_file_fails_at_its_batch(
    image_dir, run_dir, tmp_path, capsys, monkeypatch
):
    """Each batch's files decode while the model classifies the batch before; the batches before
    an unreadable file are printed, and the error names the first such file in order."""
    import metapl.predict as predict_module
    from metapl.data import decoding

    monkeypatch.setattr(predict_module, "BATCH", 2)
    submitted = []
    real_submit = decoding.submit

    def spy(images, indices):
        submitted.append(list(indices))
        return real_submit(images, indices)

    monkeypatch.setattr(decoding, "submit", spy)
    good = [str(image_dir / f"d{i}.png") for i in range(5)]
    rows = predict(capsys, run_dir, *good)
    assert [r[0] for r in rows] == good and submitted == [[0, 1], [2, 3], [4]]
    bad, worse = tmp_path / "bad.png", tmp_path / "worse.png"
    bad.write_bytes(b"no png")
    worse.write_bytes(b"no png either")
    paths = [*good[:3], str(bad), str(worse)]
    assert main(["predict", "--run", str(run_dir), "--device", "cpu", *paths]) == 2
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == good[:2]
    assert f"{bad} is not a readable image" in captured.err and str(worse) not in captured.err


def test_files_decode_to_the_evaluated_pixels(image_dir, digits, run_dir):
    paths = [str(image_dir / f"d{i}.png") for i in range(5)]
    assert np.array_equal(read_images(paths, load_run_model(run_dir).spec), digits[:5])
    # The exported model's tensor preprocessing is the training code's, bit for bit.
    expected = model_input(digits, torch.device("cpu"))
    assert torch.equal(pixels_to_input(torch.from_numpy(digits)), expected)
    assert torch.equal(expected, to_tensor_nchw(digits))


def test_large_teacher_uses_the_same_loader(run_dir):
    model = load_large_teacher(run_dir, 10, torch.device("cpu"))
    assert not model.training
    with pytest.raises(CheckpointError, match="predicts 10 classes"):
        load_large_teacher(run_dir, 3, torch.device("cpu"))


# --- predict -----------------------------------------------------------------------------------


def test_predict_prints_the_models_probabilities(capsys, run_dir, image_dir, digits, tmp_path):
    paths = [str(image_dir / f"d{i}.png") for i in range(5)]
    json_path = tmp_path / "predictions.json"
    rows = predict(capsys, run_dir, *paths, "--top", "10", "--json", str(json_path))
    expected = reference(run_dir, digits[:5])
    assert [row[0] for row in rows] == paths
    for row, probs in zip(rows, expected):
        classes = [int(c) for c in row[1::2]]
        printed = np.array([float(p) for p in row[2::2]])
        assert classes[0] == probs.argmax() and sorted(classes) == list(range(10))
        assert np.allclose(printed, probs[classes], atol=5e-5, rtol=0)
        assert np.all(np.diff(printed) <= 0) and printed.sum() == pytest.approx(1, abs=1e-3)
    saved = json.loads(json_path.read_text())
    assert (saved["model"], saved["step"], saved["finished"]) == ("ema", 8, True)
    for record, probs in zip(saved["predictions"], expected):
        top = record["top"]
        got = np.array([t["probability"] for t in top])
        assert np.allclose(got, probs[[t["index"] for t in top]], atol=1e-6, rtol=0)
        assert np.all((0 <= got) & (got <= 1)) and got.sum() == pytest.approx(1, abs=1e-5)
        assert [t["class"] for t in top] == [str(t["index"]) for t in top]


def test_predict_on_a_folder(capsys, run_dir, image_dir, digits, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(image_dir, folder)
    (folder / "sub").mkdir()
    gray = Image.fromarray(digits[5][..., 0], "L")
    gray.convert("RGB").save(folder / "sub" / "rgb.png")  # RGB files become the same grayscale
    gray.resize((24, 24), Image.Resampling.NEAREST).save(folder / "sub" / "big.JPG")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"skipped")
    rows = predict(capsys, run_dir, str(folder))
    names = ["d0.png", "d1.png", "d2.png", "d3.png", "d4.png", "sub/big.JPG", "sub/rgb.png"]
    assert [row[0] for row in rows] == [str(folder / n) for n in names]
    assert all(len(row) == 3 for row in rows)  # path, class, probability
    expected = reference(run_dir, digits[[0, 1, 2, 3, 4, 5]])
    assert [int(row[1]) for row in rows[:5]] == list(expected[:5].argmax(-1))
    assert int(rows[6][1]) == expected[5].argmax()
    assert float(rows[6][2]) == pytest.approx(expected[5].max(), abs=5e-5)


def test_progress_bar_leaves_the_printed_lines_whole(capsys, monkeypatch, run_dir, image_dir):
    """Many batches with the bar on (as on a terminal): stdout holds exactly the lines, in order,
    and the bar with its count goes to stderr."""
    import metapl.predict

    monkeypatch.setattr(metapl.predict, "BATCH", 2)
    monkeypatch.setattr(metapl.predict, "_bar_disabled", lambda n: False)
    paths = [str(image_dir / f"d{i}.png") for i in range(5)]
    assert main(["predict", "--run", str(run_dir), "--device", "cpu", *paths]) == 0
    captured = capsys.readouterr()
    rows = [line.split("\t") for line in captured.out.splitlines()]
    assert [row[0] for row in rows] == paths and all(len(row) == 3 for row in rows)
    assert "metapl predict" in captured.err and "5/5" in captured.err


def test_class_names_from_classes_json(capsys, run_dir, image_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    names = [f"digit {i}" for i in range(10)]
    (run / "classes.json").write_text(json.dumps(names))
    rows = predict(capsys, run, str(image_dir / "d0.png"), "--top", "2")
    assert rows[0][1] in names and rows[0][3] in names
    (run / "classes.json").write_text(json.dumps(names[:3]))
    err = fails(capsys, "predict", "--run", str(run), str(image_dir))
    assert "classes.json names 3 classes" in err


# --- export ------------------------------------------------------------------------------------


def test_torchscript_export_matches_the_model(capsys, run_dir, digits, tmp_path):
    out = tmp_path / "digits.pt"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert (  # the format's name in any case: "TorchScript" was refused
            main(["export", "--run", str(run_dir), "--format", "TorchScript", "--output", str(out)])
            == 0
        )
    # torch's TorchScript deprecation is not the user's to act on (torch 2.14's FutureWarning
    # got through a filter for 2.13's DeprecationWarning)
    assert not [w for w in shown if "torch.jit" in str(w.message)]
    printed = capsys.readouterr().out
    assert "uint8 [N, 8, 8, 1]" in printed and "[N, 10]" in printed
    extra = {"metapl.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    info = json.loads(extra["metapl.json"])
    assert info["classes"] == [str(i) for i in range(10)] and "EMA" in info["model"]
    for batch in (digits[:1], digits):
        with torch.no_grad():
            got = loaded(torch.from_numpy(batch)).numpy()
        assert got.dtype == np.float32 and got.shape == (len(batch), 10)
        assert np.allclose(got, reference(run_dir, batch), rtol=1e-5, atol=1e-7)
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left


def test_onnx_export_matches_the_model(capsys, run_dir, digits, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "digits.onnx"
    assert main(["export", "--run", str(run_dir), "--format", "onnx", "--output", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == [str(i) for i in range(10)]
    for batch in (digits[:1], digits):
        (got,) = session.run(["probabilities"], {"images": batch})
        assert np.allclose(got, reference(run_dir, batch), rtol=1e-5, atol=1e-6)
    assert list(tmp_path.iterdir()) == [out]


def test_onnx_without_its_packages_is_one_line(capsys, run_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(export_command, "ONNX_PACKAGES", ("onnx", "metapl_not_installed"))
    out = tmp_path / "m.onnx"
    err = fails(capsys, "export", "--run", str(run_dir), "--format", "onnx", "--output", str(out))
    assert "metapl_not_installed" in err and "pip install" in err
    assert not out.exists()


def test_a_failed_export_leaves_the_old_file(capsys, run_dir, monkeypatch, tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"previous export")

    def broken_save(module, f, **kwargs):  # a full disk, midway (torch.save wraps the OSError)
        f.write(b"half a model")
        try:
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from exc

    monkeypatch.setattr(torch.jit, "save", broken_save)
    err = fails(
        capsys, "export", "--run", str(run_dir), "--format", "torchscript", "--output", str(out)
    )
    assert f"could not write {out}: No space left on device" in err, err
    assert "the model.pt there before is unchanged" in err
    assert out.read_bytes() == b"previous export" and list(tmp_path.iterdir()) == [out]


# --- mistakes: one line, exit code 2 -----------------------------------------------------------


def test_unfinished_run_is_refused_unless_allowed(capsys, run_dir, image_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "steps": 100}))  # as if killed at 8
    err = fails(capsys, "predict", "--run", str(run), str(image_dir))
    assert "stopped at step 8 of 100" in err and "--allow-unfinished" in err
    err = fails(capsys, "export", "--run", str(run), "--format", "torchscript")
    assert "stopped at step 8 of 100" in err and not (run / "model.torchscript.pt").exists()
    assert main(["predict", "--run", str(run), str(image_dir), "--allow-unfinished"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 5 and "unfinished (step 8 of 100)" in captured.err


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--run", "{tmp}/nowhere", "{tmp}/missing.png", "--top", "0"],
        ["predict", "--run", "{tmp}/nowhere", "{images}", "--json", "{tmp}/no/p.json"],
        ["export", "--run", "{tmp}/nowhere", "--format", "savedmodel"],
        ["export", "--run", "{tmp}/nowhere", "--format", "onnx", "--output", "{tmp}/no/m.onnx"],
    ],
)
def test_a_missing_run_folder_is_reported_before_the_other_mistakes(capsys, tmp_path, argv):
    """A mistyped --run is the basic mistake: predict named the missing image (or --top, --json)
    first, so fixing that led to a second error about the run."""
    values = {"tmp": str(tmp_path), "images": str(tmp_path)}
    err = fails(capsys, *(a.format(**values) for a in argv))
    assert f"run folder {tmp_path / 'nowhere'} does not exist" in err, err


def test_corrupt_checkpoint(capsys, run_dir, image_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert "corrupt" in fails(capsys, "predict", "--run", str(run), str(image_dir))
    assert "corrupt" in fails(capsys, "export", "--run", str(run), "--format", "torchscript")


def test_an_exported_model_in_the_checkpoints_place_says_so(
    capsys, run_dir, image_dir, tmp_path, recwarn
):
    """A TorchScript file as checkpoint.pt (an export copied over it): torch.load printed its
    UserWarning ('received a zip file that looks like a TorchScript archive') on stderr above the
    error, which gave torch's advice cut off mid-sentence ('In PyTorch 2.6, we changed the d...')."""
    run = copy_run(run_dir, tmp_path)
    model = tmp_path / "model.torchscript.pt"
    assert (
        main(["export", "--run", str(run), "--format", "torchscript", "--output", str(model)]) == 0
    )
    shutil.copyfile(model, run / "checkpoint.pt")
    capsys.readouterr()
    recwarn.clear()
    for argv in (["predict", "--run", str(run), str(image_dir)], ["train", "--out", str(run)]):
        if argv[0] == "train":
            argv += ["--preset", "digits-supervised", "--steps", "8", "--device", "cpu"]
            argv += ["--seed", str(SEED), "--quiet"]
            argv += [f"--set={key}={value}" for key, value in TINY.items()]
        err = fails(capsys, *argv)
        assert (
            "(it is a TorchScript model, such as `metapl export` writes, not a checkpoint)" in err
        )
        assert f"mv {run / 'checkpoint.prev.pt'} {run / 'checkpoint.pt'}" in err, err
    assert not [w for w in recwarn if "TorchScript" in str(w.message)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--run", "{tmp}/nowhere", "{images}"], "does not exist"),
        (["predict", "--run", "{tmp}", "{images}"], "is not a `metapl train` run folder"),
        (["export", "--run", "{tmp}/nowhere", "--format", "torchscript"], "does not exist"),
        (["predict", "--run", "{run}", "{tmp}/missing.png"], "missing.png does not exist"),
        (["predict", "--run", "{run}", "{tmp}/empty"], "has no images"),
        (["predict", "--run", "{run}", "{tmp}/bad.png"], "bad.png is not a readable image"),
        (["predict", "--run", "{run}", "{images}", "--top", "0"], "--top must be >= 1"),
        (["predict", "--run", "{run}", "{images}", "--json", "{tmp}/no/p.json"], "does not exist"),
        (["export", "--run", "{run}", "--format", "savedmodel"], "expected one of torchscript"),
        (
            ["export", "--run", "{run}", "--format", "torchscript", "--output", "{tmp}/no/m.pt"],
            "folder",
        ),
        (["export", "--run", "{run}", "--format", "torchscript", "--output", "{tmp}"], "folder"),
        # an empty name: export wrote the default file, predict called it "--json . is a folder"
        (["export", "--run", "{run}", "--format", "torchscript", "--output", ""], "is empty"),
        (["export", "--run", "{run}", "--format", "torchscript", "--output", " "], "is empty"),
        # a TorchScript file named .onnx (and the other way round) was written without a word
        (
            ["export", "--run", "{run}", "--format", "torchscript", "--output", "{tmp}/m.onnx"],
            "names an onnx file, but --format is torchscript",
        ),
        (
            ["export", "--run", "{run}", "--format", "ONNX", "--output", "{tmp}/m.PT"],
            "names a torchscript file, but --format is onnx",
        ),
        (["predict", "--run", "{run}", "{images}", "--json", " "], "--json is empty"),
        # a folder's name, meant as one to create: a file of that name was written
        (["predict", "--run", "{run}", "{images}", "--json", "new/"], "ends with a /"),
        (["export", "--run", "{run}", "--format", "onnx", "--output", "new/"], "ends with a /"),
        # classified every image under the current folder
        (["predict", "--run", "{run}", "{images}", ""], "an IMAGE argument is empty"),
        (["predict", "--run", "{run}", "{images}", " "], "an IMAGE argument is empty"),
    ],
)
def test_mistakes_are_one_line(capsys, monkeypatch, run_dir, image_dir, tmp_path, argv, message):
    """Nothing is written into the run, nor into the current folder (an empty name is that folder:
    a test run from the repository's root once left a predictions file named " " there)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    values = {"tmp": str(tmp_path), "run": str(run_dir), "images": str(image_dir)}
    before = sorted(p.name for p in run_dir.iterdir())
    err = fails(capsys, *(a.format(**values) for a in argv))
    assert message in err
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written into the run
    assert not (tmp_path / "no").exists()
    assert not list((tmp_path / "cwd").iterdir())


# --- the audit's additions: what a wrong change left passing above ------------------------------


def test_a_run_one_step_short_is_unfinished(capsys, run_dir, image_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "steps": 9}))
    assert "stopped at step 8 of 9" in fails(capsys, "predict", "--run", str(run), str(image_dir))


def test_predict_json_of_an_unfinished_run_and_top_above_the_class_count(
    capsys, run_dir, image_dir, tmp_path
):
    """--top 20 of 10 classes shows the 10; the JSON says the input the model takes and that the
    run is unfinished."""
    run = copy_run(run_dir, tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "steps": 100}))
    out = tmp_path / "p.json"
    args = [str(image_dir / "d0.png"), "--top", "20", "--json", str(out), "--allow-unfinished"]
    (row,) = predict(capsys, run, *args)
    assert len(row) == 1 + 2 * 10 and sorted(int(c) for c in row[1::2]) == list(range(10))
    saved = json.loads(out.read_text())
    assert (saved["finished"], saved["step"]) == (False, 8)
    assert saved["input"] == "uint8 [N, 8, 8, 1] (grayscale, 0..255)"
    assert len(saved["predictions"][0]["top"]) == 10


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--run", "{run}", "{images}", "--json", "{folder}/p.json"],
        ["export", "--run", "{run}", "--format", "torchscript", "--output", "{folder}/m.pt"],
        ["export", "--run", "{folder}", "--format", "torchscript"],  # beside a read-only run
    ],
)
@pytest.mark.parametrize("denied", ["write", "search"])
def test_an_output_file_in_a_folder_it_cannot_write_is_one_line(
    capsys, monkeypatch, run_dir, image_dir, tmp_path, argv, denied
):
    """Was a PermissionError (or a read-only file system's OSError) traceback once the images were
    classified or the model traced. os.access is what tells: chmod alone does not stop root. A
    folder that may be written but not searched (mode 0o666: no x) takes no new file either."""
    import os

    folder = copy_run(run_dir, tmp_path)
    access = os.access
    bits = os.X_OK if denied == "search" else os.W_OK | os.X_OK

    def allowed(p, mode):
        return not (Path(p) == folder and mode & bits) and access(p, mode)

    monkeypatch.setattr(os, "access", allowed)
    values = {"run": str(run_dir), "images": str(image_dir), "folder": str(folder)}
    err = fails(capsys, *(a.format(**values) for a in argv))
    assert f"folder {folder} is not writable" in err, err


def test_predict_json_into_a_folder_is_one_line(capsys, run_dir, image_dir, tmp_path):
    err = fails(capsys, "predict", "--run", str(run_dir), str(image_dir), "--json", str(tmp_path))
    assert f"--json {tmp_path} is a folder; give a file name" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--run", "{run}", "{images}", "--json", "{run}/checkpoint.pt"],
        ["predict", "--run", "{run}", "{images}", "--json", "{run}/results.json"],
        ["predict", "--run", "{run}", "{images}", "--json", "{run}/../copy/config.json"],
        ["export", "--run", "{run}", "--format", "torchscript", "--output", "{run}/checkpoint.pt"],
        ["export", "--run", "{run}", "--format", "onnx", "--output", "{run}/tb/m.onnx"],
    ],
)
def test_an_output_file_that_is_one_of_the_runs_files_is_refused(
    capsys, run_dir, image_dir, tmp_path, argv
):
    """`metapl predict --json RUN/checkpoint.pt` replaced the run's checkpoint with its predictions
    (and `metapl export --output RUN/checkpoint.pt` with the exported model), exit code 0: the run
    could then neither be resumed nor used by predict and export again."""
    run = copy_run(run_dir, tmp_path)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    argv = [a.format(run=run, images=image_dir) for a in argv]
    err = fails(capsys, *argv)
    assert f"{argv[-1]} would replace a file that `metapl train` wrote in the run folder" in err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    # a file of another name beside them is an output like any other
    if "onnx" in argv:  # the export itself needs the onnx extra (the refusal above does not)
        pytest.importorskip("onnxscript")
    assert main([*argv[:-1], str(run / "out.onnx" if "onnx" in argv else run / "out.json")]) == 0


EXPORT_TORCHSCRIPT = ["export", "--run", "{run}", "--format", "torchscript", "--output"]


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--run", "{run}", "{images}", "--json", "{other}/results.json"],
        [*EXPORT_TORCHSCRIPT, "{other}/results.json"],
        [*EXPORT_TORCHSCRIPT, "{other}/checkpoint.pt"],
        ["predict", "--run", "{run}", "{images}", "--json", "{experiment}/results.json"],
        [*EXPORT_TORCHSCRIPT, "{experiment}/twomoons.png"],
    ],
)
def test_an_output_file_that_another_command_wrote_is_refused(
    capsys, run_dir, image_dir, tmp_path, argv
):
    """`metapl predict --run A --json B/results.json` replaced run B's results with A's predictions
    (and `metapl export --output B/results.json` with a TorchScript zip), exit code 0: the guard
    knew only the files of --run's own folder. The folder of another command's results is refused
    the same way."""
    other = copy_run(run_dir, tmp_path)  # another finished run
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    (experiment / "results.json").write_text(json.dumps({"command": "twomoons", "config": {}}))
    argv = [
        a.format(run=run_dir, images=image_dir, other=other, experiment=experiment) for a in argv
    ]
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    err = fails(capsys, *argv)
    owner = "train" if str(other) in argv[-1] else "twomoons"
    assert f"{argv[-1]} would replace a file that `metapl {owner}` wrote in" in err, err
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    # another name in that folder is an output like any other
    assert main([*argv[:-1], str(Path(argv[-1]).parent / "out.pt")]) == 0


def test_predict_json_naming_one_of_its_images_is_refused(capsys, run_dir, image_dir, tmp_path):
    """`metapl predict --json IMAGE IMAGE` replaced the image with its own prediction, exit 0."""
    images = shutil.copytree(image_dir, tmp_path / "images")  # the fixture's stay whole if it fails
    image = sorted(images.rglob("*.png"))[0]
    before = image.read_bytes()
    for given in (images, image):  # the image inside a folder argument, or named itself
        err = fails(capsys, "predict", "--run", str(run_dir), str(given), "--json", str(image))
        assert f"--json {image} is one of the images to classify; give another name" in err, err
    assert image.read_bytes() == before


def test_export_by_default_beside_the_run_with_its_class_names_and_state(capsys, run_dir, tmp_path):
    """Without --output the file is RUN/model.torchscript.pt; its metadata carries the names of
    classes.json and says the run is unfinished, which a warning on stderr repeats."""
    run = copy_run(run_dir, tmp_path)
    names = [f"digit {i}" for i in range(10)]
    (run / "classes.json").write_text(json.dumps(names))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "steps": 100}))
    argv = ["export", "--run", str(run), "--format", "torchscript", "--allow-unfinished"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "unfinished (step 8 of 100); exported its last checkpoint" in captured.err
    assert f"wrote {run / 'model.torchscript.pt'} (torchscript)" in captured.out
    extra = {"metapl.json": ""}
    torch.jit.load(str(run / "model.torchscript.pt"), _extra_files=extra)
    info = json.loads(extra["metapl.json"])
    assert info["classes"] == names and info["finished"] is False
    assert info["input"] == "images: uint8 [N, 8, 8, 1] (grayscale, 0..255)"
    assert info["output"] == "probabilities: float32 [N, 10] (softmax)"


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"config.json": "not json"}, "config.json is not a readable metapl config"),
        ({"config.json": '{"steps": "many"}'}, "config.json is not a readable metapl config"),
        # was an AttributeError traceback ('list' object has no attribute 'items')
        ({"config.json": "[1, 2]"}, "config.json is not a readable metapl config (it holds"),
        ({"classes.json": "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"}, "must hold a JSON list of class"),
        (
            {"classes.json": json.dumps(list("abcdefghijk"))},
            "names 11 classes, but the model has 10",
        ),
        # a tab broke predict's tab-separated line; two classes of one name were both printed
        (
            {"classes.json": json.dumps([*"abcdefghi", "a\tb"])},
            "classes.json: class 9's name 'a\\tb' is empty or with a control character",
        ),
        (
            {"classes.json": json.dumps([*"abcdefghi", "c"])},
            "classes.json: class 9's name 'c' is a name given twice; give each class a distinct",
        ),
        ({"classes.json": json.dumps([*"abcdefghi", ""])}, "class 9's name '' is empty"),
        # config.json and checkpoint.pt of two runs (a checkpoint copied in, a config edited):
        # the same architecture was used under the wrong name, another was "does not fit"
        (
            {"config": {"seed": 5}},
            "checkpoint.pt was written by a run with a different configuration (seed: 2 -> 5); "
            "it and",
        ),
        ({"config": {"model": "digits_cnn_large"}}, "configuration (model: 'digits_cnn' -> "),
        # a checkpoint without the fingerprint (hand-made): the architecture check still holds
        (
            {"config": {"model": "digits_cnn_large"}, "fingerprint": None},
            "checkpoint.pt does not fit digits_cnn_large",
        ),
    ],
)
def test_a_damaged_run_folder_is_one_line(capsys, run_dir, image_dir, tmp_path, damage, message):
    run = copy_run(run_dir, tmp_path)
    if "config" in damage:
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, **damage["config"]}))
        if "fingerprint" in damage:
            state = torch.load(run / "checkpoint.pt", weights_only=True)
            del state["config_fingerprint"]
            torch.save(state, run / "checkpoint.pt")
    else:
        for name, text in damage.items():
            (run / name).write_text(text)
    assert message in fails(capsys, "predict", "--run", str(run), str(image_dir))


def test_a_run_from_before_a_new_option_is_its_own_checkpoints_run(
    capsys, run_dir, image_dir, tmp_path
):
    """A run trained before memory_format existed: neither its config.json nor its checkpoint has
    the option, and the checkpoint's fingerprint is of the config without it. The option's
    default is the old behaviour, so checkpoint and config.json are one run's, and it predicts as
    before (the fingerprint compared without the defaults called them two runs')."""
    run = copy_run(run_dir, tmp_path)
    config = json.loads((run / "config.json").read_text())
    del config["memory_format"]
    (run / "config.json").write_text(json.dumps(config))
    ckpt = load_checkpoint(run / "checkpoint.pt")
    del ckpt["config"]["memory_format"]
    ckpt["config_fingerprint"] = config_fingerprint(ckpt["config"])
    save_checkpoint(run / "checkpoint.pt", ckpt)
    assert predict(capsys, run, str(image_dir)) == predict(capsys, run_dir, str(image_dir))


def test_input_spec_follows_the_readers_not_image_size():
    """CIFAR-10 and SVHN arrays are 32x32 RGB and digits 8x8 grayscale whatever image_size says;
    image folders are fitted at image_size."""
    from metapl.train.config import apply_overrides
    from metapl.train.run_model import InputSpec, input_spec

    def spec(dataset, **extra):
        return input_spec(apply_overrides(TrainConfig(), {"dataset": dataset, **extra}))

    for dataset in ("cifar10-4k", "cifar10-full", "svhn-1k", "svhn-full"):
        assert spec(dataset, image_size=64) == InputSpec(32, 3)
    assert spec("digits", image_size=64) == InputSpec(8, 1)
    assert spec("folder", image_size=48) == InputSpec(48, 3)


def test_predict_keeps_the_order_the_files_were_given_in(capsys, run_dir, image_dir, digits):
    """Files named on the command line are predicted in that order, not sorted."""
    order = [3, 0, 4, 1]
    rows = predict(capsys, run_dir, *(str(image_dir / f"d{i}.png") for i in order))
    assert [row[0] for row in rows] == [str(image_dir / f"d{i}.png") for i in order]
    assert [int(row[1]) for row in rows] == list(reference(run_dir, digits[order]).argmax(-1))


class _BatchSizeFrozen(torch.nn.Module):
    """Reads the batch size as a Python number: tracing freezes it to the example's."""

    def forward(self, images):
        return images.float().mean(dim=(1, 2, 3)) * len(images)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_a_trace_frozen_to_the_examples_batch_size_is_refused():
    """The export checks its trace on a batch of another size than the example's."""
    example = torch.zeros((2, 8, 8, 1), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="differs from the model on another batch size"):
        export_command._trace(_BatchSizeFrozen(), example)


def test_onnx_metadata_values_are_json_where_not_text(capsys, run_dir, monkeypatch, tmp_path):
    """ONNX metadata holds strings only: the class list and the finished flag are stored as JSON
    (as test_onnx_export_matches_the_model reads them), the text fields as they are. Runs
    without the ONNX packages: torch.onnx.export is replaced by a program that records."""
    props = {}

    def fake_export(*args, **kwargs):
        save = lambda path, external_data: Path(path).write_bytes(b"onnx")  # noqa: E731
        return SimpleNamespace(model=SimpleNamespace(metadata_props=props), save=save)

    monkeypatch.setattr(export_command, "ONNX_PACKAGES", ())
    monkeypatch.setattr(torch.onnx, "export", fake_export)
    out = tmp_path / "m.onnx"
    assert main(["export", "--run", str(run_dir), "--format", "onnx", "--output", str(out)]) == 0
    assert json.loads(props["classes"]) == [str(i) for i in range(10)]
    assert json.loads(props["finished"]) is True
    assert props["output"] == "probabilities: float32 [N, 10] (softmax)"
    assert out.read_bytes() == b"onnx"


# --- the audit of docs/predict-export.md: claims no test above held ----------------------------


def _edit_config(run: Path, **changes) -> None:
    """Change the run's config.json and its checkpoint's config alike (fingerprint included), so
    the two are still one run's."""
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, **changes}))
    ckpt = load_checkpoint(run / "checkpoint.pt")
    ckpt["config"] = {**ckpt["config"], **changes}
    ckpt["config_fingerprint"] = config_fingerprint(ckpt["config"])
    save_checkpoint(run / "checkpoint.pt", ckpt)


def test_a_run_is_finished_at_steps_plus_finetune_steps(capsys, run_dir, image_dir, tmp_path):
    """docs/predict-export.md: finished means the checkpoint reached `steps + finetune_steps`.
    Would break: a run stopped during fine-tuning taken for finished (steps alone)."""
    run = copy_run(run_dir, tmp_path)
    _edit_config(run, finetune_steps=1)  # 8 of 8 + 1 steps
    err = fails(capsys, "predict", "--run", str(run), str(image_dir))
    assert "stopped at step 8 of 9" in err
    _edit_config(run, steps=7, finetune_steps=1)  # 8 of 7 + 1: finished
    assert len(predict(capsys, run, str(image_dir))) == 5


def test_predictions_of_a_bf16_run_are_float32(capsys, run_dir, image_dir, tmp_path):
    """docs/predict-export.md: "Predictions use float32 even for runs trained with
    precision=bf16". Would break: predict running the model under the run's autocast."""
    run = copy_run(run_dir, tmp_path)
    _edit_config(run, precision="bf16")
    assert load_run_model(run).config.precision == "bf16"
    paths = [str(image_dir / f"d{i}.png") for i in range(5)]
    json_bf16, json_fp32 = tmp_path / "bf16.json", tmp_path / "fp32.json"
    predict(capsys, run, *paths, "--top", "10", "--json", str(json_bf16))
    predict(capsys, run_dir, *paths, "--top", "10", "--json", str(json_fp32))
    assert (
        json.loads(json_bf16.read_text())["predictions"]
        == (json.loads(json_fp32.read_text())["predictions"])
    )


def test_a_non_square_image_is_resized_by_its_shorter_side_then_centre_cropped(tmp_path, run_dir):
    """docs/predict-export.md: the shorter side is resized (bicubic) to the run's resolution, then
    the centre square is cropped. A 24x16 image becomes 12x8, of which columns 2..9 are kept.
    Would break: a squash to 8x8, another filter, or a crop off the centre."""
    pixels = np.random.RandomState(0).randint(0, 256, (16, 24), dtype=np.uint8)  # H 16, W 24
    path = tmp_path / "wide.png"
    Image.fromarray(pixels, "L").save(path)
    resized = Image.fromarray(pixels, "L").convert("RGB").resize((12, 8), Image.Resampling.BICUBIC)
    expected = np.asarray(resized.crop((2, 0, 10, 8)).convert("L"))[None, :, :, None]
    got = read_images([str(path)], load_run_model(run_dir).spec)
    assert got.shape == (1, 8, 8, 1) and np.array_equal(got, expected)


def test_onnx_export_by_default_beside_the_run(capsys, run_dir, monkeypatch, tmp_path):
    """Without --output, --format onnx writes RUN/model.onnx. Runs without the ONNX packages (as
    test_onnx_metadata_values_are_json_where_not_text)."""

    def fake_export(*args, **kwargs):
        save = lambda path, external_data: Path(path).write_bytes(b"onnx")  # noqa: E731
        return SimpleNamespace(model=SimpleNamespace(metadata_props={}), save=save)

    monkeypatch.setattr(export_command, "ONNX_PACKAGES", ())
    monkeypatch.setattr(torch.onnx, "export", fake_export)
    run = copy_run(run_dir, tmp_path)
    assert main(["export", "--run", str(run), "--format", "onnx"]) == 0
    assert f"wrote {run / 'model.onnx'} (onnx)" in capsys.readouterr().out
    assert (run / "model.onnx").read_bytes() == b"onnx"


@pytest.mark.parametrize("name", ["m.pt", "m.pth", "m.ts", "m.torchscript"])
def test_every_torchscript_name_is_refused_for_onnx(capsys, run_dir, tmp_path, name):
    """docs/predict-export.md lists `.pt`, `.pth`, `.ts` and `.torchscript` as names that say
    TorchScript: each is refused with --format onnx, before anything is written."""
    out = tmp_path / name
    err = fails(capsys, "export", "--run", str(run_dir), "--format", "onnx", "--output", str(out))
    assert "names a torchscript file, but --format is onnx" in err and not out.exists()


# --- a mutation audit of predict.py and export.py: what a wrong change still left passing -------


def test_onnx_export_quiets_torch_onnx_only_while_it_exports(
    capsys, run_dir, monkeypatch, tmp_path
):
    """The torch.onnx logger is raised to ERROR during the export (a warning per unregistered
    torchvision op) and given its own level back afterwards: the user's logging configuration is
    not changed for the rest of the program."""
    import logging

    logger = logging.getLogger("torch.onnx")
    seen = []

    def fake_export(*args, **kwargs):
        seen.append(logger.level)
        save = lambda path, external_data: Path(path).write_bytes(b"onnx")  # noqa: E731
        return SimpleNamespace(model=SimpleNamespace(metadata_props={}), save=save)

    monkeypatch.setattr(export_command, "ONNX_PACKAGES", ())
    monkeypatch.setattr(torch.onnx, "export", fake_export)
    before = logger.level
    logger.setLevel(logging.INFO)  # a level of the user's own
    try:
        out = tmp_path / "m.onnx"
        argv = ["export", "--run", str(run_dir), "--format", "onnx", "--output", str(out)]
        assert main(argv) == 0
        assert seen == [logging.ERROR] and logger.level == logging.INFO
    finally:
        logger.setLevel(before)


def test_reading_a_checkpoints_class_count_initialises_no_model():
    """The loader finds the classifier's size by building the model on the meta device. Random
    init there computes nothing, and torch's meta ``normal_`` imported torch._dynamo: 1.2-1.7 s,
    half of `metapl predict`'s start on a small run. The init is skipped, so no registry model
    imports it (a fresh process: this one may have imported it already)."""
    code = (
        "import sys\n"
        "from metapl.models import create_model, list_models\n"
        "from metapl.train.run_model import _num_classes\n"
        "for name in list_models():\n"
        "    # reduced_teacher is never a run's model; efficientnet_b1-b7 are b0's code, wider\n"
        "    if name == 'reduced_teacher' or name[:-1] == 'efficientnet_b' and name[-1] != '0':\n"
        "        continue\n"
        "    weights = create_model(name, 7).state_dict()\n"
        "    assert _num_classes(name, weights, name) == 7, name\n"
        "assert 'torch._dynamo' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
