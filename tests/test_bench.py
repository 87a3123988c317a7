"""`metapl bench` writes the JSON the issue asks for (a tiny model on CPU: the shape, not speed)."""

import json

import pytest
from torch import nn

from metapl.cli import main
from metapl.models import list_models, register_model
from metapl.models.small import DigitsCNN


def bench_tiny_cnn(num_classes: int, dropout: float = 0.0) -> nn.Module:
    return DigitsCNN(num_classes, width=4, dropout=dropout, in_chans=3)


if "bench_tiny_cnn" not in list_models():
    register_model(bench_tiny_cnn)


@pytest.mark.parametrize("layout, channels_last", [("auto", False), ("channels_last", True)])
def test_bench_writes_every_step_kind(tmp_path, capsys, layout, channels_last):
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--repeats",
        "2",
        "--model",
        "bench_tiny_cnn",
        "--json",
        str(out),
        "--memory-format",
        layout,
    ]
    assert main(args) == 0
    payload = json.loads(out.read_text())
    assert payload["machine"]["device"] == "cpu" and "torch" in payload["machine"]
    names = [r["name"] for r in payload["results"]]
    for part in ("supervised", "uda", "first_order", "exact", "double_backward", "train_step"):
        assert any(part in n for n in names), part
    assert all(r["ms"] > 0 and len(r["ms_all"]) == 2 for r in payload["results"])
    assert payload["setup"]["batch_unlabeled"] == 14
    assert (payload["setup"]["memory_format"], payload["setup"]["channels_last"]) == (
        layout,
        channels_last,
    )
    jvp = {r["name"]: r.get("jvp") for r in payload["results"]}
    assert jvp["exact_mpl_step"] == "tape" and jvp["exact_mpl_step_forward_ad"] == "forward_ad"
    ms = {r["name"]: r["ms"] for r in payload["results"]}
    ratios = payload["ratios"]
    assert (
        ratios["exact_over_double_backward"]
        == ms["exact_mpl_step"] / ms["double_backward_mpl_step"]
    )
    assert ratios["exact_over_first_order"] == ms["exact_mpl_step"] / ms["first_order_mpl_step"]
    assert "exact_over_first_order_peak_memory" not in ratios  # no peak memory on a CPU
    printed = capsys.readouterr().out
    assert "exact_mpl_step" in printed and "exact_over_double_backward" in printed


def test_bench_rejects_a_bad_batch_size(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
