"""What the TwoMoons, Figure 9 and Figure 10 plots and results hold, on tiny hand-made inputs: the
series each panel draws (its values, its steps, its seed, its labels), the per-seed numbers the
TwoMoons run records, and what each method trains on (found by a hand-made mutation audit)."""

from __future__ import annotations

import json

import matplotlib.axes
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from metapl.experiments import figure9, figure10, twomoons, twomoons_plots
from metapl.experiments.stacked import StackedMLP


@pytest.fixture
def figures(monkeypatch):
    """Each figure the plots close, kept open for the test (and not written: what is drawn is
    what these tests read)."""
    real_close = plt.close
    figs: list = []
    monkeypatch.setattr(plt, "close", figs.append)
    for module in (twomoons_plots, figure9, figure10):
        monkeypatch.setattr(module, "replace_atomically", lambda path, write: None)
    yield figs
    for fig in figs:
        real_close(fig)


# --- figure9 -------------------------------------------------------------------------------------


def test_figure9_plots_percent_at_the_logged_steps_and_writes_every_point(tmp_path, figures):
    rows = {
        "supervised": [
            (5, "student_labeled_accuracy", 0.5),
            (10, "student_labeled_accuracy", 0.75),
        ],
        "uda_mpl": [
            (5, "student_labeled_accuracy", 0.25),
            (5, "teacher_labeled_accuracy", 0.125),
            (10, "student_labeled_accuracy", 1.0),
            (10, "teacher_labeled_accuracy", 0.375),
        ],
    }
    for method, lines in rows.items():
        run = tmp_path / method / "seed3"
        run.mkdir(parents=True)
        text = "".join(f"{s},{n},{v}\n" for s, n, v in lines)
        (run / "metrics.csv").write_text("step,name,value\n" + text)
    series = figure9.plot_figure9(tmp_path, 3, tmp_path / "figure9.png")
    expected = {
        "Supervised": {"steps": [5, 10], "accuracy": [0.5, 0.75]},
        "MPL teacher": {"steps": [5, 10], "accuracy": [0.125, 0.375]},
        "MPL student": {"steps": [5, 10], "accuracy": [0.25, 1.0]},
    }
    assert series == expected
    assert json.loads((tmp_path / "figure9.json").read_text()) == expected
    (fig,) = figures
    drawn = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in fig.axes[0].lines
    }
    assert drawn == {k: (v["steps"], [100 * a for a in v["accuracy"]]) for k, v in expected.items()}


# --- figure10 ------------------------------------------------------------------------------------


def test_figure10_columns_are_the_large_teacher_then_each_quarter_row_by_row(tmp_path, figures):
    """Two images (rows), three classes: each panel's bars are its own image's distribution from
    its own column, columns titled on top, every panel on the same 0-1 scale."""
    rng = np.random.RandomState(0)
    probs = {k: rng.dirichlet(np.ones(3), size=2) for k in ("large", "1", "2", "3", "4")}
    series = {
        "large_teacher": probs["large"].tolist(),
        "reduced_teacher_by_quarter": {q: probs[q].tolist() for q in ("3", "1", "4", "2")},
    }
    (tmp_path / "figure10.json").write_text(json.dumps(series))
    figure10.plot_figure10(tmp_path / "figure10.json", tmp_path / "figure10.png")
    (fig,) = figures
    axes = np.array(fig.axes).reshape(2, 5)
    columns = ["large", "1", "2", "3", "4"]
    titles = ["large teacher", *(f"{p}% of training" for p in (25, 50, 75, 100))]
    assert [ax.get_title() for ax in axes[0]] == titles
    assert all(ax.get_title() == "" for ax in axes[1])
    for r in range(2):
        for c, key in enumerate(columns):
            heights = [bar.get_height() for bar in axes[r][c].patches]
            np.testing.assert_allclose(heights, probs[key][r])
            assert axes[r][c].get_ylim() == (0.0, 1.0)


# --- twomoons_plots ------------------------------------------------------------------------------


