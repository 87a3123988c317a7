"""TwoMoons with the first-order (REINFORCE) estimator: the settings tried on the tuning seeds
100-109 (never the reported seeds). Prints one line per setting, as the other tuning logs do.

    python results/twomoons/tuning_first_order.py > results/twomoons/tuning_first_order_seeds100-109.log

`--seeds 0-9 --default-only` runs the default setting alone on other seeds, with supervised and MPL
only as here (a different random stream from `metapl twomoons`, which trains the pseudo-label
baselines in between):

    python results/twomoons/tuning_first_order.py --seeds 0-9 --default-only \
        > results/twomoons/first_order_seeds0-9/supervised_and_mpl_only.log
"""

import argparse
import json
import time

from metapl.cli import parse_seeds
from metapl.experiments.twomoons import TwoMoonsConfig, run, summarize

SETTINGS = [
    {"baseline_decay": None},
    {},  # the defaults: baseline 0.99, temperature 0.5, teacher lr 0.05, 2,000 steps
    {"temperature": 1.0},
    {"steps": 6000},
    {"teacher_lr": 0.2},
    {"teacher_lr": 0.2, "steps": 6000},
]

parser = argparse.ArgumentParser()
parser.add_argument("--seeds", default="100-109")
parser.add_argument("--default-only", action="store_true")
args = parser.parse_args()
for setting in [{}] if args.default_only else SETTINGS:
    cfg = TwoMoonsConfig(
        seeds=parse_seeds(args.seeds),
        methods=("supervised", "mpl"),
        estimator="first_order",
        **setting,
    )
    start = time.perf_counter()
    result = run(cfg)
    summary = {
        m: f"{100 * v[0]:.1f}±{100 * v[1]:.1f}" for m, v in summarize(result["records"]).items()
    }
    per_seed = [round(r["accuracy"], 3) for r in result["records"] if r["method"] == "mpl"]
    print(json.dumps(setting), f"{time.perf_counter() - start:.1f}s", summary, flush=True)
    print(" mpl per seed", per_seed, flush=True)
