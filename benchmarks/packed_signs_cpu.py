"""Milliseconds of the exact step with WRN's last activation kept as packed signs (what the tape
does since session 37) against keeping its input (the rule before), on CPU, in one process.

WRN-28-2 teacher and student, exact UDA-free MPL step (J by the tangent tape), SGD with Nesterov
momentum, bf16 autocast and channels_last as on the GPU; the two variants are two step objects on
copies of the same models, timed in interleaved rounds (median of --repeats after 2 warm-up
rounds each). The packing costs one comparison and one packing in the record pass and one
unpacking in the tangent pass, on the last activation only:
python benchmarks/packed_signs_cpu.py --json benchmarks/results/packed_signs_cpu.json
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, positive_int, save  # noqa: E402

from metapl import MetaPseudoLabels  # noqa: E402
from metapl.models import create_model  # noqa: E402
from metapl.mpl import tangent_rules  # noqa: E402

CHOOSE = tangent_rules.TangentRules.choose_sign_sources


def read_the_input(self, all_needs: list[list]) -> None:
    """The rule before session 37: the activation's input where no other rule keeps input or
    output."""
    CHOOSE(self, all_needs)
    for _, x, _, source in self._sign_sources:
        if source[0] == ("signs", x):
            source[0] = x
    self.signs.clear()


def make_step(models, batch, choose):
    teacher, student = (copy.deepcopy(m) for m in models)
    mpl = MetaPseudoLabels(
        teacher,
        student,
        torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9, nesterov=True),
        torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True),
        jvp="tape",
        autocast_dtype=torch.bfloat16,
    )
    tangent_rules.TangentRules.choose_sign_sources = choose  # read when the graph is traced
    mpl.step(*batch)
    tangent_rules.TangentRules.choose_sign_sources = CHOOSE
    assert mpl.last_jvp_path == "tape"
    return lambda: mpl.step(*batch)


def main() -> None:
    parser = parser_with_json(__doc__)
    parser.add_argument(
        "--labeled",
        type=int,
        default=8,
        help="labeled batch; the unlabeled one is 7x (default: 8)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=10,
        help="timed rounds, each one step of both variants, after 2 warm-up rounds; the "
        "median is kept (default: 10)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    models = [
        create_model("wrn28_2", 10, dropout=0.2).to(memory_format=torch.channels_last)
        for _ in range(2)
    ]
    g = torch.Generator().manual_seed(1)
    n_l, n_u = args.labeled, 7 * args.labeled
    batch = (
        torch.randn(n_l, 3, 32, 32, generator=g).to(memory_format=torch.channels_last),
        torch.randint(0, 10, (n_l,), generator=g),
        torch.randn(n_u, 3, 32, 32, generator=g).to(memory_format=torch.channels_last),
    )
    steps = {
        "packed_signs": make_step(models, batch, CHOOSE),
        "input_kept": make_step(models, batch, read_the_input),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(2 + args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_ >= 2:
                times[name].append(1000 * (time.perf_counter() - start))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, ms in medians.items():
        print(f"{name:<14} {ms:8.1f} ms")
    ratio = medians["packed_signs"] / medians["input_kept"]
    print(f"packed_signs / input_kept {ratio:.3f}")
    save(
        args.json,
        {
            "setup": {
                "model": "wrn28_2",
                "batch_labeled": n_l,
                "batch_unlabeled": n_u,
                "precision": "bf16 autocast",
                "memory_format": "channels_last",
                "repeats": args.repeats,
                "timing": "interleaved rounds, median",
            },
            "results": [{"name": n, "ms": medians[n], "ms_all": times[n]} for n in steps],
            "packed_signs_over_input_kept": ratio,
        },
    )


if __name__ == "__main__":
    main()
