"""Peak memory of ReducedMPL vs plain supervised training of the same student (issue: <= 1.15x),
and full MPL with the large teacher in memory as the contrast (Section 3.2's motivation).

Each configuration runs in a fresh process; on CUDA the peak is torch.cuda.max_memory_allocated,
on CPU the increase of the process's peak resident memory (ru_maxrss) over its level after imports
and data creation. Student: EfficientNet-B0 at 32x32 trained with RMSprop; large teacher:
WRN-28-8; reduced teacher: the 5-layer MLP.
python benchmarks/reduced_memory.py --json benchmarks/results/reduced_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import device_or_exit, fail, positive_int, save  # noqa: E402

CONFIGS = ("supervised_student", "reduced_mpl", "full_mpl_large_teacher")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure(config: str, device: str, batch: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from metapl import MetaPseudoLabels
    from metapl.models import create_model

    dev = torch.device(device)
    torch.manual_seed(0)
    x_l = torch.rand(batch, 3, 32, 32, device=dev)
    y_l = torch.randint(0, 10, (batch,), device=dev)
    x_u = torch.rand(3 * batch, 3, 32, 32, device=dev)
    p_l = F.softmax(torch.randn(batch, 10, device=dev), -1)
    p_u = F.softmax(torch.randn(3 * batch, 10, device=dev), -1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_rss_mib()
    student = create_model("efficientnet_b0", 10).to(dev)
    s_opt = torch.optim.RMSprop(student.parameters(), lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9)
    if config == "supervised_student":

        def step():
            loss = F.cross_entropy(student(torch.cat([x_l, x_u])), torch.cat([y_l, p_u.argmax(-1)]))
            s_opt.zero_grad()
            loss.backward()
            s_opt.step()
    else:
        if config == "reduced_mpl":
            teacher = create_model("reduced_teacher", 10).to(dev)
            inputs = {"teacher_x_labeled": p_l, "teacher_x_unlabeled": p_u}
        else:
            teacher = create_model("wrn28_8", 10).to(dev)
            inputs = {}
        t_opt = torch.optim.Adam(teacher.parameters(), lr=1e-4)
        mpl = MetaPseudoLabels(teacher, student, t_opt, s_opt)

        def step():
            mpl.step(x_l, y_l, x_u, **inputs)

    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mib() - base
    return {"name": config, "peak_mib": peak, "batch_labeled": batch, "batch_unlabeled": 3 * batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument(
        "--batch", type=int, default=32, help="labeled batch; the unlabeled one is 3x (default: 32)"
    )
    ap.add_argument(
        "--steps", type=positive_int, default=2, help="training steps measured (default: 2)"
    )
    ap.add_argument("--json", help="write {machine, device, results: [...]} here")
    ap.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one configuration
        print(json.dumps(measure(args.one, args.device, args.batch, args.steps)))
        return
    device_or_exit(args.device, __file__)

    rows = []
    for config in CONFIGS:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                config,
                "--device",
                args.device,
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:  # the child's own last line, not CalledProcessError's
            lines = child.stderr.strip().splitlines() or ["(nothing on stderr)"]
            fail(__file__, f"{config} failed (exit {child.returncode}): {lines[-1]}")
        out = child.stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{config:<26} {rows[-1]['peak_mib']:9.1f} MiB")
    sup = rows[0]["peak_mib"]
    for row in rows:
        row["ratio_to_supervised"] = row["peak_mib"] / sup
    print(
        f"ReducedMPL / supervised = {rows[1]['ratio_to_supervised']:.3f} (goal <= 1.15); "
        f"full MPL / supervised = {rows[2]['ratio_to_supervised']:.3f}"
    )
    if args.json:
        save(args.json, {"device": args.device, "results": rows})


if __name__ == "__main__":
    main()
