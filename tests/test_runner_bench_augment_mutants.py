"""Mutation audit of the augmentation draws (rng, cutout, weak), the tuning runner, and the small
modules around them: what a wrong change still passed the earlier tests with. The draws land on the
images' device and follow the generator's stream wherever the images are; flip_prob 0 never flips;
cutout and the weak crop follow their documented draw order; reflect padding as large as the image
is refused in one line; the tuner's default study name, pruning warm-up and all-pruned study."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from test_augment import gen, images
from test_tune import fake_train, options
from torch import nn

import metapl.tuning
from metapl import bench, progress
from metapl.augment import WeakAugment, cutout, flip_and_crop, rng
from metapl.cli import main
from metapl.errors import ConfigError
from metapl.models.param_groups import param_groups_for_weight_decay
from metapl.mpl import numerics
from metapl.progress import LOG_INTERVAL_S, close_bars, progress_bar
from metapl.train.config import TrainConfig, apply_overrides
from metapl.tuning import retry
from metapl.tuning.runner import Stage, Tuner, label_budget_note, study_name

META = torch.device("meta")  # a device other than the generator's, on a machine without a GPU

# --- rng ----------------------------------------------------------------------------------------


def test_draws_are_returned_on_the_images_device():
    """A CPU generator (kept in a checkpoint) with images elsewhere: the draws come back where the
    images are, so the augmentation can index them."""
    g = gen()
    assert rng.uniform(3, META, g).device == META
    assert rng.randint(5, 3, META, g).device == META
    assert rng.bernoulli(0.5, 3, META, g).device == META


def test_the_numbers_depend_on_the_generator_not_on_where_the_images_are():
    """A draw for images on another device advances the generator as one on its own device does:
    the random stream of a run is the same wherever its batches are."""
    elsewhere, here = gen(3), gen(3)
    rng.uniform(4, META, elsewhere)
    rng.uniform(4, torch.device("cpu"), here)
    assert torch.equal(rng.randint(100, 8, torch.device("cpu"), elsewhere),
                       rng.randint(100, 8, torch.device("cpu"), here))  # fmt: skip


def test_probability_zero_is_never_true_even_for_a_draw_of_zero(monkeypatch):
    """torch.rand can return exactly 0.0: flip_prob 0 must still never flip, and 1 always does."""
    monkeypatch.setattr(
        rng, "uniform", lambda n, device, generator=None, share=None: torch.zeros(n)
    )
    assert not rng.bernoulli(0.0, 4, torch.device("cpu")).any()
    assert rng.bernoulli(1.0, 4, torch.device("cpu")).all()
    x = images((4, 3, 8, 8))
    assert torch.equal(WeakAugment(pad=0, flip_prob=0.0)(x, gen()), x)


# --- cutout -------------------------------------------------------------------------------------


def test_cutout_draws_the_row_then_the_column_of_each_center():
    """The square of image i is centered at (randint(H)[i], randint(W)[i]), drawn in that order
    from the generator: a seeded run places the same squares in every version."""
    n, h, w, side = 16, 6, 9, 3
    g = gen(5)
    cy, cx = torch.randint(h, (n,), generator=g), torch.randint(w, (n,), generator=g)
    want = torch.zeros(n, 1, h, w)
    for i in range(n):
        top, left = int(cy[i]) - side // 2, int(cx[i]) - side // 2
        want[i, :, max(top, 0) : top + side, max(left, 0) : left + side] = 0.5
    assert torch.equal(cutout(torch.zeros(n, 1, h, w), side, gen(5)), want)


def test_cutout_checks_its_images():
    with pytest.raises(TypeError, match="float"):
        cutout(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 4, gen())
    with pytest.raises(ValueError, match="N, C, H, W"):
        cutout(torch.zeros(3, 8, 8), 4, gen())


# --- weak ---------------------------------------------------------------------------------------


def test_weak_matches_a_per_image_reference_with_the_documented_draw_order():
    """Draws: flip for every image, then dy, then dx; each image reflect-padded, the window at
    (dy, dx) cropped, and read right to left when flipped."""
    n, pad, x = 12, 2, images((12, 2, 6, 7))
    g = gen(9)
    flip = torch.rand(n, generator=g) < 0.5
    dy = torch.randint(2 * pad + 1, (n,), generator=g)
    dx = torch.randint(2 * pad + 1, (n,), generator=g)
    want = []
    for i in range(n):
        img = torch.nn.functional.pad(x[i : i + 1], (pad,) * 4, mode="reflect")
        img = img[..., int(dy[i]) : int(dy[i]) + 6, int(dx[i]) : int(dx[i]) + 7]
        want.append(img.flip(-1) if flip[i] else img)
    got = flip_and_crop(x, pad, 0.5, "reflect", gen(9))
    assert torch.equal(got, torch.cat(want))
    assert 0 < int(flip.sum()) < n  # both kinds of image were checked


def test_reflect_padding_as_large_as_the_image_is_refused_in_one_line():
    with pytest.raises(ValueError, match="reflect padding of 8 px needs images larger than 8x9"):
        flip_and_crop(images((2, 3, 8, 9)), pad=8, generator=gen())
    flip_and_crop(images((2, 3, 8, 9)), pad=7, generator=gen())  # one less is fine


def test_flip_and_crop_defaults_are_the_weak_augments():
    x = images((8, 3, 16, 16))
    assert torch.equal(flip_and_crop(x, generator=gen(2)), WeakAugment()(x, gen(2)))
    assert torch.equal(flip_and_crop(x, generator=gen(2)), flip_and_crop(x, 4, 0.5, "reflect", gen(2)))  # fmt: skip


def test_weak_augment_records_no_graph_and_names_its_options():
    x = images((2, 3, 8, 8)).requires_grad_()
    assert not WeakAugment()(x, gen()).requires_grad
    assert repr(WeakAugment()) == "WeakAugment(pad=4, flip_prob=0.5, padding_mode='reflect')"
    with pytest.raises(ConfigError, match="padding_mode"):
        WeakAugment(padding_mode="circular")  # not one of the three documented modes


# --- the tuning runner --------------------------------------------------------------------------


def test_the_default_study_name_is_the_preset_files_stem(tmp_path):
    assert study_name(options(tmp_path, preset=str(tmp_path / "my-preset.toml"), study=None)) == (
        "my-preset"
    )
    assert study_name(options(tmp_path, preset="digits-uda-mpl", study=None)) == "digits-uda-mpl"


def test_digits_without_a_tuning_split_has_no_label_budget_note():
    digits = apply_overrides(TrainConfig(), {"dataset": "digits", "labels_per_class": 5})
    assert label_budget_note(apply_overrides(digits, {"tune_per_class": 0})) is None
    assert "5 + 3 = 8 labels" in label_budget_note(apply_overrides(digits, {"tune_per_class": 3}))


def test_pruning_waits_for_at_least_one_step_in_a_run_shorter_than_four(tmp_path, monkeypatch):
    """A quarter of 3 steps is 0: the warm-up is still 1 step, so no trial is pruned on the
    evaluation before its first step."""
    made = []

    def median(**kwargs):
        made.append(kwargs)
        return optuna.pruners.NopPruner()

    monkeypatch.setattr(optuna.pruners, "MedianPruner", median)
    tuner = Tuner(options(tmp_path, runtime={"steps": 3, "device": "cpu"}))
    tuner.train = fake_train([])
    tuner.run()
    assert made == [{"n_startup_trials": 5, "n_warmup_steps": 1}]


def test_a_study_whose_trials_were_all_pruned_is_a_one_line_error_not_a_wait(tmp_path, capsys):
    """No trial finished and none runs elsewhere: nothing to wait for; best.toml cannot be written
    and the error says why (not "not written yet ... 0 still run in other processes")."""

    def pruned(cfg, out_dir, show_progress=True, on_eval=None):
        raise optuna.TrialPruned()

    tuner = Tuner(options(tmp_path, trials=2))
    tuner.train = pruned
    with pytest.raises(ConfigError, match="no trial finished"):
        tuner.run()
    assert "not written yet" not in capsys.readouterr().out


# --- weight decay groups and progress bars ------------------------------------------------------


class ScaledLinear(nn.Linear):
    """A linear layer with a learned output scale, as some students add: only ``weight`` is the
    layer's kernel."""

    def __init__(self, n: int):
        super().__init__(n, n)
        self.scale = nn.Parameter(torch.ones(n))