def _spy(monkeypatch, name):
    calls: list = []
    real = getattr(matplotlib.axes.Axes, name)

    def spy(self, *args, **kwargs):
        calls.append((self, args, kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, name, spy)
    return calls


def test_decision_regions_show_the_members_seed_its_points_and_its_classifier(
    tmp_path, monkeypatch, figures
):
    """Figure 1 for member 1 of seeds [0, 1]: its own data and labeled stars, each panel's
    classifier (class 1 where P(class 1) > 0.5, in eval mode) on a grid around all its points,
    each title its method's accuracy on that seed; hard pseudo labels, not soft ones."""
    seeds = [0, 1]
    data = twomoons.stack_data(seeds, 0.1)
    gen = torch.Generator().manual_seed(0)
    methods = ("supervised", "pseudo_label_hard", "pseudo_label_soft", "mpl")
    models = {m: StackedMLP(2, 2, 2, hidden=8, dropout=0.5, generator=gen) for m in methods}
    records = [
        {"method": m, "seed": s, "accuracy": 0.5 + 0.1 * i + 0.01 * s}
        for i, m in enumerate(methods)
        for s in seeds
    ]
    contours, scatters = _spy(monkeypatch, "contourf"), _spy(monkeypatch, "scatter")
    cfg = twomoons.TwoMoonsConfig(seeds=seeds)
    result = {"data": data, "models": models, "records": records}
    twomoons_plots.plot_decision_regions(result, cfg, tmp_path / "twomoons.png", member=1)
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == [
        "Supervised: 51.0%",
        "Pseudo label (hard): 61.0%",
        "MPL: 81.0%",
    ]
    assert "seed 1," in fig._suptitle.get_text()  # get_suptitle: matplotlib 3.8+
    x, y = data.x[1].numpy(), data.y[1].numpy()
    xl, yl = data.x_labeled[1].numpy(), data.y_labeled[1].numpy()
    for (ax, (gx, gy, z), _), method in zip(contours, ("supervised", "pseudo_label_hard", "mpl")):
        assert gx.min() <= x[:, 0].min() and gx.max() >= x[:, 0].max()
        assert gy.min() <= x[:, 1].min() and gy.max() >= x[:, 1].max()
        model = models[method].eval()
        with torch.no_grad():
            grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1)).float()
            p = torch.softmax(model(grid[None].expand(2, -1, -1)), -1)[1, :, 1].numpy()
        agree = (z == (p > 0.5).reshape(gx.shape)).mean()
        assert agree > 0.999  # float32 ties at 0.5 aside
        stars = [(a, kw) for a2, a, kw in scatters if a2 is ax and kw.get("marker") == "*"]
        dots = [(a, kw) for a2, a, kw in scatters if a2 is ax and kw.get("marker") != "*"]
        for c in (0, 1):
            (args, kw), *_ = [(a, kw) for a, kw in stars if kw["c"] == twomoons_plots.COLORS[c]]
            np.testing.assert_array_equal(np.stack(args, 1), xl[yl == c])
            (args, kw), *_ = [(a, kw) for a, kw in dots if kw["c"] == twomoons_plots.COLORS[c]]
            np.testing.assert_array_equal(np.stack(args, 1), x[y == c])


def test_decision_regions_draw_only_the_methods_that_ran(tmp_path, figures):
    """`--methods supervised,mpl`: two panels, no KeyError on the missing pseudo label model."""
    data = twomoons.stack_data([0], 0.1)
    gen = torch.Generator().manual_seed(0)
    models = {m: StackedMLP(1, 2, 2, hidden=4, generator=gen) for m in ("supervised", "mpl")}
    records = [{"method": m, "seed": 0, "accuracy": 0.5} for m in models]
    cfg = twomoons.TwoMoonsConfig(seeds=[0], methods=("supervised", "mpl"))
    result = {"data": data, "models": models, "records": records}
    twomoons_plots.plot_decision_regions(result, cfg, tmp_path / "twomoons.png")
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == ["Supervised: 50.0%", "MPL: 50.0%"]


