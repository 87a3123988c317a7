"""End-to-end: `metapl twomoons` writes what it promises, and rejects bad input cleanly."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from metapl.cli import main
from metapl.data.twomoons import make_twomoons
from metapl.experiments.stacked import StackedMLP
from metapl.experiments.twomoons import TwoMoonsConfig, run


def test_twomoons_writes_results_and_figures(tmp_path, capsys):
    out = tmp_path / "tm"
    assert main(["twomoons", "--seeds", "0-1", "--steps", "30", "--out", str(out), "--quiet"]) == 0
    payload = json.loads((out / "results.json").read_text())
    records = payload["results"]
    methods = {r["method"] for r in records}
    assert methods == {"supervised", "pseudo_label_hard", "pseudo_label_soft", "mpl"}
    assert sorted({r["seed"] for r in records}) == [0, 1]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    cos = payload["grad_cosine"]
    assert set(cos) == {"supervised", "mpl"} and len(cos["mpl"]["per_seed"]) == 2
    for png in ("twomoons.png", "grad_cosine.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    # MPL minus each baseline, seed by seed, with the numbers of the records
    acc = {(r["method"], r["seed"]): r["accuracy"] for r in records}
    diff = sum(acc["mpl", s] - acc["supervised", s] for s in (0, 1)) / 2
    line = next(row for row in printed.splitlines() if "mpl - supervised" in row)
    assert f"{100 * diff:+.2f} points paired" in line
    assert "mpl - pseudo_label_soft" in printed and "over 2 seeds" in printed


def test_a_rerun_replaces_only_results_of_the_same_configuration(tmp_path, capsys):
    """A rerun into the same --out with other seeds silently replaced the earlier results."""
    out = tmp_path / "tm"
    args = ["twomoons", "--steps", "5", "--out", str(out), "--quiet"]
    assert main([*args, "--seeds", "0-1"]) == 0
    earlier = (out / "results.json").read_text()
    assert main([*args, "--seeds", "0-1"]) == 0  # the same command again: the same results
    assert (out / "results.json").read_text() == earlier
    capsys.readouterr()
    assert main([*args, "--seeds", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another configuration (seeds=[0, 1])" in err, err
    assert (out / "results.json").read_text() == earlier


def test_results_of_an_older_metapl_are_rerun_at_a_new_options_default(tmp_path, capsys):
    """A results.json from before an option existed (--estimator, here dropped from it): the same
    command was refused as "another configuration (estimator=None)"."""
    out = tmp_path / "tm"
    args = ["twomoons", "--steps", "5", "--seeds", "0", "--out", str(out), "--quiet"]
    assert main(args) == 0
    path = out / "results.json"
    results = json.loads(path.read_text())
    assert results["config"].pop("estimator") == "exact"
    path.write_text(json.dumps(results))
    capsys.readouterr()
    assert main([*args, "--estimator", "first_order"]) == 2  # another value: refused
    assert "another configuration (estimator=exact)" in capsys.readouterr().err
    assert main(args) == 0
    assert json.loads(path.read_text())["config"]["estimator"] == "exact"


@pytest.mark.parametrize("seeds", ["9-3", "x", "1,1"])
def test_bad_seeds_exit_2_with_one_line(tmp_path, seeds):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "metapl",
            "twomoons",
            "--seeds",
            seeds,
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--seeds" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_the_number_of_threads_changes_no_result(monkeypatch):
    """The thread count follows the machine's load (idle_cores_threads); the help says the results
    are the same, and they are, to the bit. Would break: a reduction split by thread count (then a
    busy machine would move the published numbers)."""
    cfg = TwoMoonsConfig(seeds=list(range(10)), steps=40)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res = run(cfg)
            results.append((res["records"], res["cosines"]))
    finally:
        torch.set_num_threads(before)
    (records_1, cosines_1), (records_2, cosines_2) = results
    assert records_1 == records_2
    for method in cosines_1:
        assert torch.equal(cosines_1[method], cosines_2[method])


def test_labeled_points_are_three_per_class_and_deterministic():
    a, b = make_twomoons(3), make_twomoons(3)
    assert np.array_equal(a.labeled, b.labeled)
    assert np.bincount(a.y[a.labeled]).tolist() == [3, 3]
    assert len(a.unlabeled) == 1994 and len(a.y) == 2000


def test_stacked_members_are_independent():
    """Member 0 of a stacked run equals the same member trained in a stack of its own."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = StackedMLP(3, 2, 2, hidden=8, generator=gen)
    x = torch.randn(3, 5, 2)
    out = model(x)
    # perturbing member 1's input leaves members 0 and 2 untouched
    x2 = x.clone()
    x2[1] += 1.0
    out2 = model(x2)
    assert torch.equal(out[0], out2[0]) and torch.equal(out[2], out2[2])
    assert not torch.equal(out[1], out2[1])


