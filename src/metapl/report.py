"""Writing results: JSON files that are never half-written, and the accuracy table a command prints."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from metapl.atomic import write_json_atomically
from metapl.errors import ConfigError

# The files a command writes into its --out (a folder of one of these names is refused up front:
# a figure's folder failed as a traceback after the run, with results.json already replaced).
RUN_FILES = (
    "results.json",
    "config.json",
    "checkpoint.pt",
    "checkpoint.prev.pt",
    "metrics.csv",
    "classes.json",
    "curves.png",
    "twomoons.png",
    "grad_cosine.png",
    "figure9.png",
    "figure9.json",
    "figure10.png",
    "figure10.json",
)
# ... and the folders (`metapl train`'s TensorBoard logs): a file of the name failed as a traceback
# after config.json and metrics.csv were written.
RUN_FOLDERS = ("tb",)
TUNE_RESULT = "best.toml"  # `metapl tune`'s result in its --out, beside trials/


def output_folder(path: Path | str, option: str = "--out", command: str | None = None) -> Path:
    """``path`` as a folder a command can create or reuse, checked before any work starts (a file
    in its place would otherwise surface as a traceback when the first result is written, after
    the work is done). With ``command``: a folder holding another command's results is refused,
    since this command would overwrite its results.json."""
    if not str(path).strip():  # Path("") is the current folder: an unset $VAR wrote into it
        raise ConfigError(f"{option} is empty; give a folder name")
    path = Path(path)
    # The shell expands ~ only unquoted at the start of a word: `--out=~/runs/a` (or '~/runs/a')
    # made a folder named ~ in the current folder, and the run went there without a word.
    if path.parts[0].startswith("~") and not Path(path.parts[0]).exists():
        expanded = os.path.expanduser(path)  # unchanged for ~name of a user not known here
        instead = f"write {option} {expanded}" if expanded != str(path) else "give the full path"
        raise ConfigError(
            f"{option} {path} starts with a ~ that the shell did not expand (it does so only "
            f"unquoted, at the start of a word, not after {option}=); {instead} or choose "
            f"another {option}"
        )
    if path.is_symlink() and not path.exists():  # was "cannot create it (File exists)"
        raise ConfigError(
            f"{option} {path} is a link to {os.readlink(path)}, which does not exist; create that "
            f"folder or choose another {option}"
        )
    for existing in (path, *path.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise ConfigError(f"{option} {path} {where}, not a folder; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {existing} is not writable; choose another {option}")
    # (a folder where a result file goes failed as a traceback when the file was written: after
    # the whole run)
    blocked = next((path / n for n in RUN_FILES if (path / n).is_dir()), None)
    if blocked is not None:
        raise ConfigError(
            f"{option} {path}: {blocked} is a folder, where metapl writes a file; move it or "
            f"choose another {option}"
        )
    blocked = next((path / n for n in RUN_FOLDERS if (path / n).is_file()), None)
    if blocked is not None:
        raise ConfigError(
            f"{option} {path}: {blocked} is a file, where metapl writes a folder; move it or "
            f"choose another {option}"
        )
    owner = folder_owner(path)
    if command is not None and owner is not None and owner != command:
        raise ConfigError(
            f"{option} {path} holds the results of `metapl {owner}`, which `metapl {command}` "
            f"would overwrite; choose another {option}"
        )
    if command is not None and owner is None and not _older_run(path):
        # A folder of the user's own (a project with its config.json, say) lost those files to
        # the run's without a word.
        foreign = [n for n in RUN_FILES if (path / n).is_file()]
        if "results.json" in foreign and not _is_json(path / "results.json"):
            # (a damaged one was called a file "which metapl did not write", beside metapl's own)
            raise ConfigError(
                f"{option} {path}: its results.json is not valid JSON (another program's file, or "
                f"one of metapl's damaged or cut short), which `metapl {command}` would overwrite; "
                f"move it or choose another {option}"
            )
        if foreign:
            raise ConfigError(
                f"{option} {path} holds {', '.join(foreign)}, which metapl did not write and "
                f"`metapl {command}` would overwrite; move them or choose another {option}"
            )
    if command is not None:
        _claim(path, option)
    return path


# The folders this process claimed: (locked descriptor, the folders mkdir created for it, deepest
# first). release_output_folders() gives them back when the command ends.
_claimed: list[tuple[int, list[Path]]] = []


def _claim(path: Path, option: str) -> None:
    """Hold ``path`` for this command until it ends. Two commands writing one folder at once would
    both run to the end, into one metrics.csv and two TensorBoard files, each results.json replacing
    the other's; the second is refused instead, before any work. The lock is an advisory ``flock``
    on the folder itself: no lock file to leave behind, and the kernel drops it when the process
    dies (``kill -9`` too). Under torchrun only rank 0 writes, so only rank 0 holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        return
    from metapl.distributed import torchrun_world

    if torchrun_world()[0] != 0:
        return
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # /proc/x, a read-only mount: root passes os.access, mkdir still fails
        raise ConfigError(
            f"{option} {path}: cannot create it ({e.strerror}); choose another {option}"
        ) from None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"{option} {path} is in use by another metapl command that is still running; wait for "
            f"it to end or choose another {option}"
        ) from None
    _claimed.append((fd, created))


