"""Figure 7's ImageNet label fractions (10%, 20%, 40%, 80%): the splits and their presets.

The fake training set has more than 1,024 images, so one shard more or less than the paper's counts
changes every labeled-set size checked here.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from fake_datasets import write_imagenet

from metapl.cli import main
from metapl.data import imagenet, splits
from metapl.errors import ConfigError, DataError
from metapl.train.config import apply_overrides
from metapl.train.engine import load_data
from metapl.train.presets import load_preset

TRAIN = {f"n{c:08d}": 100 + 3 * c for c in range(9, -1, -1)}  # 1,135 images, unequal classes
N = sum(TRAIN.values())
SHARDS = {
    "imagenet-10pct": 102,
    "imagenet-20pct": 205,
    "imagenet-40pct": 410,
    "imagenet-80pct": 819,
}
# round(1135 * shards / 1024) labeled, and their last n // 10 tune (written out, not recomputed).
LABELED = {
    "imagenet-10pct": 113,
    "imagenet-20pct": 227,
    "imagenet-40pct": 454,
    "imagenet-80pct": 908,
}
TUNE = {"imagenet-10pct": 11, "imagenet-20pct": 22, "imagenet-40pct": 45, "imagenet-80pct": 90}
NEW = ("imagenet-20pct", "imagenet-40pct", "imagenet-80pct")
FIGURE7_ROWS = {"supervised": "supervised", "randaugment": "randaugment", "uda-mpl": "uda_mpl"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_imagenet(
        tmp_path_factory.mktemp("imagenet"), TRAIN, {"n00000000": 2, "n00000005": 3}
    )


@pytest.fixture(scope="module")
def train_paths(root: Path) -> list[str]:
    return imagenet.load_imagenet(root, resolution=4)[0].images.paths


def load(name: str, root: Path, **options) -> splits.SSLSplit:
    return splits.load_split(name, root, resolution=4, **options)


def test_shard_counts_are_round_1024p() -> None:
    assert splits.IMAGENET_LABELED_SHARDS == SHARDS
    for name, p in zip(SHARDS, (0.1, 0.2, 0.4, 0.8), strict=True):
        assert SHARDS[name] == round(1024 * p)
        loader = splits.SPLITS[name]
        assert inspect.signature(loader).parameters["fraction"].default == SHARDS[name] / 1024
    # At the paper's 1,281,167 training images (10%: ~ the 127,616 of 102 shards).
    sizes = [len(splits.labeled_fraction_indices(1_281_167, s / 1024)) for s in SHARDS.values()]
    assert sizes == [127_616, 256_484, 512_967, 1_024_683]


@pytest.mark.parametrize("name", list(SHARDS))
def test_labeled_and_tuning_sets(root: Path, train_paths: list[str], name: str) -> None:
    split = load(name, root)
    chosen = np.random.RandomState(0).permutation(N)[: LABELED[name]]
    assert split.name == name and split.num_classes == 10
    assert len(split.y_labeled) == LABELED[name]
    assert split.x_labeled.paths == [train_paths[i] for i in chosen]
    # The tuning set is the last part of the labeled set (labeled includes it).
    n_tune = TUNE[name]
    assert len(split.y_tune) == n_tune
    assert split.x_tune.paths == split.x_labeled.paths[-n_tune:]
    assert split.y_tune.tolist() == split.y_labeled[-n_tune:].tolist()
    assert split.x_unlabeled.paths == train_paths and split.y_test.tolist() == [0, 0, 5, 5, 5]
    assert split.x_labeled[np.arange(2)].shape == (2, 4, 4, 3)
    view = split.tuning_view()
    assert view.x_labeled.paths == split.x_labeled.paths[:-n_tune]
    assert view.x_test.paths == split.x_tune.paths and view.name == f"{name}-tune"


def test_labeled_sets_are_nested(root: Path) -> None:
    loaded = [load(name, root) for name in SHARDS]
    for small, large in zip(loaded, loaded[1:]):
        assert set(small.x_labeled.paths) < set(large.x_labeled.paths)
        # a prefix of the same permutation
        assert large.x_labeled.paths[: len(small.y_labeled)] == small.x_labeled.paths
        # each tunes on the tail of its own labeled set: tuning sets are not nested
        assert not set(small.x_tune.paths) & set(large.x_tune.paths)


def test_10pct_unchanged(root: Path, train_paths: list[str]) -> None:
    assert splits.imagenet_10pct is splits.SPLITS["imagenet-10pct"]
    defaults = {
        k: p.default for k, p in inspect.signature(splits.imagenet_10pct).parameters.items()
    }
    assert defaults == {
        "data_dir": inspect.Parameter.empty,
        "fraction": 102 / 1024,
        "num_tune": 12800,
        "resolution": 224,
        "crop_fraction": 1.0,
        "seed": 0,
    }
    split = splits.imagenet_10pct(root, resolution=4)
    rule = np.random.RandomState(0).permutation(N)[: round(N * 102 / 1024)]
    assert split.x_labeled.paths == [train_paths[i] for i in rule]
    assert split.name == "imagenet-10pct" and len(split.y_tune) == 11
    seeded = splits.imagenet_10pct(root, resolution=4, seed=3, fraction=0.5, num_tune=7)
    other = np.random.RandomState(3).permutation(N)[: round(N * 0.5)]
    assert seeded.x_labeled.paths == [train_paths[i] for i in other]
    assert seeded.x_tune.paths == seeded.x_labeled.paths[-7:]
    # The tuning view's unlabeled images are the training images less its evaluation images.
    view = seeded.tuning_view()
    assert view.x_test.paths == seeded.x_tune.paths
    assert sorted(view.x_unlabeled.paths) == sorted(set(train_paths) - set(seeded.x_tune.paths))
    assert len(split.x_unlabeled.paths) == N  # final runs: all training images, as in the paper


def test_new_splits_take_the_10pct_options(root: Path) -> None:
    options = list(inspect.signature(splits.imagenet_10pct).parameters)
    for name in NEW:
        assert list(inspect.signature(splits.SPLITS[name]).parameters) == options
        assert splits.SPLITS[name] is getattr(splits, name.replace("-", "_"))
    half = load("imagenet-80pct", root, fraction=0.5, seed=1)
    assert len(half.y_labeled) == round(N * 0.5) and half.name == "imagenet-80pct"
    with pytest.raises(DataError, match="imagenet-40pct"):  # errors name the split asked for
        load("imagenet-40pct", root, fraction=1e-4)


def test_unknown_fraction_is_a_config_error(root: Path) -> None:
    with pytest.raises(ConfigError) as info:
        splits.load_split("imagenet-30pct", root)
    message = str(info.value)
    assert "\n" not in message and "unknown split 'imagenet-30pct'" in message
    assert all(name in message for name in SHARDS)
    with pytest.raises(ConfigError, match="has no option 'tune_fraction'"):
        splits.load_split("imagenet-20pct", root, tune_fraction=0.1)


def figure7_presets() -> list[str]:
    return [f"{split}-{row}" for split in NEW for row in FIGURE7_ROWS]


def test_presets_lists_the_figure7_rows(capsys) -> None:
    assert main(["presets"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert sorted(n for n in names if n.startswith(NEW)) == sorted(figure7_presets())
    assert len(figure7_presets()) == 9 and len(names) == len(set(names))
    assert "imagenet-10pct-uda-mpl" in names and "imagenet-10pct-label-smoothing" in names


@pytest.mark.parametrize("name", figure7_presets())
def test_figure7_presets_are_the_10pct_column(name: str) -> None:
    cfg = load_preset(name)
    split, row = name[: len("imagenet-20pct")], name[len("imagenet-20pct-") :]
    assert cfg.dataset == split and cfg.method == FIGURE7_ROWS[row] and cfg.preset == name
    ten = load_preset(f"imagenet-10pct-{row}")
    differ = {k for k, v in cfg.to_dict().items() if ten.to_dict()[k] != v}
    assert differ == {"dataset", "preset"}
    # Table 3's ImageNet (10%) column
    assert (cfg.model, cfg.steps, cfg.batch_size, cfg.image_size) == (
        "resnet50",
        500_000,
        2048,
        224,
    )
    assert (cfg.student_lr, cfg.teacher_lr, cfg.uda_factor) == (0.8, 0.5, 16.0)


@pytest.mark.parametrize("name", figure7_presets())
def test_figure7_presets_validate(name: str) -> None:
    cfg = load_preset(name).validate()  # the dataset must be one that a run accepts
    assert cfg.dataset == name[: len("imagenet-20pct")]


def test_preset_loads_its_split(root: Path) -> None:
    cfg = apply_overrides(
        load_preset("imagenet-40pct-uda-mpl"), {"data_dir": str(root), "image_size": 4}
    )
    split = load_data(cfg)
    assert split.name == "imagenet-40pct" and len(split.y_labeled) == LABELED["imagenet-40pct"]
    assert split.x_labeled[0].shape == (4, 4, 3)
    view = load_data(apply_overrides(cfg, {"tuning": True}))
    assert view.name == "imagenet-40pct-tune" and len(view.y_test) == TUNE["imagenet-40pct"]
