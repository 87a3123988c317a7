"""A write that fails (a full disk, a quota, a file-size limit) is one line naming the file, exit
code 2, nothing half-written, and the file there before unchanged.

Before, a full disk while `metapl train` saved a checkpoint printed a 40-line traceback ending in
torch's "unexpected pos 139072 vs 138968"; a full metrics.csv a traceback of a flush; and the
ReducedMPL precompute, writing through a memory map, died of SIGBUS without a word.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from metapl.atomic import replace_atomically, write_error
from metapl.cli import main
from metapl.errors import MetaplError, WriteError
from metapl.reduced import precompute
from metapl.train.checkpoint import load_checkpoint, prev_path, save_checkpoint
from metapl.train.metrics_log import MetricsLogger

FULL = OSError(errno.ENOSPC, "No space left on device")


def _state(step: int) -> dict:
    return {"format_version": 1, "step": step, "student": {"w": torch.full((3,), step)}}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# --- which failures are failed writes ------------------------------------------------------------


def _raised_during(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` as Python makes it when raised while ``inner`` is handled."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 (the implicit context is the point)
    except BaseException as exc:
        return exc


def test_a_failed_write_is_an_os_error_or_torchs_runtime_error_over_one(tmp_path):
    path = tmp_path / "r.json"
    direct = write_error(path, FULL)
    assert isinstance(direct, WriteError) and isinstance(direct, MetaplError | OSError)
    assert direct.errno == errno.ENOSPC
    assert str(direct).startswith(f"could not write {path}: No space left on device (")
    assert "MiB free there); nothing half-written is left" in str(direct)
    wrapped = _raised_during(RuntimeError("unexpected pos 704 vs 598"), FULL)
    assert str(write_error(path, wrapped)) == str(direct)
    # not a failed write: a bug, a Ctrl-C while an OSError was handled, a RuntimeError alone
    assert write_error(path, ValueError("x")) is None
    assert write_error(path, _raised_during(KeyboardInterrupt(), FULL)) is None
    assert write_error(path, _raised_during(TypeError("bug"), FULL)) is None
    assert write_error(path, RuntimeError("a bug of torch")) is None
    # another errno: no free space to report; what was there before is named when it exists
    path.write_text("{}")
    other = write_error(path, OSError(errno.EIO, "Input/output error"), kept=None)
    assert other is not None and other.errno == errno.EIO
    assert str(other) == (
        f"could not write {path}: Input/output error; nothing half-written is left, "
        "and the r.json there before is unchanged"
    )


def test_a_file_written_whole_keeps_the_old_one_when_the_disk_is_full(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("earlier")

    def half_then_full(tmp: Path) -> None:
        tmp.write_text("half")
        raise FULL

    with pytest.raises(WriteError, match=r"could not write .*results.json: No space left"):
        replace_atomically(path, half_then_full)
    assert _files(tmp_path) == {"results.json": b"earlier"}


def test_a_checkpoint_save_on_a_full_disk_keeps_both_earlier_checkpoints(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    before = _files(tmp_path)
    real_save = torch.save

    def save_until_full(obj, f, **kwargs):  # as torch.save fails on a Python file
        assert hasattr(f, "write"), "checkpoints are written through a Python file"
        f.write(b"PK half a checkpoint")
        try:
            raise FULL
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(WriteError) as caught:
        save_checkpoint(path, _state(3))
    monkeypatch.setattr(torch, "save", real_save)
    assert str(caught.value).startswith(f"could not write {path}: No space left on device")
    assert str(caught.value).endswith("and the checkpoint.pt there before is unchanged")
    assert _files(tmp_path) == before
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(prev_path(path))["step"] == 1


# --- metrics.csv and TensorBoard -----------------------------------------------------------------


class _FullFile:
    """metrics.csv's file once the disk is full: rows are buffered, every flush fails."""

    def __init__(self, real):
        self.real, self.closed = real, False

    def write(self, text):
        return len(text)

    def flush(self):
        raise FULL

    def close(self):
        self.closed = True
        self.real.close()
        raise FULL


