"""Plots for TwoMoons: Figure 1 (decision regions) and Figure 8 (gradient cosine)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.func import functional_call  # noqa: E402

from metapl.atomic import replace_atomically  # noqa: E402

PANELS = (
    ("supervised", "Supervised"),
    ("pseudo_label_hard", "Pseudo label (hard)"),
    ("mpl", "MPL"),
)
COLORS = ("#d62728", "#2ca02c")


def _save(fig, path: Path) -> None:
    """``fig`` as a PNG, whole or not at all (an earlier plot survives a crash), then closed."""
    try:
        replace_atomically(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


@torch.no_grad()
def _member_probs(model, member: int, grid: np.ndarray) -> np.ndarray:
    """P(class 1) of one member of a stacked model on grid points: that member's weights alone (the
    whole stack on the 60,000-point grid took about 30 MB per seed: 13 GB for 400 seeds)."""
    model.eval()
    weights = {name: p[member : member + 1] for name, p in model.named_parameters()}
    x = torch.from_numpy(grid).float()[None]
    return torch.softmax(functional_call(model, weights, (x,)), -1)[0, :, 1].numpy()


def plot_decision_regions(result: dict, cfg, path: Path, member: int = 0) -> None:
    """Figure 1: the three methods' classifiers for the first seed; stars are the labeled points."""
    data, models = result["data"], result["models"]
    x, y = data.x[member].numpy(), data.y[member].numpy()
    xl, yl = data.x_labeled[member].numpy(), data.y_labeled[member].numpy()
    lo, hi = x.min(0) - 0.5, x.max(0) + 0.5
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 200))
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    panels = [(k, t) for k, t in PANELS if k in models]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    acc_by = {(r["method"], r["seed"]): r["accuracy"] for r in result["records"]}
    for ax, (key, title) in zip(axes[0], panels):
        p = _member_probs(models[key], member, grid).reshape(gx.shape)
        ax.contourf(gx, gy, p > 0.5, levels=[-0.5, 0.5, 1.5], colors=["#f4b6b6", "#b8e0b8"])
        for c in (0, 1):
            ax.scatter(*x[y == c].T, s=3, c=COLORS[c], alpha=0.5, linewidths=0)
            ax.scatter(*xl[yl == c].T, s=180, c=COLORS[c], marker="*", edgecolors="k")
        ax.set_title(f"{title}: {100 * acc_by[(key, cfg.seeds[member])]:.1f}%")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"TwoMoons, seed {cfg.seeds[member]}, 3 + 3 labeled, noise {cfg.noise}")
    fig.tight_layout()
    _save(fig, path)


def plot_gradient_cosine(cosines: dict, path: Path) -> None:
    """Figure 8: mean over seeds (band: +- one std) of cos(train gradient, held-out gradient)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, series in cosines.items():
        per_seed = np.asarray(series["per_seed"])
        mean, std = per_seed.mean(0), per_seed.std(0)
        steps = np.asarray(series["steps"])
        ax.plot(steps, mean, label=method.upper() if method == "mpl" else method.capitalize())
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("cosine(train grad, held-out grad)")
    ax.set_title("Student gradient alignment on TwoMoons")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
