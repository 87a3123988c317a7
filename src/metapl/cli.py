"""The `metapl` command line. Each subcommand parses its options and calls one experiment function.

User mistakes (:class:`metapl.errors.MetaplError`) become one line on stderr and exit code 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from metapl import __version__, cpu_threads
from metapl.errors import ConfigError, MetaplError, did_you_mean
from metapl.malloc import keep_freed_memory
from metapl.progress import close_bars
from metapl.report import (
    check_out_not_in_data,
    check_replaceable,
    output_folder,
    paired_differences,
    print_paired_differences,
    release_output_folders,
)
from metapl.train.stopping import Interrupted, Stopped
from metapl.warning_lines import one_line_warnings

# The most seeds one command takes: each is a training run (digits: minutes), and a range such as
# 0-4294967295 would otherwise fill the memory with its numbers before any check.
MAX_SEEDS = 10_000


def parse_seeds(text: str) -> list[int]:
    """'0-9' -> 0..9, '1,3,5' -> [1, 3, 5], '0-2,7' -> [0, 1, 2, 7]; each seed in 0..MAX_SEED
    (numpy's and scikit-learn's limit), at most :data:`MAX_SEEDS` of them."""
    from metapl.train.config import MAX_SEED

    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            lo, hi = (int(v) for v in part.split("-", 1)) if "-" in part else (int(part),) * 2
            if min(lo, hi) < 0 or max(lo, hi) > MAX_SEED:
                raise ConfigError(f"--seeds {text!r}: seeds must be in 0..{MAX_SEED}")
            if hi < lo:
                raise ConfigError(
                    f"--seeds {text!r}: the range {part} counts down; write it {hi}-{lo}"
                )
            if len(seeds) + hi - lo + 1 > MAX_SEEDS:
                raise ConfigError(
                    f"--seeds {text!r}: more than {MAX_SEEDS:,} seeds; run fewer per command"
                )
            seeds.extend(range(lo, hi + 1))
    except ValueError:
        raise ConfigError(
            f"--seeds {text!r}: expected a range like 0-9 or a list like 0,3,7"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct non-negative integers")
    return seeds


def parse_names(text: str) -> tuple[str, ...]:
    """'uda, uda_mpl,,uda' -> ('uda', 'uda_mpl'): spaces and empty items dropped, each name once
    (a name given twice would train the same run folder twice at the same time)."""
    return tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


class _Parser(argparse.ArgumentParser):
    """argparse's parser with metapl's one-line errors (README: a mistake in the input prints one
    line): argparse put its usage block above the message, and the top-level parser reported an
    option unknown to a subcommand, without the subcommand's name (see :func:`parse`)."""

    def error(self, message: str) -> NoReturn:
        # a mistyped command or choice ("metapl trian") names the closest one, as options do
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            given, listed = choice.groups()
            message += did_you_mean(given, [c.strip(" '") for c in listed.split(",")])
        if message.startswith("the following arguments are required"):
            # argparse finds a missing option before an unknown one: `--prest NAME` was only
            # "--preset is required", the typo unnamed
            unknown = self._unknown_options()
            if unknown:
                hints = [did_you_mean(u, self._option_string_actions) for u in unknown]
                message = f"unrecognized arguments: {' '.join(unknown)}{''.join(hints)}"
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")

    def _unknown_options(self) -> list[str]:
        """The options given to this (sub)command that it does not have, in :data:`_ARGV`."""
        argv, command = list(_ARGV), self.prog.split()[-1]
        if command in argv:  # the top-level options before it are not this command's
            argv = argv[argv.index(command) + 1 :]
        if "--" in argv:
            argv = argv[: argv.index("--")]
        names = [a.split("=", 1)[0] for a in argv if a.startswith("-") and not _is_number(a)]
        return [n for n in names if not self._known_option(n)]

    def _known_option(self, name: str) -> bool:
        """An option of this parser, or (as argparse reads it) a long option's unique prefix:
        `--pre NAME` is `--preset NAME`."""
        options = self._option_string_actions
        if name in options:
            return True
        if not (self.allow_abbrev and name.startswith("--")):
            return False
        return len([o for o in options if o.startswith(name)]) == 1


