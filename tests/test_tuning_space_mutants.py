"""Gaps a hand-made mutation audit found in the tuning helpers that test_tune.py and
test_tune_mutants.py left open: the search spaces as docs/tuning.md documents them
(metapl.tuning.space), best.toml's values (metapl.tuning.bestfile) and joining a study
(metapl.tuning.studies).

No training and no Optuna storage: the whole file takes well under a second.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from metapl.errors import ConfigError
from metapl.train.presets import load_preset
from metapl.tuning import bestfile, space, studies

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DOCS = Path(__file__).resolve().parents[1] / "docs" / "tuning.md"


def _documented_ranges() -> dict[str, tuple[str, str]]:
    """docs/tuning.md's search-space table: key -> (distribution, range text)."""
    text = DOCS.read_text()
    table = text.split("## Search spaces", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        for key in re.findall(r"`(\w+)`", cells[0]):
            rows[key] = (cells[1], cells[2])
    return rows


def test_the_search_spaces_are_the_ones_docs_tuning_md_documents():
    """Every searched key, its distribution, its bounds and its methods are what the docs' table
    says (a range changed in the code without the docs, or the reverse, misleads every user who
    reads which values `metapl tune` tries)."""
    documented = _documented_ranges()
    ranges = [*space.STUDENT, *space.TEACHER]
    assert sorted(r.key for r in ranges) == sorted(documented)
    for r in ranges:
        distribution, where = documented[r.key]
        assert distribution == ("log-uniform" if r.log else "uniform"), r.key
        low, high = (float(v) for v in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", where)[:2])
        assert (low, high) == (r.low, r.high), r.key
        assert r.relative == ("preset's value" in where), r.key
        assert (r.methods == ("uda_mpl",)) == ("(UDA+MPL only)" in where), r.key
        assert r.methods in (None, ("uda_mpl",)), r.key


@pytest.mark.parametrize(
    "r, want",
    [
        (
            space.Range("student_lr", 0.1, 10.0, log=True, relative=True),
            "student_lr: log-uniform, 0.1x to 10x the preset's value",
        ),
        (space.Range("student_dropout", 0.0, 0.7), "student_dropout: uniform in [0, 0.7]"),
        (
            space.Range("uda_factor", 0.25, 16.0, log=True, methods=("uda_mpl",)),
            "uda_factor: log-uniform in [0.25, 16] (only uda_mpl)",
        ),
    ],
)
def test_a_range_describes_its_distribution_bounds_and_methods(r, want):
    assert r.describe() == want


@pytest.mark.parametrize("value", ['say "hi"', "back\\slash", "tab\there", "üñí", ""])
def test_a_string_in_best_toml_reads_back_as_itself(value):
    """A --set string (a folder with a quote or a backslash, say) survives best.toml."""
    assert tomllib.loads(f"x = {bestfile.toml_value(value)}")["x"] == value


def test_a_trials_config_is_validated_before_it_trains():
    """A stage-1 value recorded in a study (here one out of range) reaches no training: the
    trial's config is refused with the config's own message."""
    base = load_preset("digits-uda-mpl")
    with pytest.raises(ConfigError, match=r"student_dropout must be in \[0, 1\), got 1.0"):
        space.trial_config(base, "teacher", {"student_dropout": 1.0}, {"teacher_dropout": 0.3})
    cfg = space.trial_config(base, "teacher", {"student_dropout": 0.2}, {"teacher_dropout": 0.3})
    assert (cfg.student_dropout, cfg.teacher_dropout, cfg.tuning) == (0.2, 0.3, True)


def test_best_toml_is_a_text_file_of_every_kept_value():
    """best.toml parses back to the config's values (none of the machine's), ends its last line,
    and lists each key once."""
    cfg = load_preset("digits-uda-mpl")
    text = bestfile.render(cfg, ["tuned by a test", ""], {"student_lr": "trial 3"})
    assert text.endswith("\n") and not text.endswith("\n\n")
    read = tomllib.loads(text)
    want = {k: v for k, v in cfg.to_dict().items() if k not in bestfile.LEFT_OUT and v is not None}
    assert read == {k: list(v) if isinstance(v, tuple) else v for k, v in want.items()}
    assert text.splitlines()[:2] == ["# tuned by a test", "#"]


def test_stage_two_stops_waiting_for_a_dead_processes_trial_and_says_so_once(monkeypatch, capsys):
    """wait_for_running fails the trials of dead processes on each poll (else stage 2 waited for
    them forever) and prints its waiting line once, not once a second."""
    running = [object()]  # a trial of another process, still RUNNING in the storage
    polls = []

    def fail_stopped(optuna, study):
        if len(polls) == 3:  # its process turns out to be gone on the third look
            running.clear()

    def sleep(seconds):
        polls.append(seconds)
        assert len(polls) < 10, "still waiting for a trial that fail_stopped_trials failed"

    study = SimpleNamespace(
        study_name="t-student", get_trials=lambda deepcopy, states: list(running)
    )
    fake_optuna = SimpleNamespace(trial=SimpleNamespace(TrialState=SimpleNamespace(RUNNING=1)))
    monkeypatch.setattr(studies, "fail_stopped_trials", fail_stopped)
    monkeypatch.setattr(studies.time, "sleep", sleep)
    studies.wait_for_running(fake_optuna, study)
    assert polls == [studies.POLL_S] * 3
    out = capsys.readouterr().out
    assert out == (
        "waiting for 1 running trial(s) of t-student before fixing the student's values\n"
    )
