"""What the precision policy costs the exact teacher gradient on CPU: the numbers behind
docs/results.md "Precision".

WRN-28-2 teacher and student at initialization (dropout off in both copies), a Nesterov student
(lr 0.3, momentum 0.9, weight decay 5e-4), uniform random 3x32x32 images with random labels, n
labeled + 7n unlabeled. The teacher's MPL gradient in float32 and under bf16 autocast is compared
with a float64 CPU reference on the same weights and batch (`metapl.mpl.numerics`), for several
batch sizes and seeds:

python benchmarks/precision_cpu.py --json benchmarks/results/precision_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, save  # noqa: E402

from metapl.models import create_model  # noqa: E402
from metapl.mpl.numerics import agreement_with_float64  # noqa: E402

POLICIES = {"fp32": None, "bf16": torch.bfloat16}


def nesterov(params):
    return torch.optim.SGD(params, lr=0.3, momentum=0.9, nesterov=True, weight_decay=5e-4)


def problem(n_labeled: int, seed: int):
    torch.manual_seed(seed)
    teacher = create_model("wrn28_2", 10, dropout=0.5)
    student = create_model("wrn28_2", 10, dropout=0.35)
    g = torch.Generator().manual_seed(seed + 1)
    x_l = torch.rand(n_labeled, 3, 32, 32, generator=g)
    y_l = torch.randint(0, 10, (n_labeled,), generator=g)
    x_u = torch.rand(7 * n_labeled, 3, 32, 32, generator=g)
    return teacher, student, (x_l, y_l, x_u)


def precision_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of the precision benchmarks: ``--json``, ``--labeled``, ``--seeds``."""
    parser = parser_with_json(doc)
    parser.add_argument("--labeled", default="2,4,8,16", help="labeled batch sizes (unlabeled: 7x)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per batch size")
    return parser


def problems(args: argparse.Namespace) -> Iterator[tuple]:
    """``(n, seed, teacher, student, batch)``: the :func:`problem` of each labeled batch size n of
    ``--labeled`` and each seed of ``--seeds``, in that order."""
    for n in (int(v) for v in args.labeled.split(",")):
        for seed in range(args.seeds):
            yield n, seed, *problem(n, seed)


def main() -> None:
    args = precision_parser(__doc__).parse_args()
    cpu = torch.device("cpu")
    results = []
    for n, seed, teacher, student, batch in problems(args):
        for policy, autocast_dtype in POLICIES.items():
            agreement = agreement_with_float64(
                teacher, student, nesterov, batch, cpu, autocast_dtype=autocast_dtype
            )
            results.append(
                {"policy": policy, "labeled": n, "unlabeled": 7 * n, "seed": seed, **agreement}
            )
            print(f"{policy} {n}+{7 * n} seed {seed}: cosine {agreement['cosine']:.5f}")
    summary = {}
    for policy in POLICIES:
        for n in sorted({r["labeled"] for r in results}):
            cosines = [r["cosine"] for r in results if r["policy"] == policy and r["labeled"] == n]
            summary[f"{policy}_{n}"] = {
                "mean_cosine": statistics.fmean(cosines),
                "min_cosine": min(cosines),
                "max_cosine": max(cosines),
            }
    save(args.json, {"summary": summary, "results": results})


if __name__ == "__main__":
    main()
