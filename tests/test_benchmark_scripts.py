"""The benchmark scripts on a machine without the device they are told to use: one line and exit
2, as metapl's own commands, not torch's traceback from the first tensor put on the device (an
audit of benchmarks/ found four scripts that crashed so, and one that hid its child's error)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_no_cuda
@pytest.mark.parametrize(
    "script, args",
    [
        ("bn_kernels.py", ["--repeats", "1", "--scale", "0.01"]),  # its default device is cuda
        ("profile_step.py", ["--model", "small_cnn", "--repeats", "1", "--out", "OUT"]),
        ("reduced_memory.py", ["--device", "cuda", "--steps", "1"]),
    ],
)
def test_a_script_told_to_use_cuda_without_one_says_so_in_one_line(script, args, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    done = _run(script, *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"{script}: --device cuda was asked for, but PyTorch sees no CUDA device here"
    )
    assert not (tmp_path / "out").exists()


@needs_no_cuda
def test_train_throughput_gives_metapls_own_error_in_one_line():
    done = _run("train_throughput.py", "--steps", "1", "--warmup", "0")  # default: cuda
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "train_throughput.py: --device cuda was asked for, but PyTorch sees no CUDA device here"
    )


def test_reduced_memory_names_the_configuration_that_failed_and_its_own_last_line(tmp_path):
    """Each configuration runs in a child process; its error was lost behind
    CalledProcessError's "returned non-zero exit status 1"."""
    out = tmp_path / "memory.json"
    done = _run("reduced_memory.py", "--batch", "0", "--steps", "1", "--json", str(out))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "reduced_memory.py: reduced_mpl failed (exit 1): "
        "metapl.errors.DataError: x_labeled has no examples (shape[:1] (0,))"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("step_cpu.py", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
        ("augment_cpu.py", ["--rounds", "-2"], "argument --rounds: must be at least 1, got -2"),
        ("jvp_cpu.py", ["--models", "resnet50"], "argument --models: invalid choice: 'resnet50'"),
        ("compile_cpu.py", ["--variants", "exact,fast"], "unknown variant 'fast'; choose from"),
    ],
)
def test_a_count_or_model_the_script_cannot_use_is_a_usage_error(script, args, message, tmp_path):
    """--repeats 0 ended, after the whole setup, in statistics.median's error on an empty list;
    jvp_cpu.py ran small_convnet for any model name but wrn28_2 and saved it under that name."""
    out = tmp_path / "out.json"
    done = _run(script, "--json", str(out), *args)
    assert done.returncode == 2
    assert message in done.stderr.strip().splitlines()[-1]
    assert not out.exists()


def test_the_concatenated_tangent_convolution_is_the_convolutions_tangent(tmp_path):
    """benchmarks/tangent_conv_concat_cpu.py times conv(cat(dx, x), cat(W, dW)) against
    conv(dx, W) + conv(x, dW): its numbers mean something only if both are the convolution's
    tangent (forward-mode AD in float64), for every convolution of WRN-28-2 past the stem: the
    3x3 ones, the 1x1 shortcuts, with stride 1 and 2."""
    out = tmp_path / "concat.json"
    done = _run(
        "tangent_conv_concat_cpu.py",
        *("--images", "2", "--repeats", "1", "--warmup", "0", "--json", str(out)),
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["results"]
    fp32 = [r for r in rows if r["precision"] == "fp32"]
    assert len(fp32) == 27  # 24 3x3 convolutions in the blocks and 3 shortcuts
    assert {(tuple(r["weight"][2:]), tuple(r["stride"])) for r in fp32} == {
        ((3, 3), (1, 1)),
        ((3, 3), (2, 2)),
        ((1, 1), (1, 1)),
        ((1, 1), (2, 2)),
    }
    for form in ("max_error_two", "max_error_one"):
        assert max(r[form] for r in fp32) < 1e-5
        assert max(r[form] for r in rows if r["precision"] == "bf16") < 5e-2