def test_a_full_disk_under_metrics_csv_is_one_error_naming_it(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": 0.5})
    logger._file = _FullFile(logger._file)
    logger._csv = __import__("csv").writer(logger._file)
    with pytest.raises(WriteError, match=r"could not write .*metrics.csv: No space left") as e:
        logger.log(2, {"loss": 0.4})
    assert "the rows logged before are kept" in str(e.value)
    with pytest.raises(WriteError, match="metrics.csv"):
        logger.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,name,value", "1,loss,0.5"]


class _FullTensorBoard:
    """A SummaryWriter whose writer thread met a full disk: its next call raises that error."""

    closed = False

    def add_scalar(self, *args):
        raise FULL

    def close(self):
        self.closed = True
        raise FULL


def test_a_full_disk_under_tensorboard_is_one_error_naming_its_folder(tmp_path):
    logger = MetricsLogger(tmp_path)
    fake = _FullTensorBoard()
    logger._tb.close()
    logger._tb = fake
    with pytest.raises(WriteError, match=r"could not write .*tb: No space left on device"):
        logger.log(1, {"loss": 0.5})
    with pytest.raises(WriteError, match="TensorBoard events logged before are kept"):
        logger.close()
    assert fake.closed and logger._file.closed
    logger.close()  # twice: harmless


_TENSORBOARD_CHILD = """
import sys
from metapl.errors import WriteError
from metapl.train.metrics_log import MetricsLogger
try:
    MetricsLogger(sys.argv[1])
except WriteError as err:
    print(err, file=sys.stderr)
"""


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="POSIX file-size limits")
def test_tensorboard_refused_its_first_event_is_one_line_not_two_tracebacks(tmp_path):
    """SummaryWriter writes its first event as it opens: refused (a full disk, here a limit that
    lets metrics.csv's 17-byte header through, not the event), it raised a bare OSError (a
    traceback, exit 1), and TensorBoard's writer thread printed a traceback of its own first."""
    pytest.importorskip("torch.utils.tensorboard")
    done = subprocess.run(
        [sys.executable, "-c", _TENSORBOARD_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_file_size_limit(30),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr, done.stderr
    assert done.stderr == (
        f"could not write {tmp_path / 'tb'}: File too large; no TensorBoard events are written\n"
    )


def test_the_error_that_stopped_a_run_is_not_replaced_by_the_loggers_own(tmp_path):
    """Leaving the logger's block on an error: closing it on the same full disk fails too, and
    that second error used to replace the first (the one that says what happened)."""
    first = WriteError("could not write checkpoint.pt: No space left on device")
    with pytest.raises(WriteError) as caught, MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger._file = _FullFile(logger._file)
        raise first
    assert caught.value is first


# --- ReducedMPL's precomputed distributions ------------------------------------------------------


def test_precomputed_distributions_reserve_their_disk_space_first(tmp_path, monkeypatch):
    """Rows go to the .npy through a memory map: on a full disk a write to it was a SIGBUS that
    killed the process without a word. The file's blocks are now reserved when it is created."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 4))
    images = np.random.RandomState(0).randint(0, 256, size=(20, 8, 8, 3), dtype=np.uint8)
    out = tmp_path / "probs.npy"
    reserved = []

    def fallocate(fd, offset, length):
        reserved.append((offset, length, os.fstat(fd).st_size))
        raise FULL

    monkeypatch.setattr(os, "posix_fallocate", fallocate, raising=False)
    with pytest.raises(WriteError, match=r"could not write .*probs.npy: No space left on device"):
        precompute.precompute_distributions(model, images, out, progress=False)
    assert reserved and reserved[0][0] == 0 and reserved[0][1] == reserved[0][2] >= 20 * 4 * 4
    assert list(tmp_path.iterdir()) == []  # neither the .npy nor its sidecar
    monkeypatch.undo()
    probs = precompute.precompute_distributions(model, images, out, progress=False)
    assert probs.shape == (20, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_precomputed_distributions_refused_their_header_leave_nothing(tmp_path, monkeypatch):
    """numpy writes the .npy's header before mapping it: a full disk there was a bare OSError (a
    traceback) that left the header-only file and its sidecar behind."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 4))
    images = np.random.RandomState(0).randint(0, 256, size=(20, 8, 8, 3), dtype=np.uint8)
    out = tmp_path / "probs.npy"

    def open_memmap(filename, **kwargs):
        Path(filename).write_bytes(b"\x93NUMPY" + b" " * 120)  # the header, then the disk is full
        raise FULL

    monkeypatch.setattr(np.lib.format, "open_memmap", open_memmap)
    with pytest.raises(WriteError, match=r"could not write .*probs.npy: No space left on device"):
        precompute.precompute_distributions(model, images, out, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the .npy nor its sidecar


@pytest.mark.parametrize("refusal", [errno.EOPNOTSUPP, errno.EINVAL], ids=["EOPNOTSUPP", "EINVAL"])
def test_a_file_system_without_fallocate_keeps_the_file_sparse(tmp_path, monkeypatch, refusal):
    """Some file systems answer EINVAL, not EOPNOTSUPP, when they cannot reserve blocks."""

    def unsupported(fd, offset, length):
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 4))
    images = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    probs = precompute.precompute_distributions(model, images, tmp_path / "p.npy", progress=False)
    assert probs.shape == (5, 4)