def test_seed_batching_matches_single_seed_run():
    """Seeds trained together give each seed's data to its own member: results for seed 5 depend
    only on seed 5's data (same data, same labeled points)."""
    cfg = TwoMoonsConfig(seeds=[5, 6], steps=5, methods=("supervised",))
    res = run(cfg)
    d = make_twomoons(5)
    assert torch.equal(res["data"].x[0], torch.from_numpy(d.x))
    assert torch.equal(res["data"].x_labeled[0], torch.from_numpy(d.x[d.labeled]))


def test_a_decision_region_panel_evaluates_one_member_only():
    """The panels show one seed: evaluating the whole stack on the 60,000-point grid to read one
    member cost about 30 MB per seed (13 GB for --seeds 0-399). The member's own weights give the
    same probabilities."""
    from metapl.experiments.twomoons_plots import _member_probs

    model = StackedMLP(5, 2, 2, hidden=8, depth=2, generator=torch.Generator().manual_seed(0))
    grid = np.random.RandomState(0).randn(50, 2)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    got = _member_probs(model, 3, grid)
    assert seen == [1]
    with torch.no_grad():
        full = torch.softmax(model(torch.from_numpy(grid).float()[None].expand(5, -1, -1)), -1)
    np.testing.assert_allclose(got, full[3, :, 1].numpy(), rtol=1e-6, atol=1e-7)


def test_first_order_estimator_trains_mpl_with_sampled_labels(tmp_path, capsys):
    """--estimator first_order reaches MPL's step (another student than the exact one's, from the
    same seeds and data) and is recorded; the baselines do not depend on it."""
    runs = {}
    for estimator in ("exact", "first_order"):
        out = tmp_path / estimator
        argv = ["twomoons", "--seeds", "0-1", "--steps", "40", "--out", str(out), "--quiet"]
        assert main([*argv, "--estimator", estimator]) == 0
        payload = json.loads((out / "results.json").read_text())
        assert payload["config"]["estimator"] == estimator
        runs[estimator] = {(r["method"], r["seed"]): r["accuracy"] for r in payload["results"]}
        assert f"teacher gradient {estimator.replace('_', '-')}" in capsys.readouterr().out
    exact, first_order = runs["exact"], runs["first_order"]
    assert all(exact[k] == first_order[k] for k in exact if k[0] != "mpl")
    assert any(exact["mpl", s] != first_order["mpl", s] for s in (0, 1))


def test_first_order_estimator_samples_hard_labels_with_a_baseline(monkeypatch):
    """The config reaches MetaPseudoLabels: first-order with the baseline, exact without one."""
    import metapl.experiments.twomoons as tm

    seen = []
    real = tm.MetaPseudoLabels

    def spy(*args, **kwargs):
        seen.append((kwargs["estimator"], kwargs["baseline_decay"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(tm, "MetaPseudoLabels", spy)
    for estimator in ("exact", "first_order"):
        run(TwoMoonsConfig(seeds=[0], steps=2, methods=("supervised", "mpl"), estimator=estimator))
    assert seen == [("exact", None), ("first_order", 0.99)]


def test_the_progress_bar_counts_each_methods_steps_by_their_cost(monkeypatch):
    """The bar's ETA weighs an MPL step as several supervised ones. Would break: a bar of plain
    steps (it showed 3 s left as MPL began, with 18 s to go), or a total that the updates do not
    reach (the bar ended below 100%) or overshoot."""
    from metapl.experiments import twomoons

    bars = []

    class Recorder:
        def __init__(self, total, **kwargs):
            self.total, self.updates, self.method = total, [], None
            bars.append(self)

        def set_postfix_str(self, method, refresh=True):
            assert not refresh  # a redraw per method filled a log file (stderr redirected)
            self.method = method

        def update(self, n):
            self.updates.append((self.method, n))

        def close(self):
            pass

    monkeypatch.setattr(twomoons, "progress_bar", Recorder)
    run(TwoMoonsConfig(seeds=[0], steps=3), show_progress=True)
    (bar,) = bars
    assert sum(n for _, n in bar.updates) == bar.total
    costs = {method: {n for m, n in bar.updates if m == method} for method, _ in bar.updates}
    assert costs == {m: {twomoons.STEP_COST[m]} for m in twomoons.METHODS}
    assert twomoons.STEP_COST["mpl"] >= 3 * twomoons.STEP_COST["supervised"]
