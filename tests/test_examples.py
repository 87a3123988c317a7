"""The examples in examples/ run against today's API (a few steps each), so they cannot rot."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra", [[], ["--consistency"]])
def test_mpl_on_your_models_runs_and_learns(capsys, extra):
    example = load("mpl_on_your_models")
    result = example.main(["--steps", "40", "--unlabeled-batch", "32", *extra])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and printed[-1].startswith("step    40")
    assert set(result) == {"student", "teacher", "labels_only"}
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in result.values())
    # 100 labels, 40 steps: the models trained on labels are well above chance (10%)
    assert result["teacher"] > 20 and result["labels_only"] > 20


def test_the_split_is_disjoint_and_balanced():
    example = load("mpl_on_your_models")
    x_l, y_l, x_u, x_test, y_test = example.digits_split(0, labels_per_class=3)
    assert sorted(y_l.tolist()) == sorted(list(range(10)) * 3)
    assert len(x_l) + len(x_u) + len(x_test) == 1797 and len(x_test) == 540
    rows = {tuple(r.flatten().tolist()) for r in x_l}
    assert not rows & {tuple(r.flatten().tolist()) for r in x_test}
    assert 0 <= float(x_u.min()) and float(x_u.max()) <= 1
