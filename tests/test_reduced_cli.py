"""End-to-end: `metapl reduced` (Section 4.2 on digits) and the large-teacher stage of the engine."""

import json

import numpy as np
import pytest
import torch

from metapl.cli import main
from metapl.errors import ConfigError
from metapl.train import engine
from metapl.train.checkpoint import load_checkpoint
from metapl.train.config import apply_overrides
from metapl.train.presets import load_preset, preset_table

TINY = ["--steps", "4"]
# The digits preset keeps every unlabeled image (160 per class of ~100); 30 makes the students'
# top-K selection drop some, end to end.
KEEP = 30


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reduced")
    keep = [f"--set=reduced_mpl:unlabeled_per_class={KEEP}"]
    keep += [f"--set=noisy_student:unlabeled_per_class={KEEP}"]
    assert main(["reduced", "--seeds", "0", "--out", str(out), "--quiet", *TINY, *keep]) == 0
    return out


def test_reduced_writes_records_and_figure10(reduced_run):
    payload = json.loads((reduced_run / "results.json").read_text())
    methods = [r["method"] for r in payload["results"]]
    assert methods == ["large_teacher", "supervised", "noisy_student", "reduced_mpl"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in payload["results"])
    assert (reduced_run / "figure10.png").read_bytes()[:4] == b"\x89PNG"
    series = json.loads((reduced_run / "reduced_mpl" / "seed0" / "figure10.json").read_text())
    assert set(series["reduced_teacher_by_quarter"]) == {"1", "2", "3", "4"}
    for probs in [series["large_teacher"], *series["reduced_teacher_by_quarter"].values()]:
        assert np.allclose(np.sum(probs, axis=1), 1.0, atol=1e-5)


def test_students_never_hold_the_large_teacher(reduced_run):
    """The student runs' checkpoints hold the student (and the small reduced teacher), never the
    large teacher's weights; the large teacher's outputs are on disk instead."""
    ckpt = load_checkpoint(reduced_run / "reduced_mpl" / "seed0" / "checkpoint.pt")
    teacher_params = sum(v.numel() for v in ckpt["teacher"].values())
    large = load_checkpoint(reduced_run / "large_teacher" / "seed0" / "checkpoint.pt")
    assert teacher_params < sum(v.numel() for v in large["student"].values()) / 2
    probs = np.load(reduced_run / "reduced_mpl" / "seed0" / "large_teacher_unlabeled.npy")
    assert probs.shape[1] == 10 and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert "teacher" not in load_checkpoint(
        reduced_run / "noisy_student" / "seed0" / "checkpoint.pt"
    )


def test_the_large_teacher_is_freed_before_the_student_is_built(
    reduced_run, tmp_path, monkeypatch, capsys
):
    """README: the student run drops the large teacher before the student exists; the two are
    never in memory together (the point of ReducedMPL). Every large teacher loaded is gone when
    the run builds its models."""
    import gc
    import weakref

    from metapl.train import large_teacher

    loaded = []
    load = large_teacher.load_large_teacher
    monkeypatch.setattr(
        large_teacher,
        "load_large_teacher",
        lambda *args: loaded.append(weakref.ref(model := load(*args))) or model,
    )
    alive_at_build = []

    class Run(engine.Run):
        def __init__(self, *args, **kwargs):
            gc.collect()  # only cycles would keep one; the run itself must hold no reference
            alive_at_build.append(sum(ref() is not None for ref in loaded))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine, "Run", Run)
    teacher = reduced_run / "large_teacher" / "seed0"
    args = ["train", "--preset", "digits-reduced-reduced-mpl", "--out", str(tmp_path / "s")]
    args += ["--set", f"large_teacher={teacher}", "--steps", "2", "--quiet"]
    assert main([*args, "--set", "finetune_steps=0", "--set", "warmup_steps=1"]) == 0
    assert len(loaded) == 2  # the check of its images, then the precompute
    assert alive_at_build == [0]
    # the last line names the files a ReducedMPL run adds too
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .endswith(
            "checkpoint.pt, figure10.json, large_teacher_labeled.npy, large_teacher_labeled.json, "
            "large_teacher_unlabeled.npy, large_teacher_unlabeled.json"
        )
    )