# The command line being parsed (parse() sets it), for _Parser.error's unknown options.
_ARGV: list[str] = []


def _is_number(text: str) -> bool:
    """Whether ``text`` is a number (``-5``, ``-1e-3``): a value, though it starts with a dash."""
    try:
        float(text)
    except ValueError:
        return False
    return True


class _Formatter(argparse.HelpFormatter):
    """argparse's help text, but a paragraph of the description or epilog that starts with
    "example" keeps its lines: a command line stays whole, not reflowed into the prose."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text  # zero-argument super() does not work in the generator below
        parts = text.split("\n\n")
        return "\n\n".join(p if p.startswith("example") else fill(p, width, indent) for p in parts)


def _cmd_twomoons(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    # The options are checked before the experiment's imports (torch, scikit-learn: seconds), so
    # that a mistyped one is reported at once.
    seeds = parse_seeds(args.seeds)
    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps must be >= 1")
    if not 0.0 <= args.noise <= 1.0:
        raise ConfigError(f"--noise must be in [0, 1], got {args.noise}")
    cpu_threads.check_requested(args.threads)  # before the output folder is made
    out = output_folder(args.out, command="twomoons")

    from metapl.experiments.twomoons import TwoMoonsConfig, run, save, summarize

    cfg = TwoMoonsConfig(seeds=seeds, noise=args.noise, estimator=args.estimator)
    if args.steps is not None:
        cfg.steps = args.steps
    check_replaceable(out, "TwoMoons", asdict(cfg), defaults=asdict(TwoMoonsConfig()))
    with cpu_threads.cpu_threads(
        args.threads, follows_load=True
    ) as threads:  # see metapl.cpu_threads
        start = time.perf_counter()
        result = run(cfg, show_progress=not args.quiet)
        save(result, cfg, out)
        elapsed = time.perf_counter() - start
    print(
        f"TwoMoons, noise {cfg.noise}, {len(cfg.seeds)} seeds ({args.seeds}), MPL's teacher "
        f"gradient {cfg.estimator.replace('_', '-')}, accuracy on all 2,000 points:"
    )
    for method, (mean, std, n) in summarize(result["records"]).items():
        print(f"  {method:<18} {100 * mean:6.2f} +- {100 * std:5.2f} %  (n={n})")
    baselines = ("supervised", "pseudo_label_hard", "pseudo_label_soft")
    print_paired_differences(paired_differences(result["records"], [("mpl", b) for b in baselines]))
    print(
        f"wrote {args.out}/results.json, twomoons.png, grad_cosine.png in {elapsed:.1f} s "
        f"({threads} thread{'s' if threads > 1 else ''})"
    )


def _saved_config(out: Path) -> dict:
    """The configuration of the run in ``out`` (its config.json), or {} when there is none."""
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _earlier_warmup(out: Path) -> int | None:
    """The warm-up of the run being resumed in ``out``: its config.json's, or, when that file is
    missing or damaged (hand-edited), its checkpoint's record. Without the checkpoint's, a warm-up
    that an earlier --steps had cut was cut again to the new --steps, and the resume was refused as
    "a different configuration (warmup_steps: 2 -> 4); use ... the same options" though the
    options were the same."""
    earlier = _saved_config(out).get("warmup_steps")
    if (out / "checkpoint.pt").is_file() and (type(earlier) is not int or earlier < 0):
        from metapl.train.checkpoint import CONFIG_KEY, load_checkpoint

        try:  # a damaged checkpoint is the engine's to report, with its advice
            recorded = load_checkpoint(out / "checkpoint.pt").get(CONFIG_KEY)
        except MetaplError:
            recorded = None
        earlier = recorded.get("warmup_steps") if isinstance(recorded, dict) else None
    return earlier if type(earlier) is int and earlier >= 0 else None


def _train_config(args: argparse.Namespace):
    """The run's configuration, and the note to print once the inputs are checked (or None)."""
    from metapl.train.config import (
        apply_overrides,
        first_order_note,
        joined_notes,
        parse_set_options,
        uda_warmup_note,
        warmup_cut_to,
    )
    from metapl.train.presets import load_preset

    cfg = load_preset(args.preset)
    overrides = parse_set_options(args.set or [])
    for key in ("data_dir", "steps", "checkpoint_every", "device", "seed"):
        value = getattr(args, key, None)
        if value is not None:
            if key in overrides:  # --set steps=100 --steps 2 trained 2 steps without a word
                option = f"--{key.replace('_', '-')}"
                raise ConfigError(f"{option} and --set {key}=... both set {key}; give one of them")
            overrides[key] = value
    explicit = [*overrides]  # --set keys and options: each must matter to this run
    earlier_warmup = _earlier_warmup(Path(args.out))
    cut, note = warmup_cut_to(args.steps, cfg, overrides, "train", earlier_warmup)
    overrides.update(cut)
    cfg = apply_overrides(cfg, overrides).validate().check_keys_apply(explicit)
    notes = (uda_warmup_note(cfg, "train"), first_order_note(cfg, "train", explicit))
    return cfg, joined_notes(note, *notes)


