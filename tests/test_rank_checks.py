"""metapl.train.rank_checks without processes: a rank's view of the run folder and of its data,
against a stand-in for the other ranks (tests/test_torchrun.py runs the checks on 2 processes)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

from metapl.data.splits import SSLSplit
from metapl.errors import ConfigError
from metapl.train import data_identity, rank_checks
from metapl.train.rank_checks import check_ranks_see, check_same_data


@dataclasses.dataclass
class OtherRankSees:
    """This process as rank 1 of 2, whose other rank (rank 0) sees the file (``sees``) and has
    the data fingerprint ``fingerprint``."""

    sees: bool = True
    fingerprint: str = ""
    rank: int = 1
    world_size: int = 2
    enabled: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any_rank(self, flag: bool) -> bool:
        return flag or self.sees

    def all_ranks(self, flag: bool) -> bool:
        return flag and self.sees

    def broadcast_object(self, obj):
        return self.fingerprint


@pytest.fixture
def patience(monkeypatch):
    monkeypatch.setattr(rank_checks, "PATIENCE_S", 1.0)


def test_a_file_the_other_rank_sees_is_looked_for_again_until_it_shows(tmp_path, patience):
    """A network file system's client may trust its cache of missing names for a while after
    rank 0 made the file: the rank lists the folders again until it shows, and agrees."""
    path = tmp_path / "made" / "by_rank_0"
    threading.Timer(0.3, lambda: (path.parent.mkdir(), path.touch())).start()
    assert check_ranks_see(OtherRankSees(), path, "it") is True


def test_each_look_again_lists_every_folder_on_the_way_first(tmp_path, monkeypatch, patience):
    """The listing is what makes a network file system's client ask its server again; the answer
    is still the lookup's, so a path through a link and ``..`` (which a listing cannot follow)
    counts as there."""
    (tmp_path / "sub" / "inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "sub" / "inner")
    path = tmp_path / "link" / ".." / "made"  # tmp_path/sub/made, through the link
    walk = [str(p) for p in reversed(Path(rank_checks.os.path.abspath(path)).parents)]
    listed = []
    real_listdir = rank_checks.os.listdir

    def listdir(folder):
        listed.append(str(folder))
        if len(listed) == len(walk) + 1:  # the second walk: the file shows after the first look
            (tmp_path / "sub" / "made").touch()
        return real_listdir(folder)

    monkeypatch.setattr(rank_checks.os, "listdir", listdir)
    assert check_ranks_see(OtherRankSees(), path, "it") is True
    assert listed == walk + walk  # from the root down to the file's own folder, before each look


def test_a_file_that_never_shows_stops_the_run_naming_what_differs(tmp_path, patience):
    with pytest.raises(ConfigError) as err:
        check_ranks_see(OtherRankSees(), tmp_path / "elsewhere", "the file rank 0 made in F")
    assert str(err.value) == (
        "the ranks see different run folders: rank 1 does not see the file rank 0 made in F and "
        "another rank does; every rank must see the same --out folder (on several machines, put "
        "it on a file system they share)"
    )


def test_ranks_that_agree_pass_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_checks, "PATIENCE_S", 1000.0)  # no waiting when they agree
    (tmp_path / "f").touch()
    assert check_ranks_see(OtherRankSees(sees=True), tmp_path / "f", "it") is True
    assert check_ranks_see(OtherRankSees(sees=False), tmp_path / "g", "it") is False
    with pytest.raises(ConfigError, match="rank 1 sees it and another rank does not"):
        check_ranks_see(OtherRankSees(sees=False), tmp_path / "f", "it")


def _split(unlabeled: int = 6, label: int = 0) -> SSLSplit:
    x = np.zeros((4 + unlabeled, 2, 2, 1), np.uint8)
    y = np.array([label, 1, 0, 1])
    return SSLSplit(x[:4], y, x[4:], x[:0], y[:0], x[:2], y[:2], 2, "tiny")


@pytest.mark.parametrize(
    "other", [_split(unlabeled=5), _split(label=1)], ids=["one-image-short", "another-label"]
)
def test_a_rank_with_other_data_stops_the_run_naming_what_it_loaded(other):
    rank0 = OtherRankSees(fingerprint=data_identity.split_fingerprint(_split()), sees=False)
    check_same_data(rank0, _split())  # the same: nothing to say
    with pytest.raises(ConfigError) as err:
        check_same_data(rank0, other)
    n_u = len(other.x_unlabeled)
    assert str(err.value) == (
        f"the ranks loaded different data: rank 1 loaded 4 labeled, {n_u} unlabeled and 2 test "
        "images, which differ from rank 0's; every rank must read the same dataset (on several "
        "machines, identical copies)"
    )


class FilesOnly:
    """An image-file reader that must not be decoded (another machine's decoder may round the
    pixels differently): the check goes by the files' names."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.shape = (len(paths), 8, 8, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        raise AssertionError("decoded")


