"""Milliseconds per MPL step on CPU: exact (JVP) vs first-order vs double backward (whole steps).

The model is a small conv net with BatchNorm and dropout on 3x16x16 inputs (labeled batch 32,
unlabeled batch 96) so the comparison runs in a minute on 2 cores. Median of --repeats after warm-up:
python benchmarks/step_cpu.py --json benchmarks/results/step_cpu.json
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, positive_int, save  # noqa: E402

from metapl import MetaPseudoLabels  # noqa: E402
from metapl.mpl import double_backward_teacher_gradient  # noqa: E402


def small_convnet(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, stride=2, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(64, classes),
    )


def timed(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - start))
    return out


def main() -> None:
    ap = parser_with_json(__doc__)
    ap.add_argument(
        "--repeats",
        type=positive_int,
        default=20,
        help="timed calls of each step, after 3 warm-up calls; the median is kept (default: 20)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    x_l, y_l = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    x_u = torch.randn(96, 3, 16, 16)

    def make(estimator: str):
        t, s = small_convnet(), small_convnet()
        sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)  # noqa: E731
        return MetaPseudoLabels(t, s, sgd(t), sgd(s), estimator=estimator)

    exact, first, double = make("exact"), make("first_order"), make("double_backward")
    student = small_convnet()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True)

    def supervised_step():
        opt.zero_grad()
        nn.functional.cross_entropy(student(x_u), torch.randint(0, 10, (96,))).backward()
        opt.step()

    ref_t, ref_s = copy.deepcopy(exact.teacher), copy.deepcopy(exact.student)
    ref_opt = torch.optim.SGD(ref_s.parameters(), lr=0.05, momentum=0.9, nesterov=True)

    def double_backward_step():
        double_backward_teacher_gradient(ref_t, ref_s, ref_opt, x_l, y_l, x_u)

    rows = []
    for name, fn in [
        ("student_supervised_step", supervised_step),
        ("first_order_mpl_step", lambda: first.step(x_l, y_l, x_u)),
        ("exact_mpl_step", lambda: exact.step(x_l, y_l, x_u)),
        ("double_backward_mpl_step", lambda: double.step(x_l, y_l, x_u)),
        ("double_backward_teacher_gradient_only", double_backward_step),
    ]:
        ms = timed(fn, args.repeats)
        rows.append({"name": name, "ms": statistics.median(ms), "ms_all": ms})
        print(f"{name:<40} {statistics.median(ms):8.2f} ms")
    save(
        args.json,
        {"setup": "small convnet, 3x16x16, labeled 32, unlabeled 96, fp32", "results": rows},
    )


if __name__ == "__main__":
    main()