def _cmd_train(args: argparse.Namespace) -> None:
    cfg, note = _train_config(args)  # before the engine's imports (torch: seconds), to fail fast
    cpu_threads.check_requested(args.threads)  # before the output folder is made
    check_out_not_in_data(args.out, cfg)
    out = output_folder(args.out, command="train")

    from metapl.distributed import torchrun_world
    from metapl.train.engine import train

    with cpu_threads.cpu_threads(args.threads, follows_load=False):  # see metapl.cpu_threads
        # the note is printed by train() once the data, checkpoint and models are checked: a
        # missing dataset with a --steps that cut the warm-up was the note and the error
        summary = train(cfg, out, show_progress=not args.quiet, note=note)
    if torchrun_world()[0] != 0:
        return  # under torchrun, rank 0 speaks for the run
    row = summary["results"][0]
    parts = []
    if row.get("accuracy") is not None:
        scored_on = "tuning-split" if cfg.tuning else "test"  # tuning=true scores the tuning split
        parts.append(f"{scored_on} accuracy {100 * row['accuracy']:.2f}%")
    # without a test set no accuracy is a held-out one: --set tuning=true holds the tuning split
    # out of training and tests on it
    parts = parts or ["no test set to evaluate (--set tuning=true tests on the tuning split)"]
    # `--steps 10` on a preset that fine-tunes ran 10 + finetune_steps steps: say so
    finetune = f" and {cfg.finetune_steps} fine-tuning steps" if cfg.finetune_steps else ""
    print(f"{cfg.preset}: {', '.join(parts)} after {cfg.steps} steps{finetune}")
    from metapl.train.large_teacher import written_files

    out = Path(args.out)
    written = ["results.json", "curves.png", "metrics.csv", "tb/", "config.json", "checkpoint.pt"]
    # a dataset with class names (own data), ReducedMPL's Figure 10 series
    written += [name for name in ("classes.json", "figure10.json") if (out / name).is_file()]
    written += [path.name for path in written_files(out)]  # a large teacher's distributions
    print(f"wrote {args.out}/{', '.join(written)}")


def _cmd_presets(args: argparse.Namespace) -> None:
    from metapl.train.presets import describe, load_preset, preset_table

    if args.name is not None:  # one preset as a file of its own, to save and edit
        from metapl.tuning.bestfile import render

        cfg = load_preset(args.name)  # an unknown name: one line, with the closest names
        header = [
            f"the preset {args.name}: every key but the machine's (device, data_dir);",
            "`metapl train --preset THIS_FILE.toml --data-dir D` reads it",
        ]
        print(render(cfg, header, {}), end="")
        return
    for name, overrides in preset_table().items():
        print(f"{name:<32} {describe(overrides)}")