def test_top_k_selection_keeps_k_per_class(reduced_run):
    probs = np.load(reduced_run / "reduced_mpl" / "seed0" / "large_teacher_unlabeled.npy")
    assert len(probs) > KEEP * 10  # the pool is larger than what is kept
    for student in ("reduced_mpl", "noisy_student"):
        log = (reduced_run / student / "seed0" / "config.json").read_text()
        assert json.loads(log)["unlabeled_per_class"] == KEEP


def test_stale_precompute_is_refused(reduced_run, tmp_path):
    """Precomputed distributions from another large teacher are refused, with a clear error (the
    run folder's config check aside: here a fresh folder holds the other teacher's files)."""
    import shutil

    from metapl.errors import DataError

    other = tmp_path / "other_teacher"
    cfg = apply_overrides(
        load_preset("digits-reduced-large-teacher"), {"steps": 4, "warmup_steps": 4, "seed": 1}
    )
    engine.train(cfg, other, show_progress=False)
    fresh = tmp_path / "student"
    fresh.mkdir()
    for f in (reduced_run / "reduced_mpl" / "seed0").glob("large_teacher_*"):
        shutil.copy(f, fresh / f.name)
    stale = apply_overrides(
        load_preset("digits-reduced-reduced-mpl"),
        {"steps": 4, "warmup_steps": 4, "seed": 0, "large_teacher": str(other)},
    )
    with pytest.raises(DataError, match="model"):
        engine.train(stale, fresh, show_progress=False)
    assert not (fresh / "checkpoint.pt").exists()


