"""Meta Pseudo Labels with your own models and optimizers: the library step in a plain loop.

The teacher and the student are two small CNNs, and the data are scikit-learn's 8x8 digits with 10
labels per class (the rest unlabeled, 30% held out for testing). Any pair of ``nn.Module`` that
return logits works the same way, with your own ``torch.optim`` optimizers (SGD, RMSprop, Adam or
AdamW for the student: the exact teacher gradient needs their update rule). For comparison, the same
student network is also trained on the labeled images alone.

Models of several inputs work too: pass each batch as a tuple of tensors (the step calls
``model(*x)``: token ids and an attention mask, say) or a dict (``model(**x)``), every tensor
holding the same examples along the first dimension; nothing else changes.

``--consistency`` adds an extra teacher loss through ``teacher_extra_loss``: the teacher's
prediction on a noisy view of each unlabeled image is pulled towards its prediction on the clean
image (UDA's shape; metapl's own UDA is :class:`metapl.methods.uda.UDALoss`).

    python examples/mpl_on_your_models.py [--steps 1000] [--seed 0] [--unlabeled-batch 128] [--consistency]

28 s on 2 CPU cores with the defaults. It shows the API; it is not a tuned experiment, and its accuracies move from step to step and
from seed to seed (metapl's tuned digits runs are `metapl digits` and `metapl reduced`, with their
numbers in docs/results.md).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from metapl import MetaPseudoLabels, TeacherLogits


def digits_split(seed: int, labels_per_class: int = 10):
    """(x_labeled, y_labeled, x_unlabeled, x_test, y_test) as float tensors in [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x.reshape(-1, 1, 8, 8) / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    train, test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=seed)
    rng = np.random.RandomState(seed)
    labeled = np.concatenate(
        [rng.choice(train[y[train] == c], labels_per_class, replace=False) for c in range(10)]
    )
    unlabeled = np.setdiff1d(train, labeled)
    return x[labeled], y[labeled], x[unlabeled], x[test], y[test]


def small_cnn() -> nn.Module:
    """BatchNorm and dropout are fine: the exact step replays the dropout mask and keeps BatchNorm's
    running statistics updated once per step."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(32, 10),
    )


def noisy(x: torch.Tensor) -> torch.Tensor:
    """A cheap augmentation: a random shift of up to one pixel and Gaussian noise."""
    dx, dy = np.random.randint(-1, 2, size=2)
    return torch.roll(x, shifts=(int(dx), int(dy)), dims=(2, 3)) + 0.1 * torch.randn_like(x)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return 100 * correct


def consistency_loss(logits: TeacherLogits) -> torch.Tensor:
    """KL(teacher(clean) || teacher(noisy)): the clean view is the target, so it is detached."""
    clean = F.softmax(logits.extra[0].detach(), dim=-1)
    return F.kl_div(F.log_softmax(logits.unlabeled, dim=-1), clean, reduction="batchmean")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unlabeled-batch", type=int, default=128)
    parser.add_argument("--consistency", action="store_true", help="add a UDA-like teacher loss")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    x_l, y_l, x_u, x_test, y_test = digits_split(args.seed)

    teacher, student, baseline = small_cnn(), small_cnn(), small_cnn()
    mpl = MetaPseudoLabels(
        teacher,
        student,
        sgd(teacher),
        sgd(student),
        temperature=0.7,  # the student learns softmax(teacher logits / 0.7) on unlabeled images
        teacher_extra_loss=consistency_loss if args.consistency else None,
    )
    baseline_opt = sgd(baseline)

    for step in range(1, args.steps + 1):
        batch = x_u[torch.randint(len(x_u), (args.unlabeled_batch,))]
        extra = [batch] if args.consistency else []  # the clean view, for consistency_loss
        # One MPL step: the student learns the teacher's soft targets on the noisy view; the
        # teacher learns its labels plus the exact gradient of the student's labeled loss after
        # that update (plus the extra loss, if any).
        metrics = mpl.step(noisy(x_l), y_l, noisy(batch), teacher_extra_inputs=extra)

        baseline_opt.zero_grad()
        F.cross_entropy(baseline(noisy(x_l)), y_l).backward()
        baseline_opt.step()

        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(
                f"step {step:5d}  teacher loss {metrics['teacher_loss'].item():.3f}  "
                f"student loss on targets {metrics['student_unlabeled'].item():.3f}  "
                f"test accuracy: student {accuracy(student, x_test, y_test):.1f}%  "
                f"teacher {accuracy(teacher, x_test, y_test):.1f}%  "
                f"labels only {accuracy(baseline, x_test, y_test):.1f}%"
            )
    return {
        "student": accuracy(student, x_test, y_test),
        "teacher": accuracy(teacher, x_test, y_test),
        "labels_only": accuracy(baseline, x_test, y_test),
    }


if __name__ == "__main__":
    main()
