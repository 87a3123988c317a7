"""What R, MPL's objective, says about two labelings of TwoMoons: the true one and a wrong one.

MPL's teacher is trained to lower R, the labeled loss of a student that learns only from the
teacher's targets. Figure 1 needs R to prefer the teacher that labels the unlabeled points along
the moons over one that draws a straight boundary through the 6 labeled points. Here a student of
the `metapl twomoons` kind (MLP 2-64-64-2, SGD + Nesterov 0.9, lr 0.05, unlabeled batch 256, 2,000
steps) learns each of three fixed labelings of the 1,994 unlabeled points, as MPL's student does
(no labeled term), and we measure R (its CE on the 6 labeled points) and its accuracy on all
2,000 points:

- "true": every unlabeled point's true class (a perfect teacher);
- "supervised": the hard labels of the supervised model of `metapl twomoons` (trained on the 6
  points, the wrong classifier of Figure 1's left panel);
- "nearest": the class of the nearest labeled point (a 1-nearest-neighbour classifier of the 6
  points).

python results/twomoons/analysis/labelings.py --seeds 0-9 --json results/twomoons/analysis/labelings.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from metapl.cli import parse_seeds
from metapl.data.twomoons import make_twomoons
from metapl.experiments.stacked import StackedMLP
from metapl.experiments.twomoons import (
    TwoMoonsConfig,
    accuracy,
    stack_data,
    train_supervised,
)
from metapl.losses import batch_mean, hard_cross_entropy


def learn_labeling(cfg, data, labels, gen) -> StackedMLP:
    """A student that learns ``labels`` of the unlabeled points alone, as MPL's student learns
    its teacher's targets."""
    model = StackedMLP(len(cfg.seeds), 2, 2, cfg.hidden, cfg.depth, 0.0, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    members, n, _ = data.x_unlabeled.shape
    for _ in range(cfg.steps):
        idx = torch.randint(0, n, (members, cfg.unlabeled_batch), generator=gen)
        x_u = data.x_unlabeled.gather(1, idx[..., None].expand(-1, -1, 2))
        loss = batch_mean(hard_cross_entropy(model(x_u), labels.gather(1, idx)), 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def labeled_loss(model: StackedMLP, data) -> torch.Tensor:
    model.eval()
    return (
        F.cross_entropy(
            model(data.x_labeled).flatten(0, 1), data.y_labeled.flatten(), reduction="none"
        )
        .view(data.y_labeled.shape)
        .mean(1)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0-9")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    cfg = TwoMoonsConfig(seeds=parse_seeds(args.seeds))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = stack_data(cfg.seeds, cfg.noise)
    # the true classes of the unlabeled points, in stack_data's order
    true_u = torch.stack(
        [
            torch.from_numpy(d.y[d.unlabeled])
            for d in (make_twomoons(s, cfg.noise) for s in cfg.seeds)
        ]
    )
    supervised, _ = train_supervised(cfg, data, gen)
    supervised.eval()
    with torch.no_grad():
        supervised_u = supervised(data.x_unlabeled).argmax(-1)
    nearest = torch.cdist(data.x_unlabeled, data.x_labeled).argmin(-1)
    nearest_u = data.y_labeled.gather(1, nearest)
    out = {"seeds": cfg.seeds, "labelings": {}}
    for name, labels in (("true", true_u), ("supervised", supervised_u), ("nearest", nearest_u)):
        student = learn_labeling(cfg, data, labels, gen)
        r = labeled_loss(student, data)
        acc = accuracy(student, data.x, data.y)
        agree = (labels == true_u).float().mean(1)
        out["labelings"][name] = {
            "labeling_accuracy": agree.tolist(),
            "R": r.tolist(),
            "student_accuracy": acc.tolist(),
        }
        print(
            f"{name:<11} labeling {100 * agree.mean():5.1f}% correct | student: R "
            f"{r.mean():.1e} (max {r.max():.1e}), accuracy {100 * acc.mean():5.1f} "
            f"+- {100 * acc.std(unbiased=False):4.1f}%"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
