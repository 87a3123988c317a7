"""`metapl tune`: hyper-parameter search on the tuning split (Appendix C.1), with Optuna.

The options live here, next to the command; the work is in :mod:`metapl.tuning`.
"""

from __future__ import annotations

import argparse

from metapl import cpu_threads

HELP = "hyper-parameter search on the tuning split (Appendix C.1), with Optuna"
DESCRIPTION = (
    "Incremental tuning as in Appendix C.1. Stage student tunes the supervised student (student "
    "lr, weight decay, dropout, label smoothing); stage teacher tunes the teacher of the preset's "
    "MPL method (teacher lr and dropout, MPL temperature, UDA factor and temperature) with the "
    "student's values fixed to stage student's best. Each trial trains with tuning=true (labeled "
    "minus the tuning split, scored on the tuning split; never the test set) in "
    "OUT/trials/<study>/<number>/; a median pruner stops trials that trail. Several processes or "
    "machines share a study through --storage. A trial stopped by Ctrl-C or kill -9 resumes from "
    "its last checkpoint when the command runs again. OUT/best.toml is the best configuration as "
    "a preset: metapl train --preset OUT/best.toml."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `metapl tune`."""
    parser.add_argument("--preset", required=True, help="a name from `metapl presets`, or a .toml")
    parser.add_argument(
        "--trials", type=int, required=True, help="trials this process runs, per stage"
    )
    parser.add_argument(
        "--storage",
        required=True,
        help="sqlite:///PATH.db (processes on one machine) or "
        "postgresql://USER:PASSWORD@HOST/DB (several machines)",
    )
    parser.add_argument("--out", required=True, help="folder for trials/ and best.toml")
    parser.add_argument(
        "--study", help="study name; stages add -student / -teacher (default: the preset's name)"
    )
    parser.add_argument(
        "--stage",
        choices=("student", "teacher", "both"),
        default="both",
        help="student (supervised), teacher (MPL, student fixed), or both in turn (default)",
    )
    parser.add_argument(
        "--data-dir",
        help="folder with the dataset files, or your own data's .npz file (not needed for digits)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="training steps of every trial, a short budget (default: the preset's)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto")
    cpu_threads.add_threads_option(parser, follows_load=False)
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a config key for every trial, kept in best.toml and not searched (repeatable: the "
        "last of a key wins); digits needs --set tune_per_class=N",
    )
    parser.add_argument("--no-prune", action="store_true", help="run every trial to the end")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> None:
    from metapl.errors import ConfigError
    from metapl.report import check_out_not_in_data, output_folder
    from metapl.train.config import (
        apply_overrides,
        first_order_note,
        joined_notes,
        parse_set_options,
        uda_warmup_note,
        warmup_cut_to,
    )
    from metapl.train.presets import load_preset
    from metapl.tuning import TuneOptions, tune
    from metapl.tuning.runner import label_budget_note, train_command

    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    cpu_threads.check_requested(args.threads)  # before the output folder is made
    runtime = {
        key: getattr(args, key)
        for key in ("steps", "device", "data_dir")
        if getattr(args, key) is not None
    }
    overrides = parse_set_options(args.set or [])
    cut, note = warmup_cut_to(args.steps, load_preset(args.preset), overrides, "tune")
    runtime.update(cut)
    trial_base = apply_overrides(load_preset(args.preset), {**overrides, **runtime})
    note = joined_notes(
        note, uda_warmup_note(trial_base, "tune"), first_order_note(trial_base, "tune", overrides)
    )
    check_out_not_in_data(args.out, trial_base)  # the trials' run folders are under --out
    opts = TuneOptions(
        preset=args.preset,
        trials=args.trials,
        storage=args.storage,
        out=output_folder(args.out),
        study=args.study,
        stage=args.stage,
        overrides=overrides,
        runtime=runtime,
        prune=not args.no_prune,
        show_progress=not args.quiet,
        note=note,  # the tuner prints it after its checks: a mistake stays one line
    )
    with cpu_threads.cpu_threads(args.threads, follows_load=False):  # see metapl.cpu_threads
        path = tune(opts)
    if path is None:  # no trial finished yet; others run elsewhere (the tuner said so)
        return
    print(f"wrote {path}: {train_command(opts)}")
    # The label budget is the preset's and --set's: no trial tunes it.
    note = label_budget_note(apply_overrides(load_preset(args.preset), overrides))
    if note is not None:
        print(note)