def test_image_files_count_by_their_names_not_by_their_folder_or_pixels():
    def split(root: str, names: list[str]) -> SSLSplit:
        y = np.array([0, 1])
        files = FilesOnly([f"{root}/{n}" for n in names])
        return SSLSplit(files, y, files, files, y[:0], files, y, 2, "files")

    here = split("/data/a", ["cat/1.jpg", "dog/2.jpg"])
    moved = split("/mnt/copy", ["cat/1.jpg", "dog/2.jpg"])
    renamed = split("/data/a", ["cat/1.jpg", "dog/3.jpg"])
    fingerprint = data_identity.split_fingerprint
    assert fingerprint(here) == fingerprint(moved)
    assert fingerprint(here) != fingerprint(renamed)


def test_image_files_count_by_their_paths_below_the_dataset_folder():
    """A reader with a ``root`` (your own image folders, whose unlabeled images may lie at any
    depth) counts its files by their paths below it: b/x/1.png is not a/x/1.png."""

    def files(root: str, names: list[str]) -> FilesOnly:
        reader = FilesOnly([f"{root}/{n}" for n in names])
        reader.root = root
        return reader

    identity = data_identity._images_identity
    here = files("/data/own", ["a/x/1.png", "b/y/2.png"])
    assert identity(here) == identity(files("/mnt/copy", ["a/x/1.png", "b/y/2.png"]))
    assert identity(here) != identity(files("/data/own", ["b/x/1.png", "b/y/2.png"]))


def test_the_data_fingerprint_sees_every_field_a_rank_trains_by():
    fingerprint = data_identity.split_fingerprint
    split = _split()
    for other in (
        dataclasses.replace(split, class_names=("zero", "one")),
        dataclasses.replace(split, num_classes=3),
        dataclasses.replace(split, tune_in_unlabeled=np.array([5])),
        dataclasses.replace(split, tune_in_labeled=False),
        dataclasses.replace(split, name="other"),
    ):
        assert fingerprint(other) != fingerprint(split), other

    def files(names: list[str], shape=(2, 8, 8, 1)) -> FilesOnly:
        reader = FilesOnly([f"/data/{n}" for n in names])
        reader.shape = shape
        return reader

    identity = data_identity._images_identity
    cats = files(["cat/1.jpg", "dog/2.jpg"])
    assert identity(cats) != identity(files(["dog/1.jpg", "dog/2.jpg"]))  # the class folder
    assert identity(cats) != identity(files(["cat/1.jpg", "dog/2.jpg"], (2, 16, 16, 3)))


def test_a_rank_waits_longer_than_nfs_trusts_a_missing_name():
    assert rank_checks.PATIENCE_S > 60  # NFS's acdirmax default


def test_a_failed_check_removes_the_folder_rank_0_made_and_keeps_one_that_was_there(
    tmp_path, monkeypatch
):
    """A library caller of train() (not the command line, which also tidies up) is left no empty
    folder by a failed folder check, and keeps a folder of its own."""
    from metapl.train import engine

    def differ(dp, path, what):
        assert path.is_file()  # the token rank 0 made
        raise ConfigError("the ranks see different run folders")

    monkeypatch.setattr(engine, "check_ranks_see", differ)

    class Rank0(OtherRankSees):
        def broadcast_object(self, obj):
            return obj

    made, mine = tmp_path / "made", tmp_path / "mine"
    mine.mkdir()
    for folder in (made, mine):
        with pytest.raises(ConfigError):
            engine._open_run_folder(folder, Rank0(rank=0), note=None)
    assert not made.exists()
    assert mine.is_dir() and list(mine.iterdir()) == []


def test_a_token_left_by_a_killed_run_is_cleared(tmp_path):
    from metapl.train import engine

    (tmp_path / f"{engine._RANKS_TOKEN}0123").touch()
    (tmp_path / "keep.txt").touch()
    engine._clear_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_the_fast_cut_below_the_root_names_files_as_the_path_one_does():
    """Paths under the root are cut as strings (fast: ImageNet has 1.28 million); the names must
    be those :func:`_below` gives, for a root given with or without a trailing slash, and for a
    path outside the root (the class folder and the file name)."""
    import hashlib

    paths = ["/data/own/a/x/1.png", "/data/own/b/2.png", "/elsewhere/c/3.png"]
    names = "\n".join(data_identity._below(Path(p), Path("/data/own")) for p in paths)
    want = hashlib.sha256(f"files|{(3, 8, 8, 1)}\n{names}".encode()).hexdigest()
    for root in ("/data/own", "/data/own/", Path("/data/own")):
        reader = FilesOnly(list(paths))
        reader.root = root
        assert data_identity._images_identity(reader) == want, root
    assert names == "a/x/1.png\nb/2.png\nc/3.png"