def test_gradient_cosine_plots_the_mean_over_seeds_with_a_one_std_band(tmp_path, figures):
    per_seed = [[0.1, 0.4, -0.2], [0.3, 0.8, 0.0]]
    cosines = {
        "supervised": {"steps": [0, 5, 10], "per_seed": per_seed},
        "mpl": {"steps": [0, 5, 10], "per_seed": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]},
    }
    twomoons_plots.plot_gradient_cosine(cosines, tmp_path / "grad_cosine.png")
    (fig,) = figures
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    assert set(lines) == {"Supervised", "MPL"}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Supervised", "MPL"]
    mean, std = np.mean(per_seed, 0), np.std(per_seed, 0)
    np.testing.assert_allclose(lines["Supervised"].get_xdata(), [0, 5, 10])
    np.testing.assert_allclose(lines["Supervised"].get_ydata(), mean)
    band = ax.collections[0].get_paths()[0].vertices
    for step, m, s in zip((0, 5, 10), mean, std):
        ys = band[np.isclose(band[:, 0], step), 1]
        assert ys.min() == pytest.approx(m - s) and ys.max() == pytest.approx(m + s)


# --- twomoons ------------------------------------------------------------------------------------


def test_stacked_data_holds_each_seeds_labeled_and_unlabeled_points():
    from metapl.data.twomoons import make_twomoons

    data = twomoons.stack_data([3, 4], 0.1)
    for i, seed in enumerate((3, 4)):
        d = make_twomoons(seed, 0.1)
        assert torch.equal(data.y_labeled[i], torch.from_numpy(d.y[d.labeled]))
        assert torch.equal(data.x_unlabeled[i], torch.from_numpy(d.x[d.unlabeled]))
    # a batch as large as the unlabeled set is the whole set, each point once
    assert twomoons._batch(data.x_unlabeled, 1994, torch.Generator()) is data.x_unlabeled


def _tiny_data(seeds=(0, 1)):
    return twomoons.stack_data(list(seeds), 0.1)


def test_gradient_cosine_compares_with_the_gradient_on_every_points_true_label():
    data = _tiny_data()
    model = StackedMLP(2, 2, 2, hidden=8, generator=torch.Generator().manual_seed(0))
    loss = lambda: twomoons.batch_mean(  # noqa: E731
        twomoons.hard_cross_entropy(model(data.x_labeled), data.y_labeled), 1
    )
    got = twomoons.gradient_cosine(model, loss, data)
    g_train = twomoons.member_grads(model, loss())
    held_out = twomoons.hard_cross_entropy(model(data.x), data.y)
    g_val = twomoons.member_grads(model, twomoons.batch_mean(held_out, 1))
    expected = torch.nn.functional.cosine_similarity(g_train, g_val, dim=1)
    torch.testing.assert_close(got, expected)
    assert (got < 0.9999).all()  # not the training gradient against itself


def _record_student_inputs(monkeypatch):
    """The points every model built by twomoons._model is called on, in order."""
    inputs: list = []
    real = twomoons._model

    def model(*args):
        m = real(*args)
        m.register_forward_pre_hook(lambda mod, a: inputs.append(a[0]))
        return m

    monkeypatch.setattr(twomoons, "_model", model)
    return inputs


def _record(monkeypatch, name):
    calls: list = []
    real = getattr(twomoons, name)

    def spy(logits, target):
        calls.append(target)
        return real(logits, target)

    monkeypatch.setattr(twomoons, name, spy)
    return calls


def _rows_are_members_points(batch, points):
    """Each member's batch rows are among that member's own points."""
    for b, p in zip(batch, points):
        assert (b[:, None] == p[None]).all(-1).any(1).all()


@pytest.mark.parametrize("soft", [False, True])
def test_pseudo_labels_are_the_teachers_on_a_batch_of_unlabeled_points(monkeypatch, soft):
    """The student learns the fixed teacher's labels (its argmax for hard ones, its probabilities
    for soft ones) on unlabeled_batch unlabeled points per seed, plus the labeled points' own
    labels."""
    data = _tiny_data()
    cfg = twomoons.TwoMoonsConfig(seeds=[0, 1], steps=1, hidden=4, unlabeled_batch=16)
    teacher = StackedMLP(2, 2, 2, hidden=4, generator=torch.Generator().manual_seed(1))
    inputs = _record_student_inputs(monkeypatch)
    soft_targets, hard_targets = (
        _record(monkeypatch, "soft_cross_entropy"),
        _record(monkeypatch, "hard_cross_entropy"),
    )
    twomoons.train_pseudo_label(cfg, data, teacher, soft, torch.Generator().manual_seed(0))
    x_u, x_l = inputs
    assert x_u.shape == (2, 16, 2)
    _rows_are_members_points(x_u, data.x_unlabeled)
    assert torch.equal(x_l, data.x_labeled)
    with torch.no_grad():
        probs = torch.softmax(teacher(x_u), -1)
    (q,) = soft_targets
    if soft:
        torch.testing.assert_close(q, probs)
    else:
        assert torch.equal(q, torch.nn.functional.one_hot(probs.argmax(-1), 2).to(q.dtype))
    (y,) = hard_targets
    assert torch.equal(y, data.y_labeled)


