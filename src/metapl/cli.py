"""The `metapl` command line. Each subcommand parses its options and calls one experiment function.

User mistakes (:class:`metapl.errors.MetaplError`) become one line on stderr and exit code 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from metapl.errors import ConfigError, MetaplError


def parse_seeds(text: str) -> list[int]:
    """'0-9' -> 0..9, '1,3,5' -> [1, 3, 5], '0-2,7' -> [0, 1, 2, 7]."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError(part)
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise ConfigError(
            f"--seeds {text!r}: expected a range like 0-9 or a list like 0,3,7"
        ) from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct non-negative integers")
    return seeds


def _cmd_twomoons(args: argparse.Namespace) -> None:
    from metapl.experiments.twomoons import TwoMoonsConfig, run, save, summarize

    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps must be >= 1")
    if not 0.0 <= args.noise <= 1.0:
        raise ConfigError(f"--noise must be in [0, 1], got {args.noise}")
    cfg = TwoMoonsConfig(seeds=parse_seeds(args.seeds), noise=args.noise)
    if args.steps is not None:
        cfg.steps = args.steps
    start = time.perf_counter()
    result = run(cfg, show_progress=not args.quiet)
    save(result, cfg, Path(args.out))
    elapsed = time.perf_counter() - start
    print(
        f"TwoMoons, noise {cfg.noise}, {len(cfg.seeds)} seeds ({args.seeds}), accuracy on all 2,000 points:"
    )
    for method, (mean, std, n) in summarize(result["records"]).items():
        print(f"  {method:<18} {100 * mean:6.2f} +- {100 * std:5.2f} %  (n={n})")
    print(f"wrote {args.out}/results.json, twomoons.png, grad_cosine.png in {elapsed:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metapl",
        description=(
            "Meta Pseudo Labels (Pham et al.) with the exact teacher gradient. "
            "Every subcommand writes results.json and plots into --out."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "twomoons",
        help="Figure 1 and 8: supervised, pseudo label and MPL on TwoMoons (CPU, seconds)",
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
    p.add_argument("--steps", type=int, default=None, help="training steps per method")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_twomoons)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MetaplError as err:
        print(f"metapl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"metapl {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
