"""Kill hand-made mutants of :mod:`metapl.atomic` and :mod:`metapl.train.ema` that survived the
rest of the suite (tests/test_atomic.py, test_checkpoint_mutants.py, test_interrupts.py,
test_train_utils.py, test_engine_mutants.py); each test is what a surviving mutant broke unseen:

- no file descriptor stays open after a write (the temporary's, or the one its fsync used);
- :func:`~metapl.atomic.remove_leftovers` deletes a killed writer's ``.NAME.*.tmp`` files, and
  only those;
- :func:`~metapl.atomic.write_json_atomically` indents by 1 unless the caller says otherwise;
- :meth:`metapl.train.ema.EMA.load_state_dict` refuses the weights of another model.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from metapl.atomic import (
    remove_leftovers,
    temp_file_beside,
    write_json_atomically,
)
from metapl.train.ema import EMA

# ----------------------------------------------------------------------------- atomic


def _open_fds() -> set[int]:
    """The open file descriptors below 1024 (portable: no /proc)."""
    fds = set()
    for fd in range(1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        fds.add(fd)
    return fds


def test_an_atomic_write_closes_every_file_it_opens(tmp_path):
    """A long run writes a checkpoint and its JSON summaries thousands of times: one descriptor
    leaked per write ends in 'Too many open files'."""
    write_json_atomically(tmp_path / "warm.json", {})  # imports and caches first
    before = _open_fds()
    for i in range(5):
        write_json_atomically(tmp_path / "r.json", {"i": i})
    assert _open_fds() == before


def test_remove_leftovers_deletes_a_killed_writers_temporaries_only(tmp_path):
    """A ``kill -9`` between creating a temporary and renaming it leaves ``.NAME.<random>.tmp``;
    the next run deletes those and nothing else: not the file itself, not another file's
    temporaries, not a user's file that merely starts like one."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the checkpoint")
    killed = temp_file_beside(path, lambda tmp: tmp.write_bytes(b"half"))  # never renamed
    assert killed.parent == tmp_path and killed.name.startswith(".checkpoint.pt.")
    keep = [
        tmp_path / ".checkpoint.pt.notes",  # not a .tmp
        tmp_path / ".metrics.csv.abc.tmp",  # another file's temporary
        tmp_path / "checkpoint.pt.tmp",  # not hidden: not one of ours
    ]
    for other in keep:
        other.write_text("x")
    remove_leftovers(path)
    assert sorted(tmp_path.iterdir()) == sorted([path, *keep])
    assert path.read_bytes() == b"the checkpoint"


def test_write_json_atomically_indents_by_one_unless_told(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomically(path, {"a": [1]})
    assert path.read_text() == '{\n "a": [\n  1\n ]\n}'
    write_json_atomically(path, {"b": 2, "a": 1}, indent=None, sort_keys=True)
    assert path.read_text() == '{"a": 1, "b": 2}'


# ----------------------------------------------------------------------------- EMA


class _Tiny(nn.Module):
    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.linear = nn.Linear(3, width)
        self.bn = nn.BatchNorm1d(width)


def test_ema_load_state_dict_refuses_another_models_weights():
    """A resumed run restores the EMA from its checkpoint: weights of another model (missing
    or extra keys) are an error, not silently ignored (the EMA kept its fresh initial weights)."""
    ema = EMA(_Tiny(), 0.5)
    state = ema.state_dict()
    with pytest.raises(RuntimeError, match="Missing key"):
        ema.load_state_dict({k: v for k, v in state.items() if not k.startswith("bn.")})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        ema.load_state_dict({**state, "head.weight": torch.zeros(1)})
