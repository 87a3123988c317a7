"""metapl's own warnings show as one line on the command line (metapl.warning_lines)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import metapl
from metapl.errors import MetaplWarning
from metapl.warning_lines import one_line_warnings

OWN_FILE = str(Path(metapl.__file__).parent / "train" / "large_teacher.py")


def test_a_metapl_warning_is_one_line_in_a_command_and_torchs_keep_their_form():
    """`metapl reduced` showed "/.../metapl/train/large_teacher.py:76: UserWarning: ..." and then
    the source line that raised it, around the one sentence meant for the user. A warning of
    torch's keeps Python's form, also where a line of metapl's called torch."""
    before = warnings.formatwarning
    message = MetaplWarning("x.npy is unreadable (truncated);\nstarting over from row 0")
    torchs = UserWarning("To copy construct from a tensor, use clone()")
    with one_line_warnings("reduced"):
        own = warnings.formatwarning(message, MetaplWarning, OWN_FILE, 76, "precompute(")
        other = warnings.formatwarning(torchs, UserWarning, OWN_FILE, 5, "x = torch.tensor(t)")
    line = "metapl reduced: warning: x.npy is unreadable (truncated); starting over from row 0\n"
    assert own == line
    assert other == before(torchs, UserWarning, OWN_FILE, 5, "x = torch.tensor(t)")
    assert f"{OWN_FILE}:5: UserWarning: To copy construct" in other
    assert warnings.formatwarning is before  # only in the block


def test_the_command_line_shows_it_so():
    """End to end: a warning metapl raises while a command runs, on stderr as one line."""
    code = (
        "import warnings, sys\n"
        "from metapl import cli\n"
        "from metapl.errors import MetaplWarning\n"
        "from metapl.train import presets\n"
        "def listed():\n"
        "    warnings.warn('a word for the user', MetaplWarning)\n"
        "    return {}\n"
        "presets.preset_table = listed\n"
        "sys.exit(cli.main(['presets']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "metapl presets: warning: a word for the user\n"
