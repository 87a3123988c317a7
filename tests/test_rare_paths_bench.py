"""`metapl bench` behaviour that a coverage run of the whole suite found unexercised on a CPU: the
ratios of a GPU's JSON (its labeled-graph row), and a --json folder the user may not write in.
The rest of bench.py's unexercised lines run on CUDA only (timing with synchronisation, peak
memory, the labeled pass in a CUDA graph, the batches made a step ahead).

Each test says what would break it."""

from __future__ import annotations

import os

import pytest
from test_train_cli import one_error_line

from metapl import bench
from metapl.cli import main


def rows(**ms_and_peaks) -> list[dict]:
    return [{"name": n, "ms": ms, "peak_mib": peak} for n, (ms, peak) in ms_and_peaks.items()]


def test_a_gpus_ratios_include_the_labeled_graph_step_and_peak_memory():
    """On a GPU the JSON has the exact step with its labeled pass in a CUDA graph: its time over
    first-order's is one of the ratios (`bench._ratios`, when a labeled-graph row is there), beside
    the peak-memory ratio that only a measured peak gives. Would break: the ratio missing from the
    JSON, or taken against the wrong row."""
    results = rows(
        exact_mpl_step=(60.0, 7200.0),
        first_order_mpl_step=(48.0, 6000.0),
        double_backward_mpl_step=(240.0, 9000.0),
        exact_mpl_step_forward_ad=(66.0, 7300.0),
        exact_mpl_step_labeled_graph=(54.0, 7100.0),
    )
    assert bench._ratios(results) == {
        "exact_over_first_order": pytest.approx(1.25),
        "exact_over_double_backward": pytest.approx(0.25),
        "forward_ad_over_tape": pytest.approx(1.1),
        "labeled_graph_over_first_order": pytest.approx(1.125),
        "exact_over_first_order_peak_memory": pytest.approx(1.2),
    }
    # a CPU's rows: no graph row, no peaks measured during the timing
    cpu = rows(
        exact_mpl_step=(60.0, None),
        first_order_mpl_step=(48.0, None),
        double_backward_mpl_step=(240.0, None),
        exact_mpl_step_forward_ad=(66.0, None),
    )
    assert set(bench._ratios(cpu)) == {
        "exact_over_first_order",
        "exact_over_double_backward",
        "forward_ad_over_tape",
    }


def test_a_json_in_a_folder_the_user_may_not_write_is_refused_before_timing(
    tmp_path, capsys, monkeypatch
):
    """--json into a folder without write permission: one line naming the folder, exit 2, before
    minutes of timing (`bench._check_json_path`'s os.access check). Root writes anywhere, so
    os.access is made to answer for that folder as it does for another user. Would break: the whole
    benchmark run, then a PermissionError traceback."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if os.fspath(path) == os.fspath(locked):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    target = locked / "sub" / "bench.json"
    argv = ["bench", "--device", "cpu", "--batch-size", "1", "--repeats", "1", "--quiet"]
    argv += ["--model", "small_cnn"]  # (had the check failed: a short benchmark, not minutes)
    assert main([*argv, "--json", str(target)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err == f"metapl bench: error: --json {target}: {locked} is not writable\n"
    assert list(locked.iterdir()) == []
