"""Warnings that torch raises from inside itself while metapl runs, which no user can act on: a
command's output shows none of them.

Each check runs in a fresh interpreter, since torch raises these once per process (pytest's own
process has usually raised them already, in another test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Records every warning of a first exact MPL step (J by forward-mode AD, the library's default, or
# by the tangent tape after its forward-AD check, as `metapl train` runs), then prints them.
_FIRST_EXACT_STEP = """
import json, sys, warnings
import torch
from torch import nn
from metapl import MetaPseudoLabels

torch.manual_seed(0)
teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
mpl = MetaPseudoLabels(
    teacher, student,
    torch.optim.SGD(teacher.parameters(), lr=0.1), torch.optim.SGD(student.parameters(), lr=0.1),
    jvp=sys.argv[1],
)
with warnings.catch_warnings(record=True) as shown:
    warnings.simplefilter("always")
    mpl.step(torch.randn(6, 4), torch.randint(0, 3, (6,)), torch.randn(8, 4))
print(json.dumps([f"{w.category.__name__}: {w.message}" for w in shown]))
"""


@pytest.mark.parametrize("jvp", ["forward_ad", "auto"])
def test_the_first_exact_step_shows_no_torchscript_deprecation(jvp):
    # The first dual tensor of a process makes torch load its JVP decompositions, which call
    # torch.jit.script: torch 2.13 warns with a DeprecationWarning (hidden by default), torch 2.14
    # with a FutureWarning, which every `metapl twomoons|digits|train|tune|reduced|bench` showed.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "default"}
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_EXACT_STEP, jvp],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [w for w in shown if "torch.jit" in w], shown
    assert "torch.jit" not in done.stderr