# --- the command line, with a real failed write ---------------------------------------------------


def _file_size_limit(limit: int):
    """For a child process: files may not grow past ``limit`` bytes. A write past it fails with
    EFBIG ("File too large"), a real OSError from the kernel, as a full disk's ENOSPC would."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's signal kills the child
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="POSIX file-size limits")
def test_train_on_a_disk_that_refuses_its_checkpoint_says_so_and_resumes_later(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--preset", "digits-supervised", "--out", str(out), "--device", "cpu"]
    args += ["--quiet", "--set", "finetune_steps=0", "--set", "warmup_steps=1"]
    args += ["--set", "checkpoint_every=2", "--set", "eval_every=2", "--set", "log_every=1"]
    assert main([*args, "--steps", "2"]) == 0
    before = load_checkpoint(out / "checkpoint.pt")
    size = (out / "checkpoint.pt").stat().st_size
    assert size > 20_000  # a limit below it and above the run's other files

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "metapl", *args, "--steps", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_file_size_limit(size // 2),
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr == (
        f"metapl train: error: could not write {out / 'checkpoint.pt'}: File too large; nothing "
        "half-written is left, and the checkpoint.pt there before is unchanged; run the same "
        "command again to resume from the last checkpoint\n"
    )
    kept = load_checkpoint(out / "checkpoint.pt")
    assert kept["step"] == 2 and kept["student"].keys() == before["student"].keys()
    assert all(torch.equal(v, before["student"][k]) for k, v in kept["student"].items())
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    assert main([*args, "--steps", "4"]) == 0  # with room again: resumed, and finished
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4


# --- the run's folder deleted or moved while the run writes ----------------------------------------


def test_a_run_whose_folder_is_deleted_stops_before_its_next_checkpoint(tmp_path):
    """Deleted mid-run, the folder was made again by the next checkpoint save; the run ended with a
    checkpoint and results.json but no metrics.csv, in a FileNotFoundError traceback from the plot
    of the curves."""
    import shutil

    from metapl.train import engine
    from metapl.train.config import TrainConfig
    from metapl.train.presets import load_preset

    cfg = load_preset("digits-supervised")
    cfg = TrainConfig(
        **{
            **cfg.to_dict(),
            "steps": 4,
            "finetune_steps": 0,
            "warmup_steps": 1,
            "eval_every": 2,
            "checkpoint_every": 4,
            "device": "cpu",
        }
    )
    out = tmp_path / "run"

    def delete_folder(step, accuracies):
        if step == 2:
            # Moved away first, then deleted: TensorBoard's writer thread may be writing under tb/
            # right now, and an rmtree in place could meet its new file ("Directory not empty").
            gone = tmp_path / "gone"
            out.rename(gone)
            shutil.rmtree(gone)

    with pytest.raises(MetaplError, match=r"run folder .*run was moved or deleted while the run"):
        engine.train(cfg, out, False, on_eval=delete_folder)
    assert not out.exists()


def test_the_metrics_log_notices_its_folder_moved(tmp_path):
    logger = MetricsLogger(tmp_path / "run", tensorboard=False)
    logger.log(1, {"loss": 0.5})
    logger.check_folder()  # still there
    (tmp_path / "run").rename(tmp_path / "moved")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("step,name,value\n")  # another run's
    with pytest.raises(MetaplError, match="moved or deleted"):
        logger.check_folder()
    logger.close()


def test_a_run_that_failed_before_its_first_checkpoint_is_not_told_it_resumes(
    tmp_path, monkeypatch, capsys
):
    """The advice named a last checkpoint to resume from when none had been written."""
    import metapl.train.engine as engine

    def full(path, payload):
        raise write_error(Path(path), FULL)

    monkeypatch.setattr(engine, "write_json_atomic", full)  # config.json, the first file written
    out = tmp_path / "run"
    args = ["train", "--preset", "digits-supervised", "--out", str(out), "--steps", "2"]
    assert main([*args, "--quiet", "--set", "finetune_steps=0", "--set", "warmup_steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not write" in err and "config.json" in err, err
    assert err.endswith(
        "; run the same command again (no checkpoint was written yet: the run starts over)\n"
    )
    assert not (out / "checkpoint.pt").exists()


# --- found by the mutation audit of the failed-write code -----------------------------------------


def test_a_failed_write_without_an_errno_is_still_one_line(tmp_path):
    """Some writers raise a bare OSError with a message and no errno (TensorBoard's "Writer is
    closed"); it is a failed write all the same, not a traceback."""
    error = write_error(tmp_path / "tb", OSError("Writer is closed"), kept="kept")
    assert str(error) == f"could not write {tmp_path / 'tb'}: Writer is closed; kept"


def test_a_full_quota_reports_the_free_space_as_a_full_disk_does(tmp_path):
    quota = write_error(tmp_path / "r.json", OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert quota is not None and quota.errno == errno.EDQUOT
    assert "Disk quota exceeded (" in str(quota) and "MiB free there)" in str(quota)


def test_a_write_error_met_again_on_its_way_out_is_not_named_twice(tmp_path):
    """A fill that itself writes a file (and fails) raises a WriteError naming that file; the outer
    write passes it on as it is, not as 'could not write A: could not write B: ...'."""
    inner = write_error(tmp_path / "inner.json", FULL)

    def fill(tmp: Path) -> None:
        raise inner

    with pytest.raises(WriteError) as caught:
        replace_atomically(tmp_path / "outer.json", fill)
    assert caught.value is inner and str(caught.value).count("could not write") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_rename_refused_names_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The finished file's rename can fail too (a full disk growing the folder, a quota): one line
    naming the file, the one there before unchanged, and no .tmp beside it."""
    path = tmp_path / "results.json"
    path.write_text("earlier")

    def refused(src, dst):
        raise FULL

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(WriteError, match=r"could not write .*results.json: No space left") as e:
        replace_atomically(path, lambda tmp: tmp.write_text("new"))
    assert e.value.errno == errno.ENOSPC and isinstance(e.value.__cause__, OSError)
    assert _files(tmp_path) == {"results.json": b"earlier"}


def test_a_failed_write_keeps_the_os_error_it_came_from(tmp_path):
    """The OSError is the WriteError's cause (``raise ... from``): a traceback, or code that looks
    at it, sees the file system's own error, not 'during handling of the above, another'."""

    def full(tmp: Path) -> None:
        raise FULL

    with pytest.raises(WriteError) as caught:
        replace_atomically(tmp_path / "r.json", full)
    assert caught.value.__cause__ is FULL


def test_other_threads_failed_writes_still_print_their_traceback(tmp_path, monkeypatch):
    """Only TensorBoard's writer thread is kept quiet (its error comes back from the writer's next
    call); an OSError in any other thread still reaches the hook that was there before, once."""
    pytest.importorskip("torch.utils.tensorboard")
    import threading

    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    MetricsLogger(tmp_path / "a").close()
    MetricsLogger(tmp_path / "b").close()  # a second logger: not a second hook around the first
    hook = threading.excepthook

    def fails():
        raise FULL

    thread = threading.Thread(target=fails)
    thread.start()
    thread.join()
    assert seen == [FULL]
    MetricsLogger(tmp_path / "c").close()
    assert threading.excepthook is hook


def test_leaving_the_loggers_block_normally_on_a_full_disk_is_the_error(tmp_path):
    """With no error before it, the last rows refused on the way out are the error to report, not
    dropped in silence."""
    with pytest.raises(WriteError, match="metrics.csv"):  # noqa: PT012
        with MetricsLogger(tmp_path, tensorboard=False) as logger:
            logger._file = _FullFile(logger._file)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="Linux's list of open files")
def test_reserving_the_disk_space_leaves_no_file_open(tmp_path, monkeypatch):
    """The file opened to reserve its blocks is closed, refused or not: a long tuning run
    precomputes again and again."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 4))
    images = np.zeros((5, 8, 8, 3), dtype=np.uint8)

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_files()
    probs = precompute.precompute_distributions(model, images, tmp_path / "p.npy", progress=False)
    del probs
    assert open_files() == before

    def full(fd, offset, length):
        raise FULL

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(WriteError):
        precompute.precompute_distributions(model, images, tmp_path / "q.npy", progress=False)
    assert open_files() == before


def test_trains_failed_write_is_still_an_os_error_with_its_errno(tmp_path, monkeypatch):
    """Called from Python, train's advised WriteError keeps the errno, so code that handles a full
    disk as an OSError (``err.errno == errno.ENOSPC``) still does."""
    import metapl.train.engine as engine
    from metapl.train.presets import load_preset

    def full(path, payload):
        raise write_error(Path(path), FULL)

    monkeypatch.setattr(engine, "write_json_atomic", full)
    cfg = load_preset("digits-supervised")
    with pytest.raises(OSError, match="run the same command again") as caught:
        engine.train(cfg, tmp_path / "run", show_progress=False)
    assert isinstance(caught.value, WriteError) and caught.value.errno == errno.ENOSPC