def _experiment_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options `metapl digits` and `metapl reduced` share (:func:`_add_experiment_options`,
    --labels-per-class and --set) as fields of their configs."""
    from metapl.experiments.digits import parse_method_overrides

    return {
        "seeds": parse_seeds(args.seeds),
        "labels_per_class": args.labels_per_class,
        "steps": args.steps,
        "device": args.device,
        "overrides": parse_method_overrides(args.set or []),
    }


def _cmd_digits(args: argparse.Namespace) -> None:
    from metapl.experiments.digits import DigitsConfig, run_digits

    cfg = DigitsConfig(methods=parse_names(args.methods), **_experiment_options(args))
    run_digits(cfg, output_folder(args.out, command="digits"), show_progress=not args.quiet)


def _cmd_reduced(args: argparse.Namespace) -> None:
    from metapl.experiments.reduced import ReducedConfig, run_reduced

    students = parse_names(args.methods)
    cfg = ReducedConfig(dataset=args.dataset, students=students, **_experiment_options(args))
    run_reduced(cfg, output_folder(args.out, command="reduced"), show_progress=not args.quiet)


def _cmd_bench(args: argparse.Namespace) -> None:
    from metapl.bench import run_bench
    from metapl.train.config import MAX_BATCH, parse_set_options

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if args.batch_size is not None and 7 * args.batch_size > MAX_BATCH:  # unlabeled batch: 7B
        raise ConfigError(  # 1e12 was an out-of-memory traceback
            f"--batch-size must be at most {MAX_BATCH // 7:,} (the unlabeled batch is 7 x "
            f"--batch-size, at most {MAX_BATCH:,} images), got {args.batch_size:,}"
        )
    if args.repeats < 1:
        raise ConfigError("--repeats must be >= 1")
    run_bench(
        device=args.device,
        batch_size=args.batch_size,
        precision=args.precision,
        memory_format=args.memory_format,
        model=args.model,
        repeats=args.repeats,
        json_path=args.json,
        show_progress=not args.quiet,
        overrides=parse_set_options(args.set or []),
    )
    if args.json:
        print(f"wrote {args.json}")


def _add_experiment_options(p: argparse.ArgumentParser) -> None:
    """The options every multi-seed CPU experiment (digits, reduced) shares."""
    p.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 (default: 0-4)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=(
            "override the presets' steps (a warm-up longer than that is cut to fit; fine-tuning "
            "after them keeps its share, e.g. 300 after 1,500 steps); --set steps=N changes "
            "steps alone"
        ),
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="cpu",
        help="default: cpu (train, tune, bench and predict default to auto)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# One example per command, shown at the end of its --help (tests/test_cli_new_user.py parses each).
EXAMPLES = {
    "twomoons": "metapl twomoons --seeds 0-9 --out runs/twomoons",
    "train": (
        "metapl train --preset digits-uda-mpl --out runs/digits\n"
        "  metapl train --preset cifar10-4k-uda-mpl --data-dir D --out RUN --set precision=bf16"
    ),
    "presets": "metapl presets\n  metapl presets digits-uda-mpl > my_preset.toml",
    "digits": "metapl digits --labels-per-class 5 --seeds 0-4 --out runs/digits_k5",
    "reduced": "metapl reduced --dataset digits --seeds 0-4 --out runs/reduced",
    "bench": "metapl bench --device cpu --json bench_cpu.json",
    "tune": (
        "mkdir -p runs/tune\n"
        "  metapl tune --preset digits-uda-mpl --set tune_per_class=5 --steps 300 --trials 16 \\\n"
        "      --storage sqlite:///runs/tune/digits.db --out runs/tune/digits"
    ),
    "predict": "metapl predict --run runs/digits --top 3 my_images/",
    "export": "metapl export --run runs/digits --format onnx",
    "compare": "metapl compare runs/uda-seed*/ runs/uda-mpl-seed*/ --plot compare.png",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="metapl",
        description=(
            "Meta Pseudo Labels (Pham et al.) with the exact teacher gradient. "
            "The training and experiment subcommands write results.json and plots into --out."
        ),
        epilog="`metapl COMMAND --help` explains a command: its options, defaults and an example.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"metapl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "twomoons",
        help="Figures 1 and 8: supervised, pseudo label and MPL on TwoMoons (CPU, seconds)",
        description=(
            "TwoMoons from scikit-learn: 1,000 + 1,000 points, 3 + 3 labeled. Trains supervised, "
            "pseudo label (hard and soft) and MPL for every seed (seeds batched into one model), "
            "prints mean +- std accuracy on all 2,000 points, and writes DIR/results.json, "
            "DIR/twomoons.png (Figure 1) and DIR/grad_cosine.png (Figure 8)."
        ),
    )
    p.add_argument("--seeds", default="0-9", help="seeds, e.g. 0-9 or 0,3,7 (default: 0-9)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--noise", type=float, default=0.1, help="make_moons noise (default: 0.1)")
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per method (default: 2000)"
    )
    p.add_argument(
        "--estimator",
        choices=("exact", "first_order"),
        default="exact",
        help=(
            "MPL's teacher gradient: exact (Section 3, the default) or first_order (the paper's "
            "practical REINFORCE estimator on sampled hard labels, with a moving-average baseline)"
        ),
    )
    cpu_threads.add_threads_option(p, follows_load=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_twomoons)

    from metapl.train.config import TrainConfig

    # preset is set by --preset, not --set (TrainConfig.ignored_key)
    keys = ", ".join(k for k in TrainConfig.__dataclass_fields__ if k != "preset")
    p = sub.add_parser(
        "train",
        help="train one preset (Table 1 and Table 2 rows, digits) with resumable checkpoints",
        description=(
            "Train a preset. Running the same command with the same --out resumes from "
            "DIR/checkpoint.pt; SIGTERM or SIGUSR1 (a scheduler's time limit) saves a checkpoint "
            "of the step in progress first, then stops (exit code 128 + the signal); Ctrl-C "
            "stops at once, and the rerun resumes from the last checkpoint (every "
            "--checkpoint-every steps). DIR "
            "receives config.json (the resolved configuration), "
            "metrics.csv, tb/ (TensorBoard), checkpoint.pt (and checkpoint.prev.pt, the one "
            "before it), results.json, curves.png (losses, accuracies and learning rates over "
            "steps) and, for a dataset with class names, classes.json. Model selection never "
            "uses the test set: the reported model is the last one. On several GPUs, start "
            "the same command under torchrun, one process per GPU (`torchrun --nproc_per_node "
            "N -m metapl train ...`; docs/multi-gpu.md): every rank trains on its slice of each "
            "batch and rank 0 writes DIR."
        ),
        epilog=f"config keys for --set: {keys}",
    )
    p.add_argument("--preset", required=True, help="a name from `metapl presets`, or a .toml file")
    p.add_argument("--out", required=True, help="run folder (created; reused to resume)")
    p.add_argument(
        "--data-dir",
        help="folder with the dataset files, or your own data's .npz file (not needed for digits)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help=(
            "override the preset's number of steps (a warm-up longer than that is cut to fit); "
            "a preset's fine-tuning steps (finetune_steps) still follow: --set finetune_steps=0 "
            "skips them"
        ),
    )
    p.add_argument(
        "--checkpoint-every", type=int, help="steps between checkpoints (default: the preset's)"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto")
    cpu_threads.add_threads_option(p, follows_load=False)
    p.add_argument(
        "--seed", type=int, help="seed of the run (and of the digits split; default: the preset's)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config key (repeatable: the last of a key wins); unknown keys are "
        "errors",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "presets",
        help="list the presets: Table 1 x Table 3, Table 2, digits, your own images",
        description=(
            "Lists every preset `metapl train --preset` and `metapl tune --preset` take, with its "
            "method, model, steps, batch size and learning rates: Table 1's rows x Table 3's "
            "columns (cifar10-4k, svhn-1k, imagenet-10pct, and imagenet-{20,40,80}pct for Figure "
            "7), Table 2's (*-full-*), digits and your own images (folder-*). With a NAME, prints "
            "that preset as a preset file (every key): save it, edit it, and give its path to "
            "--preset."
        ),
    )
    p.add_argument(
        "name",
        nargs="?",
        metavar="NAME",
        help="print this preset as a TOML preset file instead of the list",
    )
    p.set_defaults(func=_cmd_presets)

    from metapl.experiments.digits import DEFAULT_METHODS, METHODS

    p = sub.add_parser(
        "digits",
        help="real images on CPU: Table 1's methods and LabelSpreading on sklearn digits",
        description=(
            "scikit-learn's 8x8 digits: for each seed, 497 test images (stratified), K labeled per "
            "class, the rest unlabeled. Trains supervised, UDA and UDA+MPL (or any of Table 1's "
            "rows, --methods) with the digits-* presets and fits LabelSpreading on the same split; "
            "prints each +MPL row against its baseline seed by seed; writes DIR/results.json, "
            "DIR/figure9.png (training accuracy on the labeled data, its series in figure9.json; "
            "when supervised and uda_mpl both run) and one run folder per method and seed."
        ),
    )
    p.add_argument("--labels-per-class", type=int, default=5, help="K (default: 5)")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=(
            f"comma-separated, from {', '.join(METHODS)} (Table 1's rows and scikit-learn's "
            f"LabelSpreading; default: {','.join(DEFAULT_METHODS)}, about 6 minutes on 2 cores)"
        ),
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="[METHOD:]KEY=VALUE",
        help=(
            "override a preset key for every trained method, or for one with a METHOD: prefix "
            "(e.g. --set uda_mpl:teacher_lr=0.1); the keys of `metapl train --set` but seed, "
            "labels_per_class and method (--seeds, --labels-per-class, --methods) and dataset; "
            "repeatable: a METHOD: key beats a plain one, else the last of a key wins"
        ),
    )
    _add_experiment_options(p)
    p.set_defaults(func=_cmd_digits)

    p = sub.add_parser(
        "reduced",
        help="Section 4.2 on CPU: supervised, NoisyStudent and ReducedMPL students on digits",
        description=(
            "Per seed: trains a large teacher on the labeled digits, then a supervised student, a "
            "NoisyStudent and a ReducedMPL student (the reduced MLP teacher calibrates the large "
            "teacher's precomputed distributions). Writes DIR/results.json, DIR/figure10.png "
            "(when reduced_mpl runs) and one run folder per stage and seed. "
            "For CIFAR-10/SVHN/ImageNet, use the *-full-* presets of `metapl train`."
        ),
    )
    p.add_argument(
        "--dataset", default="digits", help="default: digits (the only one that runs on CPU)"
    )
    p.add_argument("--labels-per-class", type=int, default=None, help="default: the preset's 30")
    p.add_argument(
        "--methods",
        default="supervised,noisy_student,reduced_mpl",
        help=(
            "comma-separated students to train, from supervised, noisy_student, reduced_mpl "
            "(default: all three; the large teachers always train)"
        ),
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="[STAGE:]KEY=VALUE",
        help=(
            "override a preset key for every stage, or for one with a STAGE: prefix from "
            "large_teacher, supervised, noisy_student, reduced_mpl (e.g. --set "
            "reduced_mpl:teacher_lr=0.001); the keys of `metapl train --set` but seed, method and "
            "dataset (--seeds, --methods, --dataset) and large_teacher (each seed's students get "
            "the one trained here); repeatable: a "
            "STAGE: key beats a plain one, else the last of a key wins"
        ),
    )
    _add_experiment_options(p)
    p.set_defaults(func=_cmd_reduced)

    p = sub.add_parser(
        "bench",
        help="time and measure each kind of step (supervised, UDA, first-order, exact, ...)",
        description=(
            "Median milliseconds (after warm-up) and peak memory (GPU: the allocator's peak; CPU: "
            "the live tensors', counted in a step of each kind built again) of: the student's "
            "supervised "
            "step, the teacher's UDA step, the first-order and the exact UDA+MPL steps (the exact "
            "one twice: J by the tangent tape, as training runs use, and by forward-mode AD, the "
            "library's default), the same exact step by double backward, and a whole training "
            "step with per-image RandAugment and data loading; then the exact gradient against "
            "float64 (cosine). Synthetic CIFAR-shaped data; labeled batch B, unlabeled 7B."
        ),
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="labeled batch B (default: 128 on CUDA, 4 on CPU)",
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="default: fp32")
    p.add_argument(
        "--memory-format",
        choices=("auto", "channels_last", "contiguous"),
        default="auto",
        help="layout of models and batches (default auto: channels_last on CUDA, contiguous on CPU)",
    )
    p.add_argument("--model", default="wrn28_2", help="a registry name (default: wrn28_2)")
    p.add_argument(
        "--repeats",
        type=int,
        default=20,
        help="timed runs, the median reported (default: 20; WRN-28-2 on 2 CPU cores: ~3 min)",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help=(
            "a config key of `metapl train --set` for every kind of step that reads it "
            "(repeatable), e.g. --set compile=true: the models whose step allows it compiled, "
            "as `metapl train` compiles them (CPU peak memory is then not counted); not the "
            "keys the bench sets itself (model, device, batch_size, precision, memory_format, "
            "method, mpl_estimator, mpl_jvp, mpl_labeled_cuda_graph) or the data's and the "
            "run's length"
        ),
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)

    # Commands whose options live next to their code: each module has add_arguments(parser)
    # and run(args); importing them is cheap (heavy imports happen inside run).
    from metapl import compare, export, predict, tune

    commands = (("tune", tune), ("predict", predict), ("export", export), ("compare", compare))
    for name, module in commands:
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    for name, p in sub.choices.items():
        p.formatter_class = _Formatter
        p.epilog = "\n\n".join(filter(None, [p.epilog, f"example:\n  {EXAMPLES[name]}"]))
        p.set_defaults(parser=p)  # for parse(): an unknown option is reported by its command
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an option that the command does not know is reported by
    that command's parser, with the closest option it has."""
    _ARGV[:] = sys.argv[1:] if argv is None else argv
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = args.parser._option_string_actions  # argparse has no public list of them
        hints = [did_you_mean(u.split("=", 1)[0], known) for u in unknown if u.startswith("-")]
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}{''.join(hints)}")
    return args


