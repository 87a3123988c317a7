"""The documentation against the code, mechanically: README.md and docs/*.md.

- every relative link resolves, and every ``#anchor`` names a heading of its page (GitHub's slugs);
- every repository path the docs name (``benchmarks/...``, ``results/...``, ``src/...``, ...) exists;
- every ``--set KEY=...`` (or ``--set METHOD:KEY=...``) names a ``TrainConfig`` field;
- every ``--option`` of a ``metapl COMMAND ...`` command line is an option of that command;
- every ``metapl.x.y`` name resolves to a module or attribute;
- every backticked preset name (``digits-uda-mpl``) is a preset of ``metapl presets``.

Reads text and imports modules only: well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from metapl.cli import build_parser
from metapl.train.config import TrainConfig
from metapl.train.presets import preset_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# dataset and split names, which look like preset names but are not meant as presets
SPLITS = {
    "imagenet-10pct",
    "imagenet-20pct",
    "imagenet-40pct",
    "imagenet-80pct",
    "cifar10-full",
    "svhn-full",
    "imagenet-full",
    "digits-uda-mpl-student",  # docs/tuning.md: a study's name
    "digits-uda-mpl-teacher",
}


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of ``path``, a code block's backslash-continued lines joined."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
            continue
        out.append((number, line))
    if pending is not None:
        out.append(pending)
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#+ ", line):
            anchors.add(_slug(re.sub(r"^#+ ", "", line)))
    return anchors


def _where(path: Path, number: int) -> str:
    return f"{path.relative_to(ROOT)}:{number}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_there_are_docs_to_check():
    assert len(DOCS) >= 8 and all(p.is_file() for p in DOCS)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(doc):
    bad = []
    for number, line in _lines(doc):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                bad.append(f"{_where(doc, number)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                bad.append(f"{_where(doc, number)}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_repository_path_exists(doc):
    bad = []
    pattern = r"(?<![\w/.])((?:benchmarks|results|src|tests|examples|docs|\.ci)/[\w./\-*{}]+)"
    for number, line in _lines(doc):
        for found in re.findall(pattern, line):
            path = found.rstrip(".,);:")
            if any(c in path for c in "*{}"):
                if not list(ROOT.glob(re.sub(r"\{[^}]*\}", "*", path))):
                    bad.append(f"{_where(doc, number)}: {path} matches nothing")
            elif not (ROOT / path).exists() and not (doc.parent / path).exists():
                bad.append(f"{_where(doc, number)}: {path} does not exist")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_set_key_is_a_config_key(doc):
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = []
    for number, line in _lines(doc):
        for key in re.findall(r"--set[ =]+`?(?:\w+:)?(\w+)=", line):
            # "key" and "KEY": the placeholders of `--set key=value`
            if key not in keys and key not in ("key", "KEY"):
                bad.append(f"{_where(doc, number)}: --set {key}=... is not a TrainConfig key")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_option_of_a_command_line_is_the_commands(doc):
    commands = _subcommands()
    options = {
        name: {s for a in parser._actions for s in a.option_strings}
        for name, parser in commands.items()
    }
    bad = []
    names = "|".join(commands)
    for number, line in _lines(doc):
        for command, rest in re.findall(rf"metapl ({names})\b([^`\n|]*)", line):
            for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
                if option not in options[command]:
                    bad.append(f"{_where(doc, number)}: metapl {command} has no {option}")
    assert not bad, "\n".join(bad)


def test_every_subcommand_has_a_row_in_the_readmes_command_table():
    """A command added without a word in the README (`metapl compare` was the last one)."""
    readme = (ROOT / "README.md").read_text().splitlines()
    rows = [line for line in readme if line.startswith("| `metapl ")]
    missing = [name for name in _subcommands() if not any(f"`metapl {name}" in r for r in rows)]
    assert not missing, f"README's command table has no row for: {missing}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_metapl_name_resolves(doc):
    bad = []
    for number, line in _lines(doc):
        for dotted in re.findall(r"\bmetapl(?:\.[A-Za-z_]\w*)+", line):
            if dotted.endswith(".json"):  # a file name: the TorchScript file's metapl.json
                continue
            if not _resolves(dotted):
                bad.append(f"{_where(doc, number)}: {dotted} does not resolve")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_backticked_preset_name_is_a_preset(doc):
    presets = set(preset_table())
    bad = []
    for number, line in _lines(doc):
        for name in re.findall(r"`((?:cifar10|svhn|imagenet|digits|folder)-[\w\-]+)`", line):
            if name not in presets and name not in SPLITS:
                bad.append(f"{_where(doc, number)}: {name} is not a preset")
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_look_for():
    """The checks themselves: a broken anchor, a made-up key and option are found."""
    assert _slug("Digits: real images on CPU (Section 4.1's methods, Figure 9)") == (
        "digits-real-images-on-cpu-section-41s-methods-figure-9"
    )
    assert "inputs" in _anchors(ROOT / "docs" / "library.md")
    assert "no-such-heading" not in _anchors(ROOT / "docs" / "library.md")
    assert _resolves("metapl.train.config.TrainConfig")
    assert not _resolves("metapl.train.config.NoSuchThing")
    assert "--steps" in {s for a in _subcommands()["train"]._actions for s in a.option_strings}
    assert "--stpes" not in {s for a in _subcommands()["train"]._actions for s in a.option_strings}
