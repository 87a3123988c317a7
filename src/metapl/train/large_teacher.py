"""ReducedMPL's first stages (Figure 5), run before the student exists.

1. Load the large teacher: the model a finished ``metapl train`` run folder reports (its EMA if it
   kept one, else its student).
2. Precompute its class distributions for the labeled and unlabeled images, to memory-mapped files
   in the run folder (resumable, stamped with fingerprints of the model and the data).
3. Keep the top-K unlabeled images per class by its confidence.

The large teacher is dropped before the student is built, so the two are never in memory together:
that is the point of ReducedMPL.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import numpy as np
import torch

from metapl.data.arrays import to_tensor_nchw
from metapl.data.splits import SSLSplit
from metapl.errors import ConfigError
from metapl.reduced.precompute import (
    ONE_PROCESS,
    Ranks,
    precompute_distributions,
    sidecar_path,
)
from metapl.reduced.select import top_k_per_class
from metapl.train.config import TrainConfig
from metapl.train.run_model import load_run_model


def load_large_teacher(run_dir: Path, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The trained model of a finished ``metapl train`` run (its EMA if it kept one, else its
    student), checked to predict ``num_classes`` classes; see :func:`load_run_model`."""
    return load_run_model(
        run_dir, device, num_classes=num_classes, name=f"large_teacher={run_dir}"
    ).model


def check_large_teacher(run_dir: Path, split: SSLSplit, device: torch.device) -> None:
    """Before anything is written: the large teacher loads (see :func:`load_large_teacher`) and
    takes this run's images, in one forward on two labeled images, as the precompute feeds them.
    A teacher trained on other images (RGB for the grayscale digits) failed inside the precompute
    with torch's traceback."""
    teacher = load_large_teacher(run_dir, split.num_classes, device)
    images = np.asarray(split.x_labeled[np.arange(min(2, len(split.y_labeled)))])
    try:
        with torch.no_grad():
            teacher(to_tensor_nchw(images).to(device))
    except (RuntimeError, ValueError, TypeError) as exc:
        _, h, w, c = images.shape
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"large_teacher={run_dir} cannot take this run's images ({c} channel"
            f"{'s' if c != 1 else ''}, {h}x{w}): {first}; give the run folder of a large teacher "
            "trained on this dataset"
        ) from None


def distributions_file(out_dir: Path, images: str) -> Path:
    """Where a student run keeps the large teacher's distributions of its ``images`` ("labeled"
    or "unlabeled"); its sidecar is :func:`~metapl.reduced.precompute.sidecar_path` of it."""
    return out_dir / f"large_teacher_{images}.npy"


def written_files(out_dir: Path) -> list[Path]:
    """The large teacher's files a student run wrote in ``out_dir``, each with its sidecar."""
    files = [distributions_file(out_dir, images) for images in ("labeled", "unlabeled")]
    return [f for path in files for f in (path, sidecar_path(path)) if f.is_file()]


def prepare_large_teacher_data(
    cfg: TrainConfig,
    split: SSLSplit,
    out_dir: Path,
    device: torch.device,
    progress: bool = False,
    ranks: Ranks = ONE_PROCESS,
) -> tuple[SSLSplit, tuple[np.ndarray, np.ndarray]]:
    """The split with the selected unlabeled images, and the large teacher's distributions of the
    labeled and of the selected unlabeled images (row-aligned). Under torchrun every rank calls
    this: each classifies its share of the images and rank 0 writes the files (``ranks``)."""
    assert cfg.large_teacher  # validate() refuses a large-teacher method without one
    teacher = load_large_teacher(Path(cfg.large_teacher), split.num_classes, device)
    probs = []
    for name, images in (("labeled", split.x_labeled), ("unlabeled", split.x_unlabeled)):
        path = distributions_file(out_dir, name)
        probs.append(
            precompute_distributions(
                teacher,
                images,
                path,
                batch_size=cfg.eval_batch_size,
                device=device,
                progress=progress,
                ranks=ranks,
            )
        )
    del teacher  # never in memory with the student
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    probs_l, probs_u = (np.asarray(p, dtype=np.float32) for p in probs)
    if cfg.unlabeled_per_class > 0:
        keep = top_k_per_class(probs_u, cfg.unlabeled_per_class)
        x_u = split.x_unlabeled
        x_u = x_u.subset(keep) if hasattr(x_u, "subset") else x_u[keep]
        split = dataclasses.replace(split, x_unlabeled=x_u, tune_in_unlabeled=None)
        probs_u = probs_u[keep]
    return split, (probs_l, probs_u)
