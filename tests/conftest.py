"""pytest configuration shared by the metapl test suite."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest -n N runs N worker processes side by side: one intra-op thread each, so that
        # they share the cores instead of oversubscribing them.
        torch.set_num_threads(1)
    # torch's forward-mode AD loads its JVP decompositions through torch.jit.script once, which
    # warns in recent torch; nothing to act on from here.
    config.addinivalue_line(
        "filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
    )


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread for modules of tiny models: on a small shared CI machine, torch's
    default thread pool spends more time synchronising than computing (measured 3x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
