"""Milliseconds on CPU: the exact step's JVP by forward-mode AD vs the tangent tape (jvp=).

Two students: WRN-28-2 on 28 unlabeled 3x32x32 images, and the small conv net of step_cpu.py on 96
unlabeled 3x16x16 images (fp32, train mode, dropout on). For each: the student's forward, its
forward+backward (the update pass), the tape's record pass + backward (the same update pass, keeping
activations), today's forward-AD JVP (a second forward on dual tensors, RNG replayed), the tape's
tangent pass alone, and whole exact MPL steps (teacher = student architecture; labeled 4 /
unlabeled 28 for WRN-28-2, 32 / 96 for the small net) with jvp="forward_ad" and jvp="tape".
Median of --repeats after warm-up:
python benchmarks/jvp_cpu.py --json /tmp/jvp_cpu.json
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).parent))
from machine import parser_with_json, positive_int, save  # noqa: E402
from step_cpu import small_convnet  # noqa: E402

from metapl import MetaPseudoLabels  # noqa: E402
from metapl.models import create_model  # noqa: E402
from metapl.mpl.replay import RngState, buffer_copies, replayed_rng  # noqa: E402
from metapl.mpl.tangent import TangentTape  # noqa: E402


def timed(fns: dict, repeats: int, warmup: int) -> list[tuple[str, list[float]]]:
    """Milliseconds per call of each function, interleaved round by round (on a shared machine a
    load change then hits every variant alike instead of one block of repeats), the order rotated
    by one each round so that no variant always runs first (after another's caches)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(repeats):
        shift = r % len(order)
        for name, fn in order[shift:] + order[:shift]:
            start = time.perf_counter()
            fn()
            out[name].append(1000 * (time.perf_counter() - start))
    return list(out.items())


def models(name: str):
    if name == "wrn28_2":
        return lambda: create_model("wrn28_2", 10, dropout=0.3), 4, 28, 32
    return lambda: small_convnet(10), 32, 96, 16


def student_rows(name: str, repeats: int, warmup: int) -> list[tuple[str, list[float]]]:
    make, _, n_u, size = models(name)
    torch.manual_seed(0)
    student = make().train()
    x = torch.randn(n_u, 3, size, size)
    names = [n for n, _ in student.named_parameters()]
    params = [p for _, p in student.named_parameters()]
    theta = [p.detach().clone() for p in params]
    tangents = {n: 1e-3 * torch.randn_like(p) for n, p in zip(names, params)}
    tape = TangentTape(student, params)
    by_id = {id(p): th for p, th in zip(params, theta)}
    tw = {id(p): tangents[n] for p, n in zip(params, names)}
    rng = RngState(torch.device("cpu"))
    record = tape.record(x)

    def forward():
        student(x)

    def forward_backward():
        student.zero_grad(set_to_none=True)
        student(x).logsumexp(-1).mean().backward()

    def record_backward():
        student.zero_grad(set_to_none=True)
        tape.record(x).logits.logsumexp(-1).mean().backward()

    def forward_ad_jvp():  # what the exact step did before the tape
        buffers = buffer_copies(student)
        with fwad.dual_level(), replayed_rng(rng):
            weights = {n: fwad.make_dual(p, tangents[n]) for n, p in zip(names, theta)}
            out = functional_call(student, {**buffers, **weights}, (x,))
            return fwad.unpack_dual(F.log_softmax(out, dim=-1)).tangent

    def tangent_pass():
        with torch.no_grad():
            tape.tangent(record, by_id, tw)

    fns = {
        "student_forward": forward,
        "student_forward_backward": forward_backward,
        "tape_record_forward_backward": record_backward,
        "forward_ad_jvp": forward_ad_jvp,
        "tape_tangent_pass": tangent_pass,
    }
    return timed(fns, repeats, warmup)


def step_rows(name: str, repeats: int, warmup: int) -> list[tuple[str, list[float]]]:
    make, n_l, n_u, size = models(name)
    torch.manual_seed(0)
    x_l, y_l = torch.randn(n_l, 3, size, size), torch.randint(0, 10, (n_l,))
    x_u = torch.randn(n_u, 3, size, size)

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)

    steps = {}
    for jvp in ("forward_ad", "tape"):
        torch.manual_seed(1)
        t, s = make(), make()
        steps[jvp] = MetaPseudoLabels(t, s, sgd(t), sgd(s), jvp=jvp)
    rows = timed(
        {f"exact_mpl_step_{j}": lambda m=m: m.step(x_l, y_l, x_u) for j, m in steps.items()},
        repeats,
        warmup,
    )
    for jvp, mpl in steps.items():
        assert mpl.last_jvp_path == jvp, (mpl.last_jvp_path, mpl.jvp_fallback_reason)
    return rows


def main() -> None:
    ap = parser_with_json(__doc__)
    ap.add_argument(
        "--repeats",
        type=positive_int,
        default=7,
        help="timed rounds, each calling every variant once; the median is kept, at least 5 "
        "(default: 7)",
    )
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    ap.add_argument(
        "--models",
        nargs="+",
        default=["wrn28_2", "small_convnet"],
        choices=("wrn28_2", "small_convnet"),
        help="students: wrn28_2 and/or small_convnet (default: wrn28_2 small_convnet)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be >= 5 (the median of fewer is noise)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        for what, ms in student_rows(name, args.repeats, args.warmup) + step_rows(
            name, args.repeats, args.warmup
        ):
            med = statistics.median(ms)
            rows.append({"model": name, "name": what, "ms": med, "ms_all": ms})
            print(f"{name:<14} {what:<30} {med:9.2f} ms", flush=True)
        got = {r["name"]: r["ms"] for r in rows if r["model"] == name}
        print(
            f"{name:<14} JVP forward_ad / tangent pass: "
            f"{got['forward_ad_jvp'] / got['tape_tangent_pass']:.2f}x; "
            f"step forward_ad / tape: "
            f"{got['exact_mpl_step_forward_ad'] / got['exact_mpl_step_tape']:.2f}x",
            flush=True,
        )
    result = {
        "setup": (
            "fp32, train mode, dropout 0.3; wrn28_2: unlabeled 28 x 3x32x32 (labeled 4); "
            "small_convnet (step_cpu.py): unlabeled 96 x 3x16x16 (labeled 32); "
            f"median of {args.repeats} after {args.warmup} warm-up"
        ),
        "results": rows,
    }
    save(args.json, result)


if __name__ == "__main__":
    main()