def _check_not_under_torchrun(command: str) -> None:
    """Only `metapl train` trains data-parallel. Any other command started by torchrun ran whole
    in every process: `metapl tune` hung after its trials (its runs formed no process group
    together), `digits` and `reduced` raced for their run folders."""
    # torchrun's environment read here, not by metapl.distributed, whose torch import would come
    # before the options' checks (seconds; tests/test_interrupts.py)
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:  # `metapl train` names it; the other commands do not read it
        return
    if command != "train" and world_size > 1:
        hint = (
            "start it once per GPU, with the same --storage (docs/tuning.md)"
            if command == "tune"
            else "start it as one process"
        )
        raise ConfigError(
            f"runs under torchrun with {world_size} processes, but only `metapl train` trains "
            f"data-parallel; {hint}"
        )


def main(argv: list[str] | None = None) -> int:
    # Before any tensor: a step's freed activations are reused, not faulted in again (1-3 ms of
    # a digits step); the forked worker processes of `metapl digits` and `reduced` inherit it.
    keep_freed_memory()
    try:
        args = parse(build_parser(), argv)
    except KeyboardInterrupt:
        print("metapl: interrupted", file=sys.stderr)
        return 130
    try:
        _check_not_under_torchrun(args.command)
        with one_line_warnings(args.command):  # as its errors: metapl's own, one line each
            args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except MetaplError as err:
        close_bars()
        print(f"metapl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:  # SIGTERM during training: saved, then stopped (before Ctrl-C's)
        close_bars()
        print(f"metapl {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt as stop:  # Ctrl-C; in training's steps, where a rerun resumes
        close_bars()
        said = str(stop) if isinstance(stop, Interrupted) else "interrupted"
        print(f"metapl {args.command}: {said}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`metapl presets | head`): stop quietly, as Unix tools do. Point
        # stdout at devnull so that Python's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the signal
    except OSError as err:
        # A path the user gave with a name over the file system's limit (255 bytes a component,
        # 4096 in all): every check of a path (exists, is_dir) raised it, a traceback in each
        # command. Any other OSError is still a bug, with its traceback.
        if err.errno != errno.ENAMETOOLONG:
            raise
        close_bars()
        name = os.fsdecode(err.filename or "")
        shown = name if len(name) <= 120 else f"{name[:100]}...({len(name)} characters)"
        print(
            f"metapl {args.command}: error: {shown}: the name is too long for the file "
            "system (at most 255 bytes a folder or file name); choose a shorter path",
            file=sys.stderr,
        )
        return 2
    finally:
        release_output_folders()
    return 0


if __name__ == "__main__":
    sys.exit(main())
