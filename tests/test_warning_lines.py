"""metapl's own warnings show as one line on the command line (metapl.warning_lines)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import metapl
from metapl.warning_lines import one_line_warnings

OWN_FILE = str(Path(metapl.__file__).parent / "train" / "large_teacher.py")


def test_a_warning_of_metapls_own_code_is_one_line_in_a_command():
    """`metapl reduced` showed "/.../metapl/train/large_teacher.py:76: UserWarning: ..." and then
    the source line that raised it, around the one sentence meant for the user."""
    before = warnings.formatwarning
    message = UserWarning("x.npy is unreadable (truncated);\nstarting over from row 0")
    with one_line_warnings("reduced"):
        own = warnings.formatwarning(message, UserWarning, OWN_FILE, 76, "precompute(")
        other = warnings.formatwarning(message, UserWarning, "/lib/torch/nn.py", 5, "x = 1")
    assert (
        own
        == "metapl reduced: warning: x.npy is unreadable (truncated); starting over from row 0\n"
    )
    assert other == before(message, UserWarning, "/lib/torch/nn.py", 5, "x = 1")  # Python's form
    assert "/lib/torch/nn.py:5: UserWarning" in other
    assert warnings.formatwarning is before  # only in the block


def test_the_command_line_shows_it_so():
    """End to end: a warning metapl raises while a command runs, on stderr as one line."""
    code = (
        "import warnings, sys\n"
        "from metapl import cli\n"
        "from metapl.train import presets\n"
        "def listed():\n"
        "    warnings.warn_explicit('a word for the user', UserWarning, presets.__file__, 1)\n"
        "    return {}\n"
        "presets.preset_table = listed\n"
        "sys.exit(cli.main(['presets']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "metapl presets: warning: a word for the user\n"