def test_only_the_kernel_of_a_linear_or_conv_subclass_is_decayed():
    layer = ScaledLinear(3)
    decay, no_decay = param_groups_for_weight_decay(layer, 0.1)
    assert [id(p) for p in decay["params"]] == [id(layer.weight)]
    assert {id(p) for p in no_decay["params"]} == {id(layer.bias), id(layer.scale)}


def test_a_bar_into_a_file_keeps_the_redraw_interval_it_was_given():
    """progress_bar's log interval is a default: an explicit ``mininterval`` wins."""
    bar = progress_bar(total=3, file=io.StringIO(), mininterval=0.5)
    bar.close()
    assert bar.mininterval == 0.5
    bar = progress_bar(total=3, file=io.StringIO())
    bar.close()
    assert bar.mininterval == LOG_INTERVAL_S


def test_close_bars_closes_an_open_bar_before_the_error_line():
    """The bar's last state and its newline come before whatever is printed next."""
    out = io.StringIO()
    bar = progress_bar(total=3, file=out)
    bar.update()
    close_bars()
    assert "1/3" in out.getvalue() and out.getvalue().endswith("\n")


def test_a_closed_stream_is_not_a_terminal():
    """A closed file's isatty() raises ValueError: a bar into it counts as into a log file."""
    closed = io.StringIO()
    closed.close()
    assert progress._is_terminal(closed) is False


