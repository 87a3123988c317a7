"""Image files decoded on threads and a step ahead (metapl.data.decoding, BatchSource): the same
bytes as one image at a time, errors at the step that reads the file, nothing left running."""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metapl import warning_filters
from metapl.cli import main
from metapl.data import decoding, splits
from metapl.data.folder import FolderImages
from metapl.data.own import folder_split
from metapl.errors import ConfigError, DataError
from metapl.train.config import TrainConfig, apply_overrides
from metapl.train.data import BatchSource

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZE = 8


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` small PNG/JPEG files of varied sizes, named so that name order is row order."""
    rng = np.random.RandomState(seed)
    paths = []
    for i in range(n):
        pixels = rng.randint(0, 256, (9 + i % 5, 10 + i % 3, 3), dtype=np.uint8)
        path = folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def make_data(root: Path, unlabeled: int = 40) -> Path:
    """A folder of your own (docs/own-data.md): 2 classes x 6 labeled, ``unlabeled`` unlabeled."""
    for cls in ("a", "b"):
        write_images(root / "labeled" / cls, 6, seed=ord(cls))
        write_images(root / "test" / cls, 1, seed=ord(cls) + 1)
    write_images(root / "unlabeled", unlabeled, seed=7)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("decoding") / "data")


@pytest.fixture
def threads():
    """Restores the process's decoding thread count after a test sets it."""
    yield decoding.set_threads
    decoding.set_threads(0)


def lazy_split(root: Path):
    split = folder_split(root, SIZE, max_eager_bytes=0)
    assert isinstance(split.x_unlabeled, decoding_types()), "the test needs lazily decoded images"
    return split


def decoding_types():
    from metapl.data.imagenet import LazyImages

    return LazyImages


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_a_batch_decoded_on_threads_is_the_one_by_one_decoding_in_order(data, threads, count):
    threads(count)
    images = lazy_split(data).x_unlabeled
    one_by_one = [images[i] for i in range(len(images))]
    for rows in ([], [5], [3, 1, 3], list(range(len(images)))[::-1], list(range(37))):
        got = images[np.asarray(rows, dtype=np.int64)]
        assert got.dtype == np.uint8 and got.shape == (len(rows), SIZE, SIZE, 3)
        want = np.stack([one_by_one[r] for r in rows]) if rows else got[:0]
        assert np.array_equal(got, want), rows
    assert decoding.threads() == count
    assert decoding._executor()._max_workers == count


def test_the_default_is_one_thread_per_usable_core_shared_by_torchruns_processes(
    threads, monkeypatch
):
    threads(0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert decoding.threads() == decoding.usable_cores() >= 1
    monkeypatch.setattr(decoding, "usable_cores", lambda: 16)
    for processes, each in (("1", 16), ("3", 5), ("4", 4), ("32", 1), ("", 16), ("x", 16)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
        assert decoding.threads() == each, processes
    threads(6)  # a count set is every process's
    assert decoding.threads() == 6


@pytest.mark.parametrize("bad", [-1, decoding.MAX_THREADS + 1])
def test_a_thread_count_out_of_range_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=f"data_threads must be in 0..1024.*got {bad}"):
        decoding.set_threads(bad)
    with pytest.raises(ConfigError, match=f"data_threads must be in 0..1024.*got {bad}"):
        apply_overrides(TrainConfig(), {"data_threads": bad}).validate()


def test_the_first_unreadable_file_in_row_order_is_the_one_named(tmp_path, threads):
    """Rows in tasks of several on 4 threads: a later task's bad file, read first, is not the one
    reported; the earliest row's is (as a loop over the rows would)."""
    threads(4)
    root = make_data(tmp_path / "data", unlabeled=60)
    images = lazy_split(root).x_unlabeled
    early, late = Path(images.paths[41]), Path(images.paths[3])
    early.write_bytes(b"not an image")
    late.write_bytes(b"not an image either")
    rows = np.r_[40:60, 0:40]  # row 1 is file 41, row 23 is file 3
    with pytest.raises(DataError) as exc:
        images[rows]
    assert str(early) in str(exc.value) and str(late) not in str(exc.value)


def test_decoding_on_threads_keeps_the_bomb_warning_quiet_and_the_filters_as_they_were(
    tmp_path, threads, monkeypatch
):
    """imagenet.decode_image silences Pillow's warning for large photos with catch_warnings, which
    is not safe in two threads at once (each puts back the filter list it found). Threads that
    decode many such files leave the process's filters as they were, and none warns."""
    threads(4)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80)  # 9x10 .. 13x12 pixels: all warn
    images = lazy_split(make_data(tmp_path / "data", unlabeled=64)).x_unlabeled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning in a thread would be that file's DataError
        before = list(warnings.filters)
        for _ in range(5):
            images[np.arange(len(images))]
        assert warnings.filters == before


def batches(split, cfg: TrainConfig, steps, **views) -> list[dict]:
    source = BatchSource(split, cfg, ("unlabeled_weak", "unlabeled_strong"), torch.device("cpu"))
    try:
        out = []
        for step in steps:
            batch = source.batch(step, **views)
            out.append({k: v.clone() for k, v in vars(batch).items() if torch.is_tensor(v)})
        return out
    finally:
        source.close()


def config(**extra) -> TrainConfig:
    base = {"dataset": "folder", "method": "uda", "batch_size": 4, "image_size": SIZE, "pad": 2}
    base.update(cutout=4, steps=6, warmup_steps=0, **extra)
    return apply_overrides(TrainConfig(), base).validate()


def test_batches_decoded_a_step_ahead_have_the_same_bytes(data, threads, monkeypatch):
    """Consecutive steps, then a jump back and forward (a resume): with and without decoding
    ahead, with 1 and 3 threads, every tensor of every batch is the same; and ahead of time it
    did decode the next step's labeled and unlabeled images (each once)."""
    split = lazy_split(data)
    steps = [0, 1, 2, 3, 1, 4, 5]
    threads(1)
    want = batches(split, config(data_prefetch=False), steps)
    submitted = []
    real_submit = decoding.submit

    def spy(images, indices):
        submitted.append(len(indices))
        return real_submit(images, indices)

    decoded_now = []
    real_decode = decoding.decode

    def spy_now(images, indices):
        decoded_now.append(len(indices))
        return real_decode(images, indices)

    monkeypatch.setattr("metapl.train.data.submit", spy)
    monkeypatch.setattr(decoding, "decode", spy_now)
    threads(3)
    got = batches(split, config(), steps)
    for step, (a, b) in enumerate(zip(want, got)):
        assert a.keys() == b.keys() and len(a) >= 4
        for key in a:
            assert torch.equal(a[key], b[key]), (step, key)
    # after steps 0, 1, 2, 3, 1, 4 the next step's 4 labeled and 28 unlabeled; none after the
    # last step (5 of 6)
    assert submitted == [4, 28] * 6
    # and the steps decoded ahead were used: only the first step and the two jumps (back to
    # step 1, then on to step 4) decoded their images when asked
    assert decoded_now == [4, 28] * 3


@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "not-ahead"])
@pytest.mark.parametrize("world", [2, 4])
def test_under_torchrun_each_rank_decodes_and_augments_its_own_slice_and_gets_the_same_batch(
    data, threads, monkeypatch, world, ahead
):
    """Each rank decodes and augments only its slice's images: the slices concatenate to the
    one-process batch to the byte; together the ranks decode each file once (counted without
    decoding ahead, whose background work the count would race) and augment each image once."""
    threads(2)
    split = lazy_split(data)
    views = ("labeled_strong", "unlabeled_weak", "unlabeled_strong")
    decoded = []
    real_getitem = FolderImages.__getitem__  # the labeled and the unlabeled images'

    def counting(self, index):
        if isinstance(index, (int, np.integer)):
            decoded.append(index)
        return real_getitem(self, index)

    monkeypatch.setattr(FolderImages, "__getitem__", counting)
    cpu = torch.device("cpu")
    whole = BatchSource(split, config(batch_size=8, data_prefetch=False), views, cpu)
    cfg = config(batch_size=8, data_prefetch=ahead)
    ranks = [BatchSource(split, cfg, views, cpu, shard=(r, world)) for r in range(world)]
    augmented: dict[str, list[int]] = {"whole": [], "ranks": []}  # images per augmentation call

    def counting(augment, who):
        def call(images, generator=None, share=None):
            augmented[who].append(len(images))
            return augment(images, generator, share)

        return call

    whole.weak, whole.strong = counting(whole.weak, "whole"), counting(whole.strong, "whole")
    for rank in ranks:
        rank.weak, rank.strong = counting(rank.weak, "ranks"), counting(rank.strong, "ranks")
    try:
        for step in range(4):
            augmented["whole"].clear(), augmented["ranks"].clear()
            want = vars(whole.batch(step))
            decoded.clear()
            got = [vars(rank.batch(step)) for rank in ranks]
            if not ahead:
                assert len(decoded) == 8 + 56, step
            # of the labeled and the unlabeled images: the weak view, and the strong view made
            # from another weak one
            assert sum(augmented["whole"]) == 3 * 8 + 3 * 56
            assert sorted(augmented["ranks"]) == sorted(
                n // world for n in augmented["whole"] * world
            )
            for key, value in want.items():
                if torch.is_tensor(value):
                    assert torch.equal(torch.cat([g[key] for g in got]), value), (step, key)
    finally:
        for source in (whole, *ranks):
            source.close()


@pytest.mark.parametrize("channels", [1, 3])
def test_a_share_augmented_with_the_whole_batchs_draws_is_those_rows_of_the_whole_batch(channels):
    """What each rank augmenting only its share relies on: the weak and strong views of rows
    a..b, augmented alone with the draws of the whole batch (metapl.augment.rng.Share), are rows
    a..b of the whole batch's views to the bit, over many draws of the ops. 1-channel images
    (digits) are where a convolution's sharpness rounded by batch size; and the generator ends
    where the whole batch's left it, so later draws agree too."""
    from metapl.augment import StrongAugment, WeakAugment
    from metapl.augment.rng import Share

    weak, strong = WeakAugment(pad=2, flip_prob=0.5), StrongAugment(3, 10, cutout=8)
    for seed in range(60):
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(12, channels, 16, 16, generator=gen)
        if seed % 2:
            x = (x * 255).round() / 255  # on the 8-bit grid, as decoded images are
        start, size = (0, 4, 6)[seed % 3], (4, 2, 6)[seed % 3]
        rows = slice(start, start + size)
        views, ends = [], []
        for images, share in ((x, None), (x[rows], Share(start=start, total=12))):
            gen = torch.Generator().manual_seed(1000 + seed)
            w = weak(images, gen, share)
            views.append((w, strong(w, gen, share)))
            ends.append(torch.rand(3, generator=gen))
        (whole_weak, whole_strong), (own_weak, own_strong) = views
        assert own_weak.shape[0] == size
        assert torch.equal(whole_weak[rows], own_weak), seed
        assert torch.equal(whole_strong[rows], own_strong), seed
        assert torch.equal(*ends), seed


def test_a_share_outside_its_batch_is_an_error():
    from metapl.augment import WeakAugment
    from metapl.augment.rng import Share

    with pytest.raises(ValueError, match=r"rows 6\.\.10 are not in a batch of 8"):
        WeakAugment()(torch.rand(4, 3, 16, 16), share=Share(start=6, total=8))


def test_no_decoding_ahead_past_the_last_step_or_of_unlabeled_images_in_fine_tuning(
    data, monkeypatch
):
    split = lazy_split(data)
    submitted: list[tuple[int, int]] = []
    monkeypatch.setattr(
        "metapl.train.data.submit",
        lambda images, indices: submitted.append((len(indices), len(images))) or _Done(),
    )
    source = BatchSource(split, config(finetune_steps=2), ("unlabeled_weak",), torch.device("cpu"))
    source._decode_ahead(5)  # the last MPL step: both
    source._ahead.clear()
    source._decode_ahead(6)  # fine-tuning: labeled only
    source._ahead.clear()
    source._decode_ahead(8)  # past the end (6 + 2 steps): nothing
    n_l, n_u = len(split.x_labeled), len(split.x_unlabeled)
    assert submitted == [(4, n_l), (28, n_u), (4, n_l)]


class _Done:
    def cancel(self) -> None:
        pass


def test_an_unreadable_file_fails_the_step_that_reads_it_not_the_one_before(tmp_path, threads):
    """Step 1's batch is decoded during step 0; its bad file is step 1's error, as before."""
    threads(2)
    root = make_data(tmp_path / "data")
    split = lazy_split(root)
    cfg = config()
    source = BatchSource(split, cfg, ("unlabeled_weak",), torch.device("cpu"))
    step0, step1 = set(source.unlabeled.at(0)), source.unlabeled.at(1)
    bad = next(int(i) for i in step1 if int(i) not in step0)
    Path(split.x_unlabeled.paths[bad]).write_bytes(b"broken")
    try:
        source.batch(0)  # and step 1's images start decoding
        assert "unlabeled" in source._ahead
        with pytest.raises(DataError, match=split.x_unlabeled.paths[bad]):
            source.batch(1)
    finally:
        source.close()


def test_close_drops_the_images_being_decoded_ahead(tmp_path, threads, monkeypatch):
    """A run that ends or stops leaves no decoding behind: the tasks not started are cancelled,
    and close() returns once the running one is done (here the one thread is held inside its
    task for 0.3 s)."""
    threads(1)
    split = lazy_split(make_data(tmp_path / "data", unlabeled=200))
    source = BatchSource(split, config(batch_size=8), ("unlabeled_weak",), torch.device("cpu"))
    source.batch(0)
    source.close()  # step 1's, decoded ahead
    release = threading.Event()
    real = FolderImages.__getitem__  # the labeled and the unlabeled images' (OwnImages)

    def held(self, index):
        release.wait(10)
        return real(self, index)

    monkeypatch.setattr(FolderImages, "__getitem__", held)
    source._decode_ahead(1)
    tasks = [task for _, pending in source._ahead.values() for task in pending._tasks]
    assert len(tasks) > 2
    deadline = time.monotonic() + 10
    while not tasks[0].running() and time.monotonic() < deadline:  # the thread has taken it
        time.sleep(0.005)
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    source.close()
    assert source._ahead == {} and release.is_set() and time.monotonic() - started >= 0.25
    assert all(task.done() for task in tasks)
    assert sum(task.cancelled() for task in tasks) == len(tasks) - 1  # all but the one running


def test_training_on_lazily_decoded_files_ends_with_the_same_weights(
    data, tmp_path, monkeypatch, capsys
):
    """`metapl train` on a folder too large to decode at the start: decoding ahead on 3 threads
    ends with the weights and metrics of decoding one image at a time when each step needs it."""

    def lazy(data_dir, resolution=32):
        return folder_split(data_dir, resolution, max_eager_bytes=0)

    monkeypatch.setitem(splits.SPLITS, "folder", lazy)
    runs = {}

    def train(out: Path, steps: int, *extra: str) -> None:
        args = ["train", "--preset", "folder-uda-mpl", "--data-dir", str(data), "--out", str(out)]
        args += ["--steps", str(steps), "--device", "cpu", "--quiet"]
        for item in (f"image_size={SIZE}", "batch_size=4", "unlabeled_ratio=2", "cutout=4"):
            args += ["--set", item]
        # (no fine-tuning: a longer --steps cannot continue a run that began it)
        for item in (*extra, "pad=2", "model=small_cnn", "finetune_steps=0"):
            args += ["--set", item]
        assert main(args) == 0, capsys.readouterr().err

    for name, extra in (("ahead", ["data_threads=3"]), ("plain", ["data_prefetch=false"])):
        train(tmp_path / name, 4, *extra)
        runs[name] = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        runs[name + " metrics"] = (tmp_path / name / "metrics.csv").read_text()
    # neither key guards a resume: the plain run goes on, decoding ahead on 2 threads
    train(tmp_path / "plain", 5, "data_threads=2")
    assert torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["step"] == 5
    decoding.set_threads(0)
    for model in ("student", "teacher"):
        for key, value in runs["ahead"][model].items():
            assert torch.equal(value, runs["plain"][model][key]), (model, key)
    assert runs["ahead metrics"] == runs["plain metrics"]


@pytest.mark.parametrize(
    ("dataset", "extra", "reads"),
    [
        ("imagenet-10pct", {}, True),
        ("imagenet-full", {}, True),
        ("folder", {}, True),
        ("cifar10-full", {"unlabeled_dir": "pictures"}, True),
        ("cifar10-4k", {}, False),
        ("svhn-1k", {}, False),
        ("npz", {}, False),
        ("digits", {}, False),
    ],
)
def test_the_decoding_keys_apply_to_image_files_only(dataset, extra, reads):
    cfg = TrainConfig(dataset=dataset, **extra)
    assert cfg.reads_image_files is reads
    for key in ("data_threads", "data_prefetch"):
        assert (cfg.ignored_key(key) is None) is reads


def _decode_in_child(images, queue) -> None:
    queue.put(images[np.arange(len(images))].sum())


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="fork is POSIX-only")
def test_a_forked_child_decodes_with_a_pool_of_its_own(data, threads):
    """`metapl digits` forks its workers: a child inherits the parent's pool object but not its
    threads, and the warning lock as some thread held it. It decodes all the same."""
    import multiprocessing

    threads(2)
    images = lazy_split(data).x_unlabeled
    want = images[np.arange(len(images))].sum()  # the parent's pool is running now
    held = threading.Event()
    release = threading.Event()

    def hold_the_lock():
        with warning_filters._LOCK:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    held.wait(10)
    try:
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_decode_in_child, args=(images, queue))
        child.start()
        child.join(30)
        hung = child.is_alive()
        if hung:
            child.kill()
        assert not hung and child.exitcode == 0, "the child hung or failed"
        assert queue.get(timeout=5) == want
    finally:
        release.set()
        holder.join()


def test_an_evaluation_decodes_each_file_once_for_all_its_models(data, threads, monkeypatch):
    """ImageNet's test and labeled sets are evaluated with two models each (EMA or student, and
    the teacher): one pass over the files, each batch decoded while the models classify the one
    before; the accuracies are each model's own, and the models' train/eval modes come back."""
    from metapl.models import create_model
    from metapl.train.data import evaluate, evaluate_models

    threads(2)
    images = lazy_split(data).x_unlabeled
    labels = np.arange(len(images)) % 3
    torch.manual_seed(0)
    models = {"a": create_model("small_cnn", 3), "b": create_model("small_cnn", 3)}
    models["b"].eval()
    cfg = config(eval_batch_size=7)
    arrays = images[np.arange(len(images))]
    want = {
        name: evaluate(model, arrays, labels, cfg, torch.device("cpu"))
        for name, model in models.items()
    }
    assert len(set(want.values())) == 2  # the two models differ
    decoded, submitted = [], []
    real_getitem, real_submit = FolderImages.__getitem__, decoding.submit

    def counting(self, index):
        decoded.append(index)
        return real_getitem(self, index)

    def spy(images, indices):
        submitted.append(len(indices))
        return real_submit(images, indices)

    monkeypatch.setattr(FolderImages, "__getitem__", counting)
    monkeypatch.setattr("metapl.train.data.submit", spy)
    got = evaluate_models(models, images, labels, cfg, torch.device("cpu"))
    assert got == want
    assert sorted(decoded) == list(range(len(images)))  # each file once
    assert submitted == [7] * (len(images) // 7) + [len(images) % 7] * bool(len(images) % 7)
    assert models["a"].training and not models["b"].training


@pytest.mark.parametrize("world", [2, 3, 40])
def test_under_torchrun_each_rank_evaluates_and_decodes_its_share_and_the_counts_add_up(
    data, threads, monkeypatch, world
):
    """shard=(rank, world): each rank decodes and classifies only its rows (contiguous; a rank may
    get none, with more ranks than images), and the summed counts give the whole set's
    accuracies."""
    from metapl.models import create_model
    from metapl.train.data import evaluate_models

    threads(2)
    images = lazy_split(data).x_unlabeled
    labels = np.arange(len(images)) % 3
    torch.manual_seed(0)
    models = {"a": create_model("small_cnn", 3), "b": create_model("small_cnn", 3)}
    cfg, cpu = config(eval_batch_size=5), torch.device("cpu")
    want = evaluate_models(models, images, labels, cfg, cpu)
    decoded: list[list[int]] = []
    real_getitem = FolderImages.__getitem__

    def counting(self, index):
        decoded[-1].append(int(index))
        return real_getitem(self, index)

    monkeypatch.setattr(FolderImages, "__getitem__", counting)
    received = []  # each rank's counts, as the all-reduce receives them

    def all_reduce(counts):
        received.append(counts.clone())
        return counts

    for rank in range(world):
        decoded.append([])
        evaluate_models(models, images, labels, cfg, cpu, None, (rank, world), all_reduce)
    shares = [sorted(d) for d in decoded]
    assert sorted(i for share in shares for i in share) == list(range(len(images)))
    assert all(share == list(range(share[0], share[0] + len(share))) for share in shares if share)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert len(received) == world  # every rank takes part in the all-reduce, with rows or not
    summed = sum(received)
    assert {k: int(v) / len(labels) for k, v in zip(models, summed.tolist())} == want


def test_the_main_threads_own_filter_waits_for_the_decoding_threads(threads):
    """The first exact MPL step sets a filter of its own (mpl.dual: torch's TorchScript warning)
    while the next step's files decode: it takes the same lock as the decoding threads' filter,
    so neither puts back a list without the other's filter, or with it for good."""
    from metapl.mpl import dual

    finished = threading.Event()

    def load():
        dual._load_jvp_decompositions.__wrapped__()
        finished.set()

    with warning_filters._LOCK:
        thread = threading.Thread(target=load)
        thread.start()
        assert not finished.wait(0.3)  # waits for the lock
    assert finished.wait(10)
    thread.join()