def release_output_folders(keep: int = 0) -> None:
    """Unlock the folders this process claimed (all but the first ``keep``). One it created that
    is still empty (the command failed before writing) is removed, with its empty parents, so a
    mistake leaves nothing behind; removed before unlocking, so no other command can have claimed
    it in between."""
    while len(_claimed) > keep:
        fd, created = _claimed.pop()
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): keep it and its parents
                break
        os.close(fd)


@contextlib.contextmanager
def holding_run_folders(folders: Iterable[Path]) -> Iterator[None]:
    """Check and hold the run folders of `metapl digits` or `reduced` (each one a `metapl train`
    run's) while the block runs, as ``metapl train --out`` holds its own: a `metapl train` started
    on one of them meanwhile is refused instead of writing into a run in progress. Released at the
    end of the block, so that a second call in the same process (the library's) can hold them
    again."""
    held_before = len(_claimed)
    try:
        for folder in folders:
            output_folder(folder, command="train")
        yield
    finally:
        release_output_folders(keep=held_before)


def resuming_note(command: str, out: Path, folders: list[Path]) -> str | None:
    """The line `metapl digits` or `reduced` prints when some of its run ``folders`` hold a
    checkpoint (a rerun after Ctrl-C or a crash): which share of the work resumes, where the run
    counter alone left it to guess; None when none does."""
    resumed = sum((folder / "checkpoint.pt").is_file() for folder in folders)
    if not resumed:
        return None
    return (
        f"metapl {command}: resuming in {out}: {resumed} of its {len(folders)} training runs "
        "have a checkpoint there, and continue from it"
    )


