"""The training loop, read top to bottom: config -> data -> method -> steps -> checkpoints -> results.

Resumable by construction: each step's batch, augmentation and dropout randomness are seeded by
(seed, step), and the checkpoint holds everything else (both models, optimizers, schedules, EMA, the
MPL step's state, RNG states). Running the same command with the same ``--out`` continues where the
last checkpoint left off and ends with exactly the weights of an uninterrupted run.

Data parallel under ``torchrun --nproc_per_node N -m metapl train ...``: each process trains on its
contiguous slice of every step's global batch, every optimizer step reads gradients averaged over
the processes, and rank 0 alone evaluates and writes files (see :class:`DataParallel`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shlex
import sys
import time
import uuid
from pathlib import Path

import torch

from metapl.atomic import remove_leftovers
from metapl.data import decoding
from metapl.data.splits import SSLSplit, load_split
from metapl.distributed import DataParallel, torchrun_process_group, torchrun_world
from metapl.errors import CheckpointError, ConfigError, WriteError, first_line
from metapl.methods.build import autocast_dtype
from metapl.progress import progress_bar
from metapl.rank_failure import on_rank_0
from metapl.reduced.precompute import Ranks
from metapl.report import check_replaceable, output_folder, write_json_atomic
from metapl.train.batches_ahead import batches_for
from metapl.train.checkpoint import (
    FORMAT_VERSION,
    check_resumable,
    config_fingerprint,
    load_checkpoint,
    prev_path,
    save_checkpoint,
)
from metapl.train.config import PATH_KEYS, TrainConfig
from metapl.train.data import BatchSource, evaluate_models
from metapl.train.data_identity import DATA_KEY, check_same_data_as_checkpoint, data_record
from metapl.train.guards import NonFiniteWatch, check_finite_weights, to_floats
from metapl.train.large_teacher import check_large_teacher, prepare_large_teacher_data
from metapl.train.metrics_log import MetricsLogger
from metapl.train.model_checks import check_compile_works, check_models_fit
from metapl.train.rank_checks import check_ranks_see, check_same_data
from metapl.train.run import Figure10Series, Run
from metapl.train.stopping import (
    STOP_SIGNALS,
    Interrupted,
    Stopped,
    StopSignals,
    TrainingStopped,
)


def _stop_now(signals: StopSignals, dp: DataParallel, step: int, cfg: TrainConfig) -> bool:
    """Whether a stop signal came: to this process, or under torchrun to any rank. The ranks must
    stop at the same step, so they ask each other only at logged steps, where they synchronize
    anyway (every ``log_every`` steps, not at every step)."""
    if not dp.enabled:
        return signals.signum is not None
    return step % cfg.log_every == 0 and dp.any_rank(signals.signum is not None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA device here")
    _, world_size, local_rank = torchrun_world()
    if name == "cuda" and world_size > 1:
        return torch.device("cuda", local_rank)  # torchrun: one GPU per process
    return torch.device(name)


def check_tuning_split(cfg: TrainConfig) -> None:
    """A dataset that never has a tuning split, for ``tuning=true`` (``metapl tune``'s trials, or
    ``metapl train --set tuning=true``): what to do instead, before any data is read."""
    if cfg.dataset == "digits" and cfg.tune_per_class == 0:
        raise ConfigError(
            "digits has no tuning split by default: reserve one with --set tune_per_class=N "
            "(N more labeled images per class, e.g. 5)"
        )
    if cfg.dataset == "svhn-1k":
        raise ConfigError(
            "svhn-1k has no tuning split (the paper tunes on CIFAR-10 and reuses its values, "
            "App. C.1): tune a cifar10-4k preset instead"
        )


def load_data(cfg: TrainConfig) -> SSLSplit:
    """The dataset split of ``cfg`` (the tuning view when ``cfg.tuning``)."""
    if cfg.tuning:  # what to do instead, which the split itself cannot say (digits: --set)
        check_tuning_split(cfg)
    if cfg.dataset == "digits":
        from metapl.data.digits import digits_split

        split = digits_split(cfg.seed, cfg.labels_per_class, cfg.tune_per_class)
    else:
        if not cfg.data_dir:
            raise ConfigError(f"{cfg.dataset} needs --data-dir: the folder holding its files")
        options: dict[str, int | str] = {}
        if cfg.dataset.startswith("imagenet") or cfg.dataset in ("folder", "npz"):
            options["resolution"] = cfg.image_size
        if cfg.unlabeled_dir:
            options["unlabeled_dir"] = cfg.unlabeled_dir
        split = load_split(cfg.dataset, cfg.data_dir, **options)
    return split.tuning_view() if cfg.tuning else split


def _weights(run: Run) -> dict[str, torch.nn.Module]:
    models = dict(run.method.models)
    if run.ema is not None:
        models["ema"] = run.ema.module
    return models


def _accuracies(run: Run, amp, dp: DataParallel) -> dict[str, float]:
    """Held-out accuracy (tuning split and test) and accuracy on the labeled training data of the
    student and, for MPL, the teacher (Figure 9). Under torchrun every rank calls this at the
    same step and classifies its share of each set, with rank 0's BatchNorm statistics (rank-local
    since the last checkpoint or evaluation; training never reads them, so this changes no
    weight), so every rank evaluates the same models."""
    dp.broadcast_buffers_(_weights(run).values())
    s, cfg, dev = run.split, run.cfg, run.device
    # which models each set evaluates, in the order the accuracies are logged; each set is one
    # pass over its images (decoded once for all its models, where they are files)
    on_tune, on_test, on_labeled = {}, {}, {}
    order = []
    # Only a tuning split the run did not train on: final runs of most datasets train on theirs
    # (the last labeled images; a run with tuning=true holds them out, as its test set), where the
    # accuracy would be on training images yet read as a held-out one (metapl compare).
    if len(s.y_tune) and not s.tune_in_labeled:
        on_tune["tune_accuracy"] = run.eval_model
        order.append("tune_accuracy")
    if len(s.y_test):  # your own data may come without a test set: then no test accuracy
        on_test["test_accuracy"] = run.eval_model
        order.append("test_accuracy")
    for name, model in run.method.models.items():
        if name == "teacher" and cfg.method == "reduced_mpl":
            continue  # the reduced teacher reads distributions, not images
        on_labeled[f"{name}_labeled_accuracy"] = model
        order.append(f"{name}_labeled_accuracy")
        if name == "teacher" and len(s.y_test):  # to understand MPL, never to pick a model
            on_test["teacher_test_accuracy"] = model
            order.append("teacher_test_accuracy")
    found = {}
    for models, images, labels in (
        (on_tune, s.x_tune, s.y_tune),
        (on_test, s.x_test, s.y_test),
        (on_labeled, s.x_labeled, s.y_labeled),
    ):
        if models:
            found.update(
                evaluate_models(
                    models, images, labels, cfg, dev, amp, (dp.rank, dp.world_size), dp.sum_
                )
            )
    return {key: found[key] for key in order}


def _check_data_parallel(cfg: TrainConfig, world_size: int) -> None:
    """Mistakes in a torchrun launch, raised on every rank before any process waits on another."""
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is not divisible by the {world_size} processes, which "
            "each train on an equal slice of every batch; choose another --set batch_size=N"
        )
    if world_size > 1 and cfg.uses_mpl and cfg.mpl_estimator == "double_backward":  # the
        # library's error names its keyword argument, not the --set key a command-line user sets
        raise ConfigError(
            "mpl_estimator=double_backward runs in one process only (an all-reduce is not "
            "differentiable); --set mpl_estimator=exact gives the same gradient"
        )


class _NoMetrics:
    """The metrics log of ranks other than 0, which write nothing."""

    def __enter__(self) -> _NoMetrics:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def log(self, step: int, metrics: dict) -> None:
        pass

    def check_folder(self) -> None:
        pass


def _load_run_state(run: Run, saved: dict, ckpt_path: Path) -> None:
    """``run.load_state_dict(saved)``; a checkpoint whose contents do not fit the run (it passed the
    configuration check, so it was damaged or written by another version) is a CheckpointError."""
    try:
        run.load_state_dict(saved)
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
        detail = f"it lacks {exc}" if isinstance(exc, KeyError) else first_line(exc)
        prev = prev_path(ckpt_path)
        hint = (
            f"to resume from the previous checkpoint instead run: mv {shlex.quote(str(prev))} "
            f"{shlex.quote(str(ckpt_path))}; or delete both to start this run over"
            if prev.is_file()
            else "delete it to start this run over, or train into another folder"
        )
        raise CheckpointError(
            f"checkpoint {ckpt_path} does not fit this run's models and optimizers ({detail}); "
            f"{hint}"
        ) from None


# The files of a run folder that are written whole (metapl.atomic), besides the checkpoints (whose
# save clears its own leftovers): curves.png, and the large teacher's distributions' sidecars.
_WHOLE_FILES = (
    "config.json",
    "classes.json",
    "metrics.csv",
    "results.json",
    "figure10.json",
    "curves.png",
    "large_teacher_labeled.json",
    "large_teacher_unlabeled.json",
)


def _clear_leftovers(out_dir: Path) -> None:
    """Delete the temporary files of those that a run killed while writing one left (they piled up
    in the folder, a run's metrics.csv in size each, over interrupted runs and resumes)."""
    for name in _WHOLE_FILES:
        remove_leftovers(out_dir / name)
    for token in out_dir.glob(f"{_RANKS_TOKEN}*"):  # a torchrun run killed in its folder check
        token.unlink(missing_ok=True)


_RANKS_TOKEN = ".metapl-seen-by-every-rank-"
_BEFORE_THE_FIRST_STEP = "the run before its first step"  # where a rank-0 failure stopped it


def _open_run_folder(out_dir: Path, dp: DataParallel, note: str | None) -> None:
    """Rank 0 makes the run folder, clears its leftovers and prints ``note``. Under torchrun every
    rank first checks that it sees a file rank 0 made there: they share one folder (rank 0 writes
    the checkpoints and the large teacher's files that every rank reads), not one per machine."""
    existed = out_dir.is_dir()
    token = None

    def make_folder() -> None:
        nonlocal token
        out_dir.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(out_dir)
        if dp.enabled:
            token = out_dir / f"{_RANKS_TOKEN}{uuid.uuid4().hex}"
            token.touch()

    on_rank_0(dp, make_folder, _BEFORE_THE_FIRST_STEP)
    if dp.enabled:
        name = dp.broadcast_object(None if token is None else token.name)
        shared = False
        try:
            check_ranks_see(dp, out_dir / name, f"the file rank 0 made in {out_dir}")
            shared = True
        finally:  # every rank has looked: the all-reduces in the check wait for all of them
            if token is not None:
                token.unlink(missing_ok=True)
                if not shared and not existed:  # nothing of the run was written: no empty folder
                    with contextlib.suppress(OSError):  # left if anything else is in it
                        out_dir.rmdir()
    if dp.is_main:
        _print_note(note)  # after the checks: a mistake found in them is one line


# Config keys that do not change a run's results: where it ran, how often it logged, evaluated
# and saved, and the preset's name (its values are compared).
_NOT_IN_RESULTS = (
    "device",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "preset",
    "data_threads",
    "data_prefetch",
)


def _check_steps_fit_the_run(cfg: TrainConfig, saved: dict, ckpt_path: Path) -> None:
    """A ConfigError when this run's --steps cannot continue the checkpoint ``saved``:
    - one past this run's last step (a shorter ``--steps``): the loop would not run, and
      results.json would report that model, trained further, as one of ``cfg.steps``;
    - a longer ``--steps`` on a run whose fine-tuning began: it went on fine-tuning (at a
      learning rate its schedule had ended at 0), its main phase untouched, and results.json
      called it a run of the longer --steps."""
    step, total = int(saved["step"]), cfg.steps + cfg.finetune_steps
    if step > total:
        raise ConfigError(
            f"{ckpt_path} is at step {step}, past the {total} steps this run asks for; give "
            f"--steps {step - cfg.finetune_steps} or more to continue that run, or choose another "
            "--out"
        )
    recorded = saved.get("config")
    then = recorded.get("steps") if isinstance(recorded, dict) else None
    if type(then) is int and then < cfg.steps and cfg.finetune_steps > 0 and step > then:
        raise ConfigError(
            f"{ckpt_path} is at step {step}, in the fine-tuning that followed its {then} steps: "
            f"a longer --steps ({cfg.steps}) cannot go back to its main phase; give --steps "
            f"{then} to finish it, or train the longer run into another --out"
        )


def _check_shorter_than_the_run(
    cfg: TrainConfig, saved: dict, ckpt_path: Path, defaults: dict
) -> None:
    """:func:`_check_steps_fit_the_run` first when the warm-up is all that differs: `--steps 4`
    cut the preset's warm-up to 4, `--steps 2` then cut it to 2, and the resume was refused as "a
    different configuration (warmup_steps: 4 -> 2)", an option never set, not as too short."""
    recorded = saved.get("config")
    then = recorded.get("warmup_steps") if isinstance(recorded, dict) else None
    if type(then) is not int or then == cfg.warmup_steps:
        return
    as_then = dataclasses.replace(cfg, warmup_steps=then).to_dict()
    try:
        check_resumable(
            saved,
            config_fingerprint(as_then),
            ckpt_path,
            config=as_then,
            defaults=defaults,
            paths=PATH_KEYS,
        )
    except CheckpointError:
        return  # another configuration besides: check_resumable says so
    _check_steps_fit_the_run(cfg, saved, ckpt_path)


def _print_note(note: str | None) -> None:
    """``train``'s ``note`` on stderr, if there is one."""
    if note is not None:
        print(note, file=sys.stderr)


def _data_parallel(train_fn):
    """Under torchrun (WORLD_SIZE > 1) run ``train_fn`` in torchrun's process group (nccl on CUDA,
    gloo on CPU), destroyed on the way out, errors included."""

    @functools.wraps(train_fn)
    def wrapper(cfg: TrainConfig, out_dir: Path | str, *args, **kwargs):
        device = resolve_device(cfg.validate().device)
        _check_data_parallel(cfg, torchrun_world()[1])
        with torchrun_process_group(device):
            try:
                return train_fn(cfg, out_dir, *args, **kwargs)
            except WriteError as err:  # a full disk, say: what to do once it is fixed
                if (Path(out_dir) / "checkpoint.pt").exists():
                    then = "to resume from the last checkpoint"
                else:
                    then = "(no checkpoint was written yet: the run starts over)"
                raise err.advised(f"; run the same command again {then}") from err

    return wrapper


@_data_parallel
def train(
    cfg: TrainConfig,
    out_dir: Path | str,
    show_progress: bool = True,
    on_eval=None,
    note: str | None = None,
) -> dict:
    """Train (or resume) the run in ``out_dir``; returns the summary also written to results.json.

    ``on_eval(step, accuracies)``, if given, sees each evaluation; an exception it raises stops the
    run (``metapl tune`` reports to its pruner this way). ``note``, if given, is a line for stderr
    (`metapl train`'s note on its options), printed once the data, checkpoint and models are
    checked, before the first write: a mistake found in them is then one line, not the note and
    the error.

    SIGTERM or SIGUSR1 (a scheduler's time limit) during the training steps ends the step, saves
    a checkpoint of it and raises :class:`~metapl.train.stopping.TrainingStopped`; before the steps
    (loading, precomputing a large teacher's outputs) or after them (the final evaluation, the
    results), where there is nothing to save, it raises :class:`~metapl.train.stopping.Stopped` at
    once, as Ctrl-C raises KeyboardInterrupt."""
    with StopSignals(raising=_stopped_before_training) as signals:
        return _train(cfg, out_dir, show_progress, on_eval, note, signals)


def _report(
    logger: MetricsLogger | _NoMetrics, on_eval, step: int, accuracies: dict[str, float]
) -> None:
    """An evaluation's accuracies to the log, then to the caller's ``on_eval``."""
    logger.log(step, accuracies)
    if on_eval is not None:
        on_eval(step, accuracies)


def _save(
    logger: MetricsLogger | _NoMetrics, ckpt_path: Path, run: Run, fingerprint: str, data: dict
) -> None:
    logger.check_folder()  # not a checkpoint in a folder made again
    save_checkpoint(ckpt_path, {**run.state_dict(fingerprint), DATA_KEY: data})


@contextlib.contextmanager
def _naming_the_checkpoint(run: Run, checkpointed: list[int | None]):
    """Ctrl-C in the block (a KeyboardInterrupt, not a signal's :class:`Stopped`) becomes
    :class:`Interrupted`, whose line names the run's step and its last checkpoint's."""
    try:
        yield
    except KeyboardInterrupt as stop:
        if isinstance(stop, Stopped):
            raise
        raise Interrupted(run.step, run.total_steps, checkpointed[0]) from None


def _stopped_before_training(signum: int) -> Stopped:
    return Stopped(
        signum,
        " before its training steps began, with nothing to save; run the same command again to "
        "start (or resume) the run",
    )


def _stopped_after_training(signum: int) -> Stopped:
    return Stopped(
        signum,
        " after its last step's checkpoint, before its results were written; run the same "
        "command again to write them",
    )


def _train(
    cfg: TrainConfig,
    out_dir: Path | str,
    show_progress: bool,
    on_eval,
    note: str | None,
    signals: StopSignals,
) -> dict:
    cfg.validate()
    # a file in its place (or in a result file's or folder's): a traceback once the first file was
    # written (`metapl digits` and `reduced` train into run folders of their own under --out)
    out_dir = output_folder(out_dir)
    dp = DataParallel()  # this process's share under torchrun; rank 0 of 1 otherwise
    device = resolve_device(cfg.device)
    decoding.set_threads(cfg.data_threads)  # also for the image files load_data decodes now
    split = load_data(cfg)  # bad data fails here, before anything is written
    fingerprint = config_fingerprint(cfg.to_dict())
    data = data_record(split)  # the data as loaded (a large teacher's selection comes later)
    ckpt_path = out_dir / "checkpoint.pt"
    # Options added since a checkpoint or results.json was written count as their defaults (the
    # old behaviour): a run folder survives an upgrade of metapl.
    defaults = TrainConfig().to_dict()
    saved = None
    # A rank that saw no checkpoint would start over while the others resume: each would wait in
    # collectives the others never make (run folders on disks of their own machines).
    resuming = check_ranks_see(dp, ckpt_path, f"{ckpt_path} is there")
    check_same_data(dp, split, data["fingerprint"])  # node-local copies, one partly copied
    if resuming:
        saved = load_checkpoint(ckpt_path, format_version=FORMAT_VERSION)
        _check_shorter_than_the_run(cfg, saved, ckpt_path, defaults)
        check_resumable(
            saved, fingerprint, ckpt_path, config=cfg.to_dict(), defaults=defaults, paths=PATH_KEYS
        )
        _check_steps_fit_the_run(cfg, saved, ckpt_path)
        check_same_data_as_checkpoint(saved, data, ckpt_path)
    else:
        # No checkpoint, so the run starts over: the results.json of a run of another
        # configuration there (its checkpoints deleted to save space, say) would be replaced, and
        # its metrics.csv, without a word.
        on_rank_0(
            dp,
            lambda: check_replaceable(
                out_dir,
                "train",
                cfg.to_dict(),
                ignore=_NOT_IN_RESULTS,
                defaults=defaults,
                paths=PATH_KEYS,
            ),
            _BEFORE_THE_FIRST_STEP,
        )
    teacher_probs = None
    opened = False  # the run folder (made by rank 0, seen by every rank)
    if cfg.uses_large_teacher:  # ReducedMPL / NoisyStudent: precompute, select, free the teacher
        assert cfg.large_teacher  # validate() refuses a large-teacher method without one
        check_large_teacher(Path(cfg.large_teacher), split, device)  # fail early
        _open_run_folder(out_dir, dp, note)  # before any rank looks for the files in it
        opened = True
        # Every rank classifies its share of the images; rank 0 writes the files.
        ranks = Ranks(dp.rank, dp.world_size, dp.gather_to_main, dp.broadcast_object)
        split, teacher_probs = prepare_large_teacher_data(
            cfg, split, out_dir, device, show_progress and dp.is_main, ranks
        )
    run = Run(cfg, split, device, dp)  # a bad model or schedule fails here, before any write
    check_models_fit(run)  # and so does a model that cannot take this data's images
    if cfg.compile:
        check_compile_works(device)  # and a machine where torch.compile cannot work
    if saved is not None:  # every rank reads the same checkpoint; one that does not fit fails here
        _load_run_state(run, saved, ckpt_path)
        if show_progress and dp.is_main:  # else only the bar's start would tell
            print(
                f"metapl train: resuming {out_dir} from its checkpoint of step {run.step} of "
                f"{run.total_steps}",
                file=sys.stderr,
            )
    elif show_progress and dp.is_main and (out_dir / "config.json").is_file():
        # a run of this configuration stopped before its first checkpoint (kill -9, a crash)
        print(
            f"metapl train: starting {out_dir} over from step 0: it holds no checkpoint (they "
            f"are saved every {cfg.checkpoint_every} steps)",
            file=sys.stderr,
        )
    source = BatchSource(  # bad augmentation options fail here, before any write too
        split, cfg, run.method.views, device, teacher_probs, shard=(dp.rank, dp.world_size)
    )
    # On a GPU, the next step's batch is made on a background thread while this one trains.
    batches = batches_for(source, device, run.total_steps - 1, run.views_at)
    if not opened:
        _open_run_folder(out_dir, dp, note)
    # here and below: the other ranks write nothing
    on_rank_0(dp, functools.partial(_write_run_files, out_dir, cfg, split), _BEFORE_THE_FIRST_STEP)
    dp.broadcast_(_weights(run).values())  # and, to be safe, starts from rank 0's weights
    if cfg.compile:  # after check_models_fit's forward, which would compile for 2 images
        compiled = run.compile_models()
        if dp.is_main and show_progress:
            print(
                f"metapl train: note: compile=true: the first steps compile {', '.join(compiled)} "
                "(torch.compile); they take longer than the others",
                file=sys.stderr,
            )
    watched = (
        Figure10Series(run, teacher_probs) if cfg.method == "reduced_mpl" and dp.is_main else None
    )
    amp = autocast_dtype(cfg)
    start_time = time.perf_counter()
    # Rank 0 opens metrics.csv and tb/ (reading the rows a resumed run keeps): a full disk or a
    # damaged file there stops every rank, as any of its writes does.
    log_of_rank_0: list[MetricsLogger] = []

    def open_log() -> None:
        log_of_rank_0.append(MetricsLogger(out_dir, resume_step=run.step))

    on_rank_0(dp, open_log, _BEFORE_THE_FIRST_STEP)
    checkpointed = [run.step if saved is not None else None]  # the step a rerun resumes from
    with (
        _naming_the_checkpoint(run, checkpointed),  # Ctrl-C's line says where a rerun resumes
        log_of_rank_0[0] if log_of_rank_0 else _NoMetrics() as logger,
        contextlib.closing(batches),  # the next step's batch or images are dropped at the end
    ):
        # SIGTERM, SIGUSR1 from here: a checkpoint of the step, then stop (metapl.train.stopping)
        signals.raising = None
        bar = progress_bar(
            total=run.total_steps,
            initial=run.step,
            disable=not show_progress or not dp.is_main,
            unit="step",
            desc=cfg.preset or cfg.method,
            dynamic_ncols=True,
        )
        watch = NonFiniteWatch(run.step)  # every step's losses, read at the checks below
        while run.step < run.total_steps:
            metrics = run.advance(batches)
            watch.observe(metrics)
            bar.update()
            last = run.step == run.total_steps
            stopping = _stop_now(signals, dp, run.step, cfg) and not last
            checkpointing = run.step % cfg.checkpoint_every == 0 or last or stopping
            evaluating = run.step % cfg.eval_every == 0 or last or run.step == cfg.steps
            if evaluating or run.step % cfg.log_every == 0 or checkpointing:
                # The mean over ranks: each loss is the whole global batch's (a batch mean of equal
                # slices), and what a NaN/Inf message says of it now is the same on every rank.
                metrics = dp.mean_metrics(metrics)
            # Rank 0 alone writes (logs, checkpoints) and reports to on_eval; whatever stops it
            # there (a full disk, on_eval's exception) stops every rank with it, instead of leaving
            # the others in their next step's collectives until torchrun ends them.
            at_step = f"the run at step {run.step}"
            if run.step % cfg.log_every == 0 or last:
                watch.check(metrics, run.step, dp.earliest)  # all ranks decide alike
                values = {**to_floats(metrics), **run.learning_rates()}
                on_rank_0(dp, functools.partial(logger.log, run.step, values), at_step)
                # refresh=False: shown at the next redraw (a log file gets one every 30 s)
                losses = {k: f"{v:.3g}" for k, v in values.items() if "loss" in k}
                bar.set_postfix(losses, refresh=False)
            if watched is not None:
                watched.maybe_record(run.step)
            if evaluating:  # no accuracy of NaN weights reaches the log or a tuning study
                watch.check(metrics, run.step, dp.earliest)
            if evaluating:  # every rank classifies its share; rank 0 logs and reports
                accuracies = _accuracies(run, amp, dp)
                report = functools.partial(_report, logger, on_eval, run.step, accuracies)
                on_rank_0(dp, report, at_step)
                if run.step == cfg.steps and run.finetune is not None:
                    run.before_finetune = accuracies
            if checkpointing:
                watch.check(metrics, run.step, dp.earliest)  # never write a NaN checkpoint
                # BatchNorm running statistics are rank-local: every rank takes rank 0's, so each
                # holds exactly the state saved (and a resumed run continues from it).
                dp.broadcast_buffers_(_weights(run).values())
                # A finite loss can still come with an update that overflowed the weights.
                check_finite_weights(_weights(run), run.step)
                on_rank_0(
                    dp, functools.partial(_save, logger, ckpt_path, run, fingerprint, data), at_step
                )
                checkpointed[0] = run.step
            if stopping:
                # torchrun ends every rank as soon as one exits: none does before the checkpoint
                dp.wait_for_main()
                bar.close()
                # (a rank that had no signal of its own names the one schedulers send)
                raise TrainingStopped(signals.signum or STOP_SIGNALS[0], run.step, run.total_steps)
        bar.close()
        # nothing left to save: a signal now stops at once (unless one came in the last step,
        # which then goes on to write its results)
        signals.raising = _stopped_after_training
        final = _accuracies(run, amp, dp)
    # Every rank returns the same summary: the accuracies are the ranks' counts summed.
    record = {
        "method": cfg.method,
        "seed": cfg.seed,
        "dataset": split.name,
        "steps": cfg.steps,
        "finetune_steps": cfg.finetune_steps,
        "accuracy": final.get("test_accuracy"),  # None without a test set
        **{k: v for k, v in final.items() if k != "test_accuracy"},
    }
    if run.before_finetune is not None:
        record["accuracy_before_finetune"] = run.before_finetune.get("test_accuracy")
    summary = {
        "command": "train",  # `metapl train` (and each run of digits, reduced, tune) wrote this
        "config": cfg.to_dict(),
        "results": [record],
        "seconds_this_session": time.perf_counter() - start_time,
    }
    written = functools.partial(_write_results, out_dir, cfg, summary, watched)
    on_rank_0(dp, written, "the run after its last step")
    return summary


def _write_run_files(out_dir: Path, cfg: TrainConfig, split: SSLSplit) -> None:
    """The run's config.json, and classes.json (label i's name, for `metapl predict`)."""
    write_json_atomic(out_dir / "config.json", cfg.to_dict())
    if split.class_names is not None:
        write_json_atomic(out_dir / "classes.json", list(split.class_names))


def _write_results(
    out_dir: Path, cfg: TrainConfig, summary: dict, watched: Figure10Series | None
) -> None:
    """A finished run's results.json and curves.png (and figure10.json for ReducedMPL)."""
    if watched is not None:
        write_json_atomic(out_dir / "figure10.json", watched.series())
    write_json_atomic(out_dir / "results.json", summary)
    from metapl.train.curves import plot_curves  # matplotlib: only once a run is done

    plot_curves(out_dir, f"{cfg.preset or cfg.method} (seed {cfg.seed})")