def test_a_process_that_lost_a_trial_still_starts_trials_trials_in_all(tmp_path, monkeypatch):
    """--trials 3 where the second trial is taken over by another process (and so lost to this
    one): this process goes on with one more trial, not two; the lost one counts as started."""
    calls = []
    real_trial = Stage._trial

    def second_is_taken_over(self, trial):
        if trial.number == 1:
            raise RuntimeError("taken over")
        return real_trial(self, trial)

    monkeypatch.setattr(Stage, "_trial", second_is_taken_over)
    monkeypatch.setattr(retry, "taken_over", lambda optuna, trial: trial.number == 1)
    monkeypatch.setattr(retry, "copy_of", lambda optuna, trial: None)
    tuner = Tuner(options(tmp_path, trials=3, study="lost"))
    tuner.train = fake_train(calls)
    tuner.run()
    assert len(calls) == 2


# --- `metapl tune` and `metapl bench`'s options -------------------------------------------------


def _tune_args(tmp_path) -> list[str]:
    args = ["tune", "--preset", "digits-uda-mpl", "--trials", "1", "--out", str(tmp_path / "o")]
    return [*args, "--storage", f"sqlite:///{tmp_path / 's.db'}", "--set", "tune_per_class=3"]


def test_tune_prints_the_command_and_the_label_budget_once_best_toml_is_written(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(metapl.tuning, "tune", lambda opts: opts.out / "best.toml")
    assert main(_tune_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "wrote " in out and "metapl train --preset" in out
    assert "digits: it trains on 5 + 3 = 8 labels per class" in out


def test_tune_prints_nothing_more_when_best_toml_was_not_written(tmp_path, monkeypatch, capsys):
    """The tuner said why (other processes still run): no "wrote None" line."""
    monkeypatch.setattr(metapl.tuning, "tune", lambda opts: None)
    assert main(_tune_args(tmp_path)) == 0
    assert capsys.readouterr().out == ""


def test_bench_json_of_only_spaces_is_refused_as_empty():
    with pytest.raises(ConfigError, match="--json is empty"):
        bench._check_json_path("  ")


def test_the_synthetic_split_has_64_test_images_and_its_labeled_images_are_the_unlabeled():
    split = bench.synthetic_cifar_split(100, np.random.RandomState(0))
    assert split.x_test.shape == (64, 32, 32, 3) and len(split.y_test) == 64
    assert split.x_labeled.shape == (100, 32, 32, 3) and split.x_unlabeled is split.x_labeled


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", None)])
def test_bench_numerics_run_the_exact_gradient_under_the_benchs_precision(
    monkeypatch, precision, dtype
):
    """bench --precision bf16 compares the bf16 autocast gradient with float64, not fp32's."""
    seen = []

    def agreement(*args, **kwargs):
        seen.append(kwargs["autocast_dtype"])
        return {"cosine": 1.0, "relative_error": 0.0}

    monkeypatch.setattr(numerics, "agreement_with_float64", agreement)
    student = nn.Linear(1, 2)
    method = SimpleNamespace(
        models={"teacher": student, "student": student},
        optimizers={"student": torch.optim.SGD(student.parameters(), lr=0.1)},
    )
    run = SimpleNamespace(method=method, cfg=SimpleNamespace(mpl_temperature=1.0))
    batch = SimpleNamespace(
        x_labeled=torch.zeros(4, 1), y_labeled=torch.zeros(4), x_unlabeled_strong=torch.zeros(28, 1)
    )
    out = bench._numerics(run, batch, torch.device("cpu"), precision, lambda text: None)
    assert seen == [dtype] and out["precision"] == precision