def results_owner(path: Path) -> str | None:
    """The command that wrote the results file ``path`` (its ``"command"``), or None: no file, a
    file from before metapl recorded it, or one that is not metapl's JSON."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    owner = payload.get("command") if isinstance(payload, dict) else None
    return owner if isinstance(owner, str) else None


def folder_owner(folder: Path) -> str | None:
    """The command whose results ``folder`` holds: its results.json's, or ``"train"`` for a
    `metapl train` run stopped before its first results.json (config.json and checkpoint.pt), which
    `metapl twomoons --out RUN` filled with its own results: the run could then not be resumed."""
    owner = results_owner(folder / "results.json")
    if (
        owner is None
        and (folder / "config.json").is_file()
        and (folder / "checkpoint.pt").is_file()
    ):
        owner = "train"
    return owner


def _older_run(folder: Path) -> bool:
    """Whether ``folder`` holds metapl's files that :func:`folder_owner` does not name the command
    of: the results.json of a metapl from before it recorded its command (its records alone, or
    under "results"), or the config.json of a `metapl train` run stopped before its first
    checkpoint (which a rerun resumes)."""
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        results = None
    if isinstance(results, list) or (isinstance(results, dict) and "results" in results):
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"preset", "method"} <= config.keys()


def check_not_a_result(output: Path | str, option: str) -> None:
    """A ConfigError when the file ``output`` is one that a metapl command wrote (a name of
    :data:`RUN_FILES` or a large teacher's file, in a folder holding a command's results.json or a
    `metapl train` run's config.json and checkpoint.pt): `metapl predict --json OTHER_RUN/results.json`
    replaced that run's results with its predictions, `metapl export --output` with the exported
    model and `metapl bench --json` with its timings, exit code 0. So is `metapl tune`'s best.toml
    (in a folder with its trials/) and an SQLite database, as a study's storage is."""
    target = Path(output).resolve()
    if _is_sqlite_database(target):  # an Optuna study's storage (`metapl tune --storage`), say
        raise ConfigError(
            f"{option} {output} would replace an SQLite database (a tuning study's storage?); "
            "give another file name"
        )
    if target.name == TUNE_RESULT and (target.parent / "trials").is_dir():
        owner: str | None = "tune"  # its OUT/best.toml, beside the trials' folders
    elif target.name not in RUN_FILES and not target.name.startswith("large_teacher_"):
        return
    else:
        owner = folder_owner(target.parent)
    if owner is not None:
        raise ConfigError(
            f"{option} {output} would replace a file that `metapl {owner}` wrote in "
            f"{Path(output).parent}; give another file name"
        )


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def _is_sqlite_database(path: Path) -> bool:
    if not path.is_file():  # a pipe or a terminal (/dev/stdout) would block the read
        return False
    try:
        with path.open("rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:  # none there yet, or not readable: nothing of ours to lose
        return False


def same_file(a: object, b: object) -> bool:
    """Whether the config values ``a`` and ``b`` are equal, or are two names of one file or folder:
    both name the same existing one from the current folder (``p/x.toml`` and ``./p/x.toml``), or
    one is a relative name that the other's full path ends with (``rd/large_teacher/seed0`` then,
    ``/home/me/sub/rd/large_teacher/seed0`` now: the same --out given from the folder above). The
    second accepts no more than equal names did: ``rd/...`` again, from another folder."""
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b:
        return False
    if _ends_with(a, b) or _ends_with(b, a):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one is not there (or not a path): not the same file
        return False


def _ends_with(path: str, tail: str) -> bool:
    """Whether the relative name ``tail`` is the end of ``path`` made absolute."""
    ends = Path(os.path.normpath(tail)).parts
    if Path(tail).is_absolute() or ".." in ends or ends == (".",):
        return False
    whole = Path(os.path.normpath(os.path.abspath(path))).parts
    return len(whole) > len(ends) and whole[-len(ends) :] == ends


def earlier_config_as_now(
    earlier: Mapping, now: Mapping, defaults: Mapping | None = None, paths: Iterable[str] = ()
) -> dict:
    """An earlier run's recorded config, read as this metapl and this run would write it: each
    option of ``defaults`` it lacks (a later metapl added it) at its default, the old behaviour;
    and each of ``paths`` (options that name a file or folder) that names the same file as
    ``now``'s at ``now``'s value (a run folder given by another name is the same run). Used alike
    for a checkpoint that resumes and a results.json that a rerun replaces."""
    merged = {**{k: v for k, v in (defaults or {}).items() if k not in earlier}, **earlier}
    same = [k for k in paths if k in merged and k in now and same_file(merged[k], now[k])]
    return {**merged, **{k: now[k] for k in same}}


def check_replaceable(
    out: Path,
    name: str,
    config: dict,
    ignore: Iterable[str] = (),
    defaults: Mapping | None = None,
    paths: Iterable[str] = (),
) -> None:
    """A run into ``out`` replaces its results.json: refused when that holds the results of another
    configuration of this command (other seeds, steps, methods...), which it would lose. The same
    configuration again (a rerun, or one resumed after an interruption) may replace them: it
    reproduces them. ``name`` says whose results they are in the message; keys in ``ignore`` do
    not change the results (the number of worker processes, say).

    ``defaults``: the configuration's default values. An option that the earlier results.json
    lacks, because a later metapl added it, counts as its default (the old behaviour), as
    :func:`metapl.train.checkpoint.check_resumable` counts it: the same command after an upgrade of
    metapl was refused as "another configuration (mpl_baseline_decay=None)". ``paths``: keys whose
    values name files or folders, the same when they name the same one."""
    path = out / "results.json"
    try:
        earlier = json.loads(path.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return  # none yet, or not a results file of ours (output_folder judged its owner)
    if not isinstance(earlier, dict):
        return
    now = json.loads(json.dumps(config))  # as saved: tuples are lists
    saved_defaults = json.loads(json.dumps(dict(defaults or {})))
    earlier = earlier_config_as_now(earlier, now, saved_defaults, paths)
    changed = sorted(k for k in now if k not in ignore and earlier.get(k) != now[k])
    if not changed:
        return
    shown = ", ".join(f"{k}={earlier.get(k)}" for k in changed)
    raise ConfigError(
        f"--out {out} holds {name} results of another configuration ({shown}), which this run "
        "would replace; choose another --out, or delete its results.json to replace them"
    )


def check_out_not_in_data(out: str, cfg) -> None:
    """A ConfigError when the run folder ``out`` (of train, or of tune's trials) is inside a folder
    of images the run reads (``cfg``: a TrainConfig): in DIR/labeled it was a class of its own
    ("labeled/run is an empty class folder ... delete the folder", a folder metapl had just made),
    and in DIR/unlabeled the run read its own curves.png as an unlabeled image when it resumed."""
    read = (
        [Path(cfg.data_dir) / sub for sub in ("labeled", "unlabeled", "test")]
        if cfg.data_dir
        else []
    )
    read += [Path(cfg.unlabeled_dir)] if cfg.unlabeled_dir else []
    target = Path(out).resolve()
    for folder in read:
        # also a folder not there yet: the run would make it (DIR/test/run made DIR/test, and
        # the next run, or this one resumed, read it as the test set or refused the --out)
        if target.is_relative_to(folder.resolve()):
            raise ConfigError(
                f"--out {out} is inside {folder}, whose images the run reads: its own files would "
                "be read as images; choose an --out outside the data"
            )


def check_not_a_folder_name(text: str | os.PathLike, option: str) -> None:
    """A ConfigError when the file name ``text`` ends with a slash: ``--output models/`` (meant as
    a folder that does not exist yet) wrote a file named ``models``, as Path drops the slash."""
    if str(text).endswith(("/", os.sep)):
        raise ConfigError(
            f"{option} {text} ends with a /, as a folder's name does, but there is no such "
            "folder; give a file name"
        )


def check_output_file(path: str | None, option: str) -> None:
    """``option``'s file can be written: not empty, not a folder, in a writable folder that exists
    (checked before the work, not when its result is ready); None (not given) passes."""
    if path is None:
        return
    if not path.strip():  # Path("") is the current folder
        raise ConfigError(f"{option} is empty; give a file name")
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{option} {target} is a folder; give a file name")
    check_not_a_folder_name(path, option)
    # A dangling link: the message named the folder of the link ("folder . does not exist")
    if target.is_symlink() and not target.resolve().parent.is_dir():
        raise ConfigError(
            f"{option} {target} is a link to {os.readlink(target)}, whose folder does not exist; "
            "create it or give another file name"
        )
    if not target.resolve().parent.is_dir():
        if target.resolve().parent.exists():
            raise ConfigError(f"{option} {target}: {target.parent} is a file, not a folder")
        raise ConfigError(f"{option} {target}: folder {target.parent} does not exist")
    if not os.access(target.resolve().parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {target}: folder {target.parent} is not writable")


def write_json_atomic(path: Path, payload: dict | list) -> None:
    """``payload`` as JSON with sorted keys, whole or not at all (:mod:`metapl.atomic`): a reader
    (or a crash) never sees half a file, and an earlier result survives until the new one is
    complete."""
    write_json_atomically(Path(path), payload, sort_keys=True)


def format_seeds(seeds: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0-3, 7"``; a span with a negative end is written ``"-3 to -2"``
    (a hand-edited results.json's seeds; "-3--2" read as a typo)."""
    spans: list[list[int]] = []
    for s in sorted(seeds):
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return ", ".join(str(a) if a == b else f"{a} to {b}" if a < 0 else f"{a}-{b}" for a, b in spans)


def print_accuracy_table(title: str, summary: dict[str, dict]) -> None:
    """``summary``: name -> {"mean", "std", "n"} with accuracies in [0, 1], and optionally the
    "seeds" they are over."""
    print(title)
    width = max((len(name) for name in summary), default=0)
    for name, s in summary.items():
        seeds = f", seeds {format_seeds(s['seeds'])}" if "seeds" in s else ""
        print(
            f"  {name:<{width}}  {100 * s['mean']:6.2f} +- {100 * s['std']:5.2f} %  "
            f"(n={s['n']}{seeds})"
        )


def paired_differences(records: list[dict], pairs: list[tuple[str, str]]) -> dict[str, dict]:
    """For each ``(method, other)``: ``method``'s accuracy minus ``other``'s, seed by seed (the same
    data for both), as mean, standard error and wins/ties/losses. With a handful of seeds the
    spread over seeds is larger than the differences between methods; the paired difference is
    what says whether one is above. Pairs with fewer than 2 common seeds are left out."""
    import numpy as np

    acc = {(r["method"], r["seed"]): r["accuracy"] for r in records}
    out = {}
    for method, other in pairs:
        seeds = [s for (m, s) in acc if m == method and (other, s) in acc]
        if len(seeds) < 2:
            continue
        d = np.array([acc[method, s] - acc[other, s] for s in seeds])
        out[f"{method} - {other}"] = {
            "mean": float(d.mean()),
            "standard_error": float(d.std(ddof=1) / np.sqrt(len(d))),
            "wins_ties_losses": [int((d > 0).sum()), int((d == 0).sum()), int((d < 0).sum())],
            "n": len(d),
        }
    return out


def print_paired_differences(paired: dict[str, dict]) -> None:
    width = max((len(name) for name in paired), default=0)
    for name, p in paired.items():
        wins, ties, losses = p["wins_ties_losses"]
        print(
            f"  {name:<{width}}  {100 * p['mean']:+6.2f} points paired "
            f"(s.e. {100 * p['standard_error']:.2f}; "
            f"{wins} wins, {ties} ties, {losses} losses over {p['n']} seeds)"
        )
