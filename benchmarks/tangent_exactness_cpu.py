"""How far the tangent tape's J is from forward-mode AD's J, in float64: the number behind
docs/results.md "The tangent tape" (tests/test_tangent_replay.py only bounds it, by 1e-10).

For every registry model the tests cover (tests/test_tangent_replay.REGISTRY_CASES: the registry
models that run on a CPU at a test size, in train mode with dropout and random BatchNorm
statistics), the test's own comparison (tape_vs_native): record the update pass, backward a random
linear loss, move the live parameters as optimizer.step() would, then compute J at the recorded
theta by the tape and by forward AD (``functional_call`` on dual tensors, the RNG replayed). Saved:
the relative difference ||J_tape - J_forward_ad|| / ||J_forward_ad|| per model.

python benchmarks/tangent_exactness_cpu.py --json benchmarks/results/tangent_exactness_cpu.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from machine import parser_with_json, save, spread  # noqa: E402
from mpl_helpers import rel_err  # noqa: E402
from test_tangent_replay import DT, REGISTRY_CASES, tape_vs_native, with_random_bn  # noqa: E402

from metapl.models import create_model  # noqa: E402


def main() -> None:
    args = parser_with_json(__doc__).parse_args()
    torch.set_num_threads(1)  # the tests' setting: one thread sums in a fixed order
    results = []
    for name, (options, shape, _) in REGISTRY_CASES.items():
        # exactly the test's setup (test_record_is_the_native_pass_and_tape_jvp_is_forward_ad)
        torch.manual_seed(0)
        model = with_random_bn(create_model(name, 10, **options)).to(DT).train()
        x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(2))
        *_, j_tape, j_ref = tape_vs_native(model, x)
        row = {
            "model": name,
            "options": options,
            "input_shape": list(shape),
            "relative_difference": rel_err(j_tape, j_ref),
            "max_abs_difference": float((j_tape - j_ref).abs().max()),
            "j_norm": float(j_ref.norm()),
        }
        results.append(row)
        print(f"{name:16s} relative {row['relative_difference']:.1e}", flush=True)
    rel = [r["relative_difference"] for r in results]
    summary = spread(rel)
    print(f"relative difference: {summary['min']:.1e} .. {summary['max']:.1e} over {len(rel)}")
    save(args.json, {"dtype": "float64", "summary": summary, "results": results})


if __name__ == "__main__":
    main()
