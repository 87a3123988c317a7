"""The command line and `metapl bench`'s bookkeeping, where a wrong change still passed the other
tests: seed lists, option checks that must stop before any work, Ctrl-C's exit status, options that
must reach the config, and bench's timing arithmetic (on a fake clock: medians in milliseconds,
warm-up runs counted on the bar but never timed, the ratios the goals are stated in).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from metapl import bench, cli
from metapl.cli import main
from metapl.errors import ConfigError
from metapl.mpl import numerics
from metapl.train import run as live_run


def test_seed_lists_and_ranges():
    assert cli.parse_seeds("0-2,7") == [0, 1, 2, 7] and cli.parse_seeds("4") == [4]
    for bad in ("3-2,5", "2-1", "1,1", "x"):
        with pytest.raises(ConfigError, match="--seeds"):
            cli.parse_seeds(bad)


@pytest.mark.parametrize(
    "text, message",
    [
        # the digits split raised scikit-learn's random_state error as a traceback
        ("4294967296", "seeds must be in 0..4294967295"),
        ("0,4294967290-4294967296", "seeds must be in 0..4294967295"),
        # was "counts down; write it -3-0", advice that fails in turn
        ("0--3", "seeds must be in 0..4294967295"),
        # a range that counts down from past the limit: was "counts down; write it 0-4294967296"
        ("4294967296-0", "seeds must be in 0..4294967295"),
        # a MemoryError traceback while the list of numbers was built
        ("0-4294967295", "more than 10,000 seeds"),
        ("0-9999,10000", "more than 10,000 seeds"),
    ],
)
def test_seeds_out_of_numpys_range_or_too_many_are_one_line(text, message):
    with pytest.raises(ConfigError, match=f"--seeds '{text}': {message}"):
        cli.parse_seeds(text)
    assert len(cli.parse_seeds("0-9999")) == 10_000
    assert cli.parse_seeds("4294967295") == [4294967295]  # the limit itself is a seed


@pytest.mark.parametrize(
    "argv, message",
    [
        # one seed, one step: a missing check costs a second, not a whole run
        (["twomoons", "--seeds", "0", "--steps", "1", "--noise", "1.5"], "--noise must be in"),
        (["twomoons", "--steps", "0"], "--steps must be >= 1"),
        (["bench", "--device", "cpu", "--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_numbers_stop_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main([*argv, *(["--out", str(out)] if argv[0] == "twomoons" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"metapl {argv[0]}: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_ctrl_c_is_exit_130_with_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_presets", interrupted)
    assert main(["presets"]) == 130
    assert capsys.readouterr().err == "metapl presets: interrupted\n"


def test_train_options_reach_the_config(tmp_path):
    argv = [
        "train",
        "--preset",
        "cifar10-4k-uda",
        "--out",
        str(tmp_path),
        "--checkpoint-every",
        "7",
    ]
    argv += ["--seed", "4", "--device", "cpu", "--data-dir", "d", "--steps", "300"]
    cfg, _ = cli._train_config(cli.build_parser().parse_args(argv))
    assert (cfg.checkpoint_every, cfg.seed, cfg.device, cfg.data_dir, cfg.steps) == (
        7,
        4,
        "cpu",
        "d",
        300,
    )


# --- bench on a fake clock ---------------------------------------------------------------------


class Clock:
    """perf_counter that advances by the next of ``ticks`` (seconds) on every second reading."""

    def __init__(self, ticks):
        self.now, self.ticks, self.reads = 0.0, list(ticks), 0

    def __call__(self):
        self.reads += 1
        if self.reads % 2 == 0:
            self.now += self.ticks.pop(0)
        return self.now


class Bar:
    def __init__(self):
        self.n = 0

    def update(self, n=1):
        self.n += n


def test_interleaved_timing_is_the_median_in_ms_after_uncounted_warmup(monkeypatch):
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    # a, b per round: 1 warm-up round (not timed), then 3 timed rounds
    monkeypatch.setattr(
        bench.time, "perf_counter", Clock([0.001, 0.010, 0.003, 0.020, 0.002, 0.090])
    )
    bar = Bar()
    timings = bench._time_interleaved(fns, warmup=1, repeats=3, bar=bar)
    assert calls == ["a", "b"] * 4 and bar.n == 4  # every round moves the bar
    assert [t["ms_all"] for t in timings] == [
        pytest.approx([1.0, 3.0, 2.0]),
        pytest.approx([10.0, 20.0, 90.0]),
    ]
    assert [t["ms"] for t in timings] == [pytest.approx(2.0), pytest.approx(20.0)]
    assert all(t["peak_mib"] is None for t in timings)


def test_one_kind_timing_is_the_median_in_ms_after_warmup(monkeypatch):
    calls = []
    monkeypatch.setattr(bench.time, "perf_counter", Clock([0.004, 0.001, 0.100]))
    timing = bench._time(lambda: calls.append(1), bench.torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5
    assert timing["ms_all"] == pytest.approx([4.0, 1.0, 100.0]) and timing["ms"] == pytest.approx(
        4.0
    )
    assert timing["peak_mib"] is None


def test_ratios_are_exact_over_the_others_and_forward_ad_over_the_tape():
    def row(name, ms, peak=None):
        return {"name": name, "ms": ms, "peak_mib": peak}

    results = [
        row("exact_mpl_step", 50.0, 7000.0),
        row("first_order_mpl_step", 40.0, 8000.0),
        row("double_backward_mpl_step", 200.0),
        row("exact_mpl_step_forward_ad", 75.0),
    ]
    assert bench._ratios(results) == {
        "exact_over_first_order": 1.25,
        "exact_over_double_backward": 0.25,
        "forward_ad_over_tape": 1.5,
        "exact_over_first_order_peak_memory": 0.875,
    }


def test_cpu_bench_defaults_to_a_small_batch_and_its_bar_counts_every_round(monkeypatch):
    """On a CPU: 4 labeled images a batch unless told (128 is the GPU's), and the bar's length is
    the warm-up and the timed rounds, which _time_interleaved moves it by, and one round for each
    of the 7 kinds' peak memory."""

    class Built(Exception):
        pass

    bars, configs = [], []
    monkeypatch.setattr(bench, "progress_bar", lambda **kwargs: bars.append(kwargs) or Bar())

    real_run = live_run.Run

    def first_runs(cfg, *args):  # the first kind is built before the bar, the second after it
        configs.append(cfg)
        if len(configs) == 2:
            raise Built
        return real_run(cfg, *args)

    monkeypatch.setattr(live_run, "Run", first_runs)  # where bench takes it from
    with pytest.raises(Built):
        bench.run_bench(device="cpu", repeats=3, warmup=2, show_progress=False)
    assert [b["total"] for b in bars] == [2 + 3 + 7]
    assert configs[0].batch_size == 4 * 7  # the first kind steps on the unlabeled-sized batch


def test_bench_numerics_compare_at_most_64_labeled_and_448_unlabeled_images(monkeypatch):
    """The float64 reference runs on the CPU: a GPU-sized batch is cut to 64 + 7 * 64 images."""
    seen = []

    def agreement(teacher, student, make_optimizer, batch, *args, **kwargs):
        seen.append([len(part) for part in batch])
        return {"cosine": 1.0, "relative_error": 0.0}

    monkeypatch.setattr(numerics, "agreement_with_float64", agreement)
    student = torch.nn.Linear(1, 2)
    method = SimpleNamespace(
        models={"teacher": student, "student": student},
        optimizers={"student": torch.optim.SGD(student.parameters(), lr=0.1)},
    )
    run = SimpleNamespace(method=method, cfg=SimpleNamespace(mpl_temperature=1.0))
    batch = SimpleNamespace(
        x_labeled=torch.zeros(100, 1),
        y_labeled=torch.zeros(100),
        x_unlabeled_strong=torch.zeros(700, 1),
    )
    out = bench._numerics(run, batch, torch.device("cpu"), "fp32", lambda text: None)
    assert seen == [[64, 64, 448]]
    assert (out["batch_labeled"], out["batch_unlabeled"]) == (64, 448)
