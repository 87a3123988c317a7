"""Where does the exact MPL signal point on TwoMoons? A measurement behind the failed Figure 1.

For a student at weights theta, the exact teacher gradient on its target q_i for unlabeled point x_i
is dR/dq_ic = (lr / N) v . grad_theta log p_c(x_i), with v = grad R (the student's labeled loss)
after the student's step (Eq. 3, plain SGD; DESIGN.md s2). With two classes the teacher is pushed
toward class 1 at x_i iff s_i = -v . grad_theta [log p_1(x_i) - log p_0(x_i)] > 0: the student's
tangent kernel between x_i and the labeled points, weighted by their residuals. We take v at theta
itself (the small-learning-rate limit) and compute s for all unlabeled points with one JVP.

Students: the MLP of `metapl twomoons` (2-64-64-2, ReLU), trained with SGD + Nesterov 0.9, lr 0.05
either on the 6 labeled points (the supervised baseline) or by MPL itself (metapl's exact step, a
teacher of the same shape, targets at temperature 0.5, unlabeled batch 256: the `metapl twomoons`
setting); s is measured at several steps of each student's own training. We report,
over the unlabeled points, how often sign(s) names (a) the true class, (b) the class of the
nearest labeled point (Euclidean), (c) the student's own prediction; and (a) on the points where
the true class and the nearest labeled point disagree (where following the moons matters).

python results/twomoons/analysis/mpl_signal.py --seeds 0-9 --json results/twomoons/analysis/mpl_signal.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from metapl import MetaPseudoLabels
from metapl.data.twomoons import make_twomoons

CHECKPOINTS = (0, 20, 100, 500, 2000)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    )


def signal(model: nn.Module, x_l, y_l, x_u) -> torch.Tensor:
    """s_i > 0: the exact MPL gradient pushes the teacher's target at x_u[i] toward class 1."""
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(x_l), y_l)
    v = torch.autograd.grad(loss, list(params.values()))
    detached = {k: p.detach() for k, p in params.items()}

    def margin(weights):
        log_p = F.log_softmax(functional_call(model, weights, (x_u,)), dim=-1)
        return log_p[:, 1] - log_p[:, 0]

    # s = -v . grad margin = the JVP of the margin along -v
    _, s = jvp(margin, (detached,), ({k: -g for k, g in zip(params, v)},))
    return s


def one_seed(seed: int, noise: float, student_kind: str) -> list[dict]:
    data = make_twomoons(seed, noise)
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    lab, unl = torch.from_numpy(data.labeled), torch.from_numpy(data.unlabeled)
    x_l, y_l, x_u, y_u = x[lab], y[lab], x[unl], y[unl]
    nearest = y_l[torch.cdist(x_u, x_l).argmin(dim=1)]
    differ = nearest != y_u
    torch.manual_seed(seed)
    model = mlp()
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)  # noqa: E731
    opt = sgd(model)
    if student_kind == "mpl":
        teacher = mlp()
        mpl = MetaPseudoLabels(teacher, model, sgd(teacher), opt, temperature=0.5)
        gen = torch.Generator().manual_seed(seed)
    rows = []
    for step in range(max(CHECKPOINTS) + 1):
        if step in CHECKPOINTS:
            s = signal(model, x_l, y_l, x_u)
            toward = (s > 0).long()
            with torch.no_grad():
                pred = model(x_u).argmax(-1)
            rows.append(
                {
                    "student": student_kind,
                    "seed": seed,
                    "step": step,
                    "true": float((toward == y_u).float().mean()),
                    "nearest_labeled": float((toward == nearest).float().mean()),
                    "student_prediction": float((toward == pred).float().mean()),
                    "true_where_nearest_is_wrong": float((toward == y_u)[differ].float().mean()),
                    "points_where_nearest_is_wrong": int(differ.sum()),
                    "student_accuracy": float((pred == y_u).float().mean()),
                }
            )
        if student_kind == "mpl":
            batch = x_u[torch.randint(len(x_u), (256,), generator=gen)]
            mpl.step(x_l, y_l, batch)
        else:
            opt.zero_grad()
            F.cross_entropy(model(x_l), y_l).backward()
            opt.step()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0-9")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    a, b = (int(v) for v in args.seeds.split("-"))
    keys = ["true", "nearest_labeled", "student_prediction", "true_where_nearest_is_wrong"]
    keys.append("student_accuracy")
    rows, summary = [], []
    for kind in ("supervised", "mpl"):
        here_rows = [r for seed in range(a, b + 1) for r in one_seed(seed, args.noise, kind)]
        rows += here_rows
        print(f"student trained by {kind}")
        print(f"{'step':>5} " + " ".join(f"{k:>28}" for k in keys))
        for step in CHECKPOINTS:
            here = [r for r in here_rows if r["step"] == step]
            stats = {
                k: (float(np.mean([r[k] for r in here])), float(np.std([r[k] for r in here])))
                for k in keys
            }
            summary.append(
                {
                    "student": kind,
                    "step": step,
                    **{k: {"mean": m, "std": s} for k, (m, s) in stats.items()},
                }
            )
            print(
                f"{step:5d} "
                + " ".join(f"{100 * m:20.1f} +- {100 * s:4.1f}" for m, s in stats.values())
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"seeds": args.seeds, "noise": args.noise, "summary": summary, "rows": rows},
                indent=1,
            )
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
