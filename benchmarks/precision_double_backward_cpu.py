"""How far double backward in float32 is from the float64 reference, next to metapl's exact step in
float32: the comparison behind docs/results.md "Precision" ("double backward in float32 lands at
the same distance"), which benchmarks/precision_cpu.py does not make.

The problem of benchmarks/precision_cpu.py (WRN-28-2 teacher and student at initialization,
dropout off in both, a Nesterov student, uniform random images with random labels, n labeled + 7n
unlabeled). For each batch size and seed, the teacher's MPL gradient (supervised term off) three
ways on the same weights and batch, on the CPU:

- the float64 reference: metapl's exact step in float64 (`metapl.mpl.numerics`, as in
  precision_cpu.py);
- metapl's exact step in float32 (precision_cpu.py's fp32 row, recomputed);
- double backward in float32 (`metapl.mpl.double_backward_teacher_gradient`: a second-order graph
  through a differentiable copy of the optimizer's update).

Saved: each float32 gradient's relative error ||g - g64|| / ||g64|| and cosine to the reference.

python benchmarks/precision_double_backward_cpu.py --json \\
    benchmarks/results/precision_double_backward_cpu.json
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from machine import save  # noqa: E402
from precision_cpu import nesterov, precision_parser, problems  # noqa: E402

from metapl.mpl import double_backward_teacher_gradient  # noqa: E402
from metapl.mpl.numerics import mpl_teacher_gradient  # noqa: E402


def without_dropout(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy in ``dtype`` with every dropout off, in train mode (as `metapl.mpl.numerics`)."""
    clone = copy.deepcopy(model).to(dtype=dtype)
    for module in clone.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return clone.train()


def double_backward_fp32(teacher: nn.Module, student: nn.Module, batch) -> torch.Tensor:
    t = without_dropout(teacher, torch.float32)
    s = without_dropout(student, torch.float32)
    x_l, y_l, x_u = batch
    grads = double_backward_teacher_gradient(t, s, nesterov(list(s.parameters())), x_l, y_l, x_u)
    return torch.cat([g.detach().double().reshape(-1) for g in grads])


def against(g: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    return {
        "relative_error": float((g - reference).norm() / reference.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(g, reference, dim=0)),
    }


def main() -> None:
    args = precision_parser(__doc__).parse_args()
    cpu = torch.device("cpu")
    results = []
    for n, seed, teacher, student, batch in problems(args):
        reference = mpl_teacher_gradient(teacher, student, nesterov, batch, cpu, torch.float64)
        exact = mpl_teacher_gradient(teacher, student, nesterov, batch, cpu, torch.float32)
        double = double_backward_fp32(teacher, student, batch)
        row = {
            "labeled": n,
            "unlabeled": 7 * n,
            "seed": seed,
            "exact_fp32": against(exact, reference),
            "double_backward_fp32": against(double, reference),
            "double_backward_vs_exact_fp32": against(double, exact),
            "reference_norm": float(reference.norm()),
        }
        results.append(row)
        print(
            f"{n}+{7 * n} seed {seed}: relative error from float64: exact fp32 "
            f"{row['exact_fp32']['relative_error']:.4f}, double backward fp32 "
            f"{row['double_backward_fp32']['relative_error']:.4f}",
            flush=True,
        )
    summary = {}
    for n in sorted({r["labeled"] for r in results}):
        rows = [r for r in results if r["labeled"] == n]
        summary[str(n)] = {
            way: {
                "mean_relative_error": statistics.fmean(r[way]["relative_error"] for r in rows),
                "max_relative_error": max(r[way]["relative_error"] for r in rows),
            }
            for way in ("exact_fp32", "double_backward_fp32")
        }
    save(args.json, {"summary": summary, "results": results})


if __name__ == "__main__":
    main()
