"""How far the exact teacher gradient is from its two oracles, in float64: the numbers behind
docs/results.md "Exactness of the teacher gradient" (the tests only bound them).

For every student optimizer the tests cover (tests/mpl_helpers.STUDENT_OPTIMIZERS), on both test
problems (an MLP with BatchNorm1d + dropout, a conv net with BatchNorm2d + dropout) and both ways of
computing J (forward AD, the tangent tape), two consecutive MPL steps; before each, the relative
difference of metapl's teacher gradient from

- double backward (`metapl.mpl.double_backward_teacher_gradient`, a second-order graph through a
  differentiable copy of the optimizer's update), and
- central finite differences of R(theta_{t+1}(Psi)) along 3 random directions, where theta_{t+1}
  comes from the REAL `optimizer.step()` of a copy of the student (tests/mpl_helpers.mpl_objective).

python benchmarks/exactness_cpu.py --json benchmarks/results/exactness_cpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from machine import parser_with_json, save, spread  # noqa: E402
from mpl_helpers import (  # noqa: E402
    STUDENT_OPTIMIZERS,
    central_differences,
    flat,
    make_problem,
    mpl_objective,
    rel_err,
)

from metapl import MetaPseudoLabels  # noqa: E402
from metapl.mpl import double_backward_teacher_gradient  # noqa: E402

FD_EPS = 1e-6
TEMPERATURE = {"mlp": 0.7, "conv": 1.0}


def two_steps(opt_name: str, kind: str, jvp: str) -> list[dict]:
    """Relative differences from both oracles at each of two consecutive steps."""
    factory = STUDENT_OPTIMIZERS[opt_name]
    teacher, student, x_l, y_l, x_u = make_problem(kind, seed=3)
    s_opt = factory(student.parameters())
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.5)
    temperature = TEMPERATURE[kind]
    mpl = MetaPseudoLabels(
        teacher, student, t_opt, s_opt, temperature=temperature, supervised_weight=0.0, jvp=jvp
    )
    gen = torch.Generator().manual_seed(11)
    rows = []
    for step in range(2):
        seed = 1234 + step
        x_u = torch.randn(
            x_u.shape, generator=torch.Generator().manual_seed(500 + step), dtype=x_u.dtype
        )
        torch.manual_seed(seed)
        oracle = flat(
            double_backward_teacher_gradient(
                teacher, student, s_opt, x_l, y_l, x_u, temperature=temperature
            )
        )
        t_params = {n: p.detach().clone() for n, p in teacher.named_parameters()}

        def objective(shift, t_params=t_params, seed=seed, x_u=x_u):
            params = {n: p + shift[n] for n, p in t_params.items()}
            return mpl_objective(
                teacher, params, student, s_opt, factory, x_l, y_l, x_u,
                seed=seed, temperature=temperature,
            )  # fmt: skip

        directions = [
            {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in t_params.items()}
            for _ in range(3)
        ]
        fd = central_differences(objective, directions, FD_EPS)
        torch.manual_seed(seed)
        mpl.step(x_l, y_l, x_u)
        exact = flat(p.grad for p in teacher.parameters())
        along = torch.stack([exact @ flat(d.values()) for d in directions])
        finite = bool(torch.isfinite(oracle).all())
        rows.append(
            {
                "step": step,
                # sqrt'(0) makes the oracle NaN where a student gradient is exactly 0
                "vs_double_backward": rel_err(exact, oracle) if finite else None,
                "vs_finite_differences": rel_err(along, fd),
            }
        )
    return rows


def main() -> None:
    args = parser_with_json(__doc__).parse_args()
    torch.set_num_threads(1)  # the tests' setting: one thread sums in a fixed order
    results = []
    for opt_name in STUDENT_OPTIMIZERS:
        for kind in ("mlp", "conv"):
            for jvp in ("forward_ad", "tape"):
                for row in two_steps(opt_name, kind, jvp):
                    results.append({"optimizer": opt_name, "model": kind, "jvp": jvp, **row})
    db = [r["vs_double_backward"] for r in results if r["vs_double_backward"] is not None]
    fd = [r["vs_finite_differences"] for r in results]
    summary = {
        "vs_double_backward": spread(db),
        "vs_finite_differences": spread(fd),
        "oracle_not_finite": len(results) - len(db),
    }
    for name, s in summary.items():
        if isinstance(s, dict):
            print(f"{name}: {s['min']:.1e} .. {s['max']:.1e} over {s['n']} comparisons")
    print(f"double backward not finite (a student gradient is exactly 0): {len(results) - len(db)}")
    save(args.json, {"dtype": "float64", "summary": summary, "results": results})


if __name__ == "__main__":
    main()