def test_run_gives_pseudo_labels_the_trained_supervised_model_as_teacher(monkeypatch):
    teachers = []
    real = twomoons.train_pseudo_label

    def spy(cfg, data, teacher, soft, gen, tick):
        teachers.append(teacher)
        return real(cfg, data, teacher, soft, gen, tick)

    monkeypatch.setattr(twomoons, "train_pseudo_label", spy)
    methods = ("supervised", "pseudo_label_soft")
    result = twomoons.run(twomoons.TwoMoonsConfig(seeds=[0], steps=1, hidden=4, methods=methods))
    assert teachers == [result["models"]["supervised"]]


def test_mpl_uses_each_learning_rate_and_measures_the_students_soft_targets(monkeypatch):
    """The teacher's optimizer has teacher_lr, the student's lr; MPL steps on a batch of unlabeled
    points; Figure 8's train loss is the student's cross-entropy with the teacher's targets at the
    temperature (in eval mode)."""
    built = []
    real_mpl = twomoons.MetaPseudoLabels

    def mpl_spy(*args, **kwargs):
        built.append(args)
        return real_mpl(*args, **kwargs)

    losses = []
    real_cos = twomoons.gradient_cosine

    def cos_spy(model, train_loss, data):
        losses.append(train_loss)
        return real_cos(model, train_loss, data)

    monkeypatch.setattr(twomoons, "MetaPseudoLabels", mpl_spy)
    monkeypatch.setattr(twomoons, "gradient_cosine", cos_spy)
    data = _tiny_data()
    cfg = twomoons.TwoMoonsConfig(
        seeds=[0, 1],
        steps=1,
        hidden=4,
        lr=0.01,
        teacher_lr=0.2,
        temperature=0.25,
        unlabeled_batch=8,
        cosine_every=1,
    )
    student, teacher, _ = twomoons.train_mpl(cfg, data, torch.Generator().manual_seed(0))
    ((t, s, t_opt, s_opt),) = built
    assert t is teacher and s is student
    assert t_opt.param_groups[0]["lr"] == 0.2 and s_opt.param_groups[0]["lr"] == 0.01
    (train_loss,) = losses
    (x_u,) = train_loss.__defaults__
    assert x_u.shape == (2, 8, 2)
    _rows_are_members_points(x_u, data.x_unlabeled)
    with torch.no_grad():
        q = torch.softmax(teacher.eval()(x_u) / 0.25, -1)
        expected = twomoons.batch_mean(twomoons.soft_cross_entropy(student(x_u), q), 1)
        torch.testing.assert_close(train_loss(), expected)


def test_accuracy_is_the_share_of_points_each_member_gets_right_in_eval_mode():
    model = StackedMLP(2, 2, 2, hidden=8, dropout=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 40, 2, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(-1)
    model.train()
    y = pred.clone()
    y[1, :10] = 1 - y[1, :10]  # member 1 gets 30 of its 40 points right
    assert twomoons.accuracy(model, x, y).tolist() == [1.0, 0.75]
    assert model.training  # left as it was


def test_other_seeds_start_from_other_weights(monkeypatch):
    """The seeds name the draw: --seeds 1 and --seeds 2 start from different initial weights (the
    tuning seeds 100-109 and the reported 0-9 are independent draws), and a seed's rerun from the
    same ones."""
    firsts = []
    real = twomoons._model

    def model(*args):
        m = real(*args)
        firsts.append(next(m.parameters()).detach().clone())
        return m

    monkeypatch.setattr(twomoons, "_model", model)
    for seed in (1, 2, 1):
        cfg = twomoons.TwoMoonsConfig(seeds=[seed], steps=1, hidden=4, methods=("supervised",))
        twomoons.run(cfg)
    one, two, one_again = firsts
    assert not torch.equal(one, two) and torch.equal(one, one_again)