def test_a_reduced_rerun_with_other_seeds_is_refused(reduced_run, capsys):
    """A rerun into the same --out with other seeds silently replaced the earlier results.json."""
    earlier = (reduced_run / "results.json").read_text()
    assert main(["reduced", "--seeds", "1", "--out", str(reduced_run), "--quiet", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds reduced results of another configuration" in err, err
    assert "seeds=[0]" in err and "choose another --out" in err
    assert (reduced_run / "results.json").read_text() == earlier
    assert not (reduced_run / "large_teacher" / "seed1").exists()  # refused before any work


def test_reduced_methods_need_a_large_teacher():
    cfg = apply_overrides(load_preset("digits-reduced-reduced-mpl"), {"large_teacher": None})
    with pytest.raises(ConfigError, match="large_teacher"):
        cfg.validate()


def test_unfinished_large_teacher_is_refused(tmp_path, capsys):
    out = tmp_path / "student"
    code = main(
        [
            "train",
            "--preset",
            "digits-reduced-noisy-student",
            "--out",
            str(out),
            "--set",
            f"large_teacher={tmp_path / 'missing'}",
            "--quiet",
        ]
    )
    assert code == 2
    assert "large_teacher" in capsys.readouterr().err
    assert not out.exists()


def test_large_teacher_of_other_images_is_refused_before_any_write(tmp_path, capsys):
    """A finished large teacher trained on RGB images, given to a student on the grayscale
    digits: the precompute failed with torch's traceback."""
    rng = np.random.RandomState(0)
    arrays = tmp_path / "rgb.npz"
    np.savez(
        arrays,
        x_labeled=rng.randint(0, 256, (20, 8, 8, 3), dtype=np.uint8),
        y_labeled=np.arange(20) % 10,
        x_unlabeled=rng.randint(0, 256, (10, 8, 8, 3), dtype=np.uint8),
    )
    teacher = tmp_path / "teacher"
    tiny = ["--steps", "1", "--device", "cpu", "--quiet"]
    for key_value in ("model=small_cnn", "image_size=8", "pad=1", "batch_size=4"):
        tiny += ["--set", key_value]
    args = ["train", "--preset", "folder-supervised", "--data-dir", str(arrays)]
    assert main([*args, "--out", str(teacher), *tiny]) == 0
    capsys.readouterr()
    out = tmp_path / "student"
    args = ["train", "--preset", "digits-reduced-noisy-student", "--out", str(out)]
    assert main([*args, "--set", f"large_teacher={teacher}", "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"large_teacher={teacher} cannot take this run's images (1 channel, 8x8)" in err
    assert not out.exists()


def test_reduced_other_datasets_point_to_presets(tmp_path, capsys):
    assert main(["reduced", "--dataset", "cifar10", "--out", str(tmp_path / "x")]) == 2
    assert "full-large-teacher" in capsys.readouterr().err


def test_reduced_set_reaches_only_its_stage(tmp_path):
    """`--set STAGE:key=value` changes that stage's run config and no other; `--set key=value`
    changes every stage's; the large teacher folder is the run's own."""
    from metapl.experiments.digits import parse_method_overrides
    from metapl.experiments.reduced import ReducedConfig, _stage_config

    cfg = ReducedConfig(
        seeds=[3],
        overrides=parse_method_overrides(["reduced_mpl:teacher_lr=0.01", "eval_every=7"]),
    ).validate()
    reduced = _stage_config("reduced_mpl", 3, cfg, tmp_path)
    noisy = _stage_config("noisy_student", 3, cfg, tmp_path)
    large = _stage_config("large_teacher", 3, cfg, tmp_path)
    preset_lr = load_preset("digits-reduced-reduced-mpl").teacher_lr
    assert (reduced.teacher_lr, noisy.teacher_lr, preset_lr) == (0.01, noisy.teacher_lr, 1e-4)
    assert noisy.teacher_lr != 0.01 and large.teacher_lr != 0.01
    assert reduced.eval_every == noisy.eval_every == large.eval_every == 7
    assert reduced.seed == 3 and reduced.large_teacher == str(tmp_path / "large_teacher" / "seed3")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "uda:teacher_lr=1"], "not a stage"),
        (["--set", "reduced_mpl:no_such_key=1"], "unknown config key"),
        (["--set", "reduced_mpl:teacher_lr=fast"], "teacher_lr"),
        (["--methods", "uda_mpl"], "unknown student"),
        (["--methods", ","], "at least one"),
        (["--methods", "reduced_mpl", "--set", "noisy_student:steps=3"], "does not train here"),
        (["--set", "student_labeled_weight=1"], "stage large_teacher: student_labeled_weight"),
        # the command wires each seed's students to the large teacher it trains for that seed
        # (--steps 2: without the check the large teacher trained first, then a student failed)
        (["--steps", "2", "--set", "large_teacher=elsewhere"], "trains each seed's large teacher"),
        (
            ["--steps", "2", "--set", "reduced_mpl:large_teacher=elsewhere"],
            "trains each seed's large teacher",
        ),
    ],
)
def test_reduced_bad_options_stop_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["reduced", "--seeds", "0", "--out", str(out), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_method_lists_drop_spaces_empty_items_and_repeats():
    """A name given twice would train the same run folder twice at the same time."""
    from metapl.cli import parse_names

    assert parse_names(" reduced_mpl, noisy_student,,reduced_mpl ") == (
        "reduced_mpl",
        "noisy_student",
    )
    assert parse_names(" , ") == ()


def test_reduced_methods_trains_only_the_named_students(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["reduced", "--seeds", "0-1", "--out", str(out), "--quiet", "--steps", "2"]
    no_ft = ["--set", "noisy_student:finetune_steps=0"]  # the preset fine-tunes both students
    assert main([*argv, "--methods", "noisy_student,reduced_mpl", *no_ft]) == 0
    payload = json.loads((out / "results.json").read_text())
    # A fine-tuned stage reports its student before and after fine-tuning; --steps 2 cuts the
    # preset's 300 fine-tuning steps to its share of the run (1).
    tuned = [r for r in payload["results"] if "accuracy_before_finetune" in r]
    assert {r["method"] for r in tuned} == {"reduced_mpl"} and len(tuned) == 2
    assert {r["finetune_steps"] for r in tuned} == {1}
    assert "reduced_mpl_before_finetune" in payload["summary"]
    methods = sorted({r["method"] for r in payload["results"]})
    assert methods == ["large_teacher", "noisy_student", "reduced_mpl"]
    assert not (out / "supervised").exists()
    # Table 2's comparison is printed and saved seed by seed, where both sides ran.
    assert list(payload["paired"]) == ["reduced_mpl - noisy_student"]
    assert payload["paired"]["reduced_mpl - noisy_student"]["n"] == 2
    assert "reduced_mpl - noisy_student" in capsys.readouterr().out


def test_table2_presets_exist_with_appendix_c2_values():
    table = preset_table()
    for dataset in ("cifar10-full", "svhn-full", "imagenet-full"):
        for row in ("large-teacher", "supervised", "noisy-student", "reduced-mpl"):
            cfg = apply_overrides(load_preset(f"{dataset}-{row}"), {"large_teacher": "RUN"})
            cfg.validate()
        reduced = table[f"{dataset}-reduced-mpl"]
        assert reduced["teacher_optimizer"] == "adam" and reduced["teacher_lr"] == 1e-4
        assert reduced["teacher_weight_decay"] == 1e-4
        assert reduced["student_optimizer"] == "rmsprop"
        assert reduced["teacher_hidden"] == (512 if dataset == "imagenet-full" else 128)
    assert table["cifar10-full-reduced-mpl"]["model"] == "efficientnet_b0"
    assert table["imagenet-full-reduced-mpl"]["model"] == "efficientnet_b7"
    assert table["cifar10-full-reduced-mpl"]["unlabeled_per_class"] == 50_000
    assert table["svhn-full-reduced-mpl"]["unlabeled_per_class"] == 35_000
    assert table["imagenet-full-reduced-mpl"]["unlabeled_per_class"] == 12_800


def test_reduced_teacher_starts_as_identity():
    from metapl.models import create_model

    teacher = create_model("reduced_teacher", 10, hidden=128)
    assert sum(isinstance(m, torch.nn.Linear) for m in teacher.modules()) == 5  # 5-layer MLP
    p = torch.softmax(torch.randn(7, 10), -1)
    assert torch.allclose(torch.softmax(teacher(p), -1), p, atol=1e-6)


def test_the_same_out_by_another_name_resumes_its_runs(tmp_path, monkeypatch, capsys):
    """Each student's large teacher is named after --out: `--out rd`, then `--out $PWD/rd` (or
    `--out sub/rd` from the folder above) refused the finished students' checkpoints as "a
    different configuration (large_teacher: 'rd/...' -> '/.../rd/...')", an option never set.
    A project folder moved elsewhere, with --out given as before, resumes too."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    args = ["reduced", "--seeds", "0", "--steps", "2", "--methods", "reduced_mpl", "--quiet"]
    args += ["--set", "finetune_steps=0", "--set", "eval_every=2"]
    assert main([*args, "--out", "rd"]) == 0
    student = tmp_path / "sub" / "rd" / "reduced_mpl" / "seed0" / "checkpoint.pt"
    assert load_checkpoint(student)["config"]["large_teacher"] == "rd/large_teacher/seed0"
    assert main([*args, "--out", str(tmp_path / "sub" / "rd")]) == 0
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--out", "sub/rd"]) == 0
    (tmp_path / "sub").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    assert main([*args, "--out", "rd"]) == 0
    capsys.readouterr()
