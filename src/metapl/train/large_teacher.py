"""ReducedMPL's first stages (Figure 5), run before the student exists.

1. Load the large teacher: the student of a finished ``metapl train`` run folder.
2. Precompute its class distributions for the labeled and unlabeled images, to memory-mapped files
   in the run folder (resumable, stamped with fingerprints of the model and the data).
3. Keep the top-K unlabeled images per class by its confidence.

The large teacher is dropped before the student is built, so the two are never in memory together:
that is the point of ReducedMPL.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import numpy as np
import torch

from metapl.data.splits import SSLSplit
from metapl.errors import CheckpointError, ConfigError
from metapl.models import create_model
from metapl.reduced.precompute import precompute_distributions
from metapl.reduced.select import top_k_per_class
from metapl.train.checkpoint import load_checkpoint
from metapl.train.config import TrainConfig, apply_overrides


def load_large_teacher(run_dir: Path, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The trained model of a ``metapl train`` run: its EMA if it kept one, else its student."""
    config_path, ckpt_path = run_dir / "config.json", run_dir / "checkpoint.pt"
    if not config_path.is_file() or not ckpt_path.is_file():
        raise ConfigError(
            f"large_teacher={run_dir} is not a finished `metapl train` run folder "
            "(it needs config.json and checkpoint.pt); train the large teacher first"
        )
    cfg = apply_overrides(TrainConfig(), json.loads(config_path.read_text()))
    state = load_checkpoint(ckpt_path)
    if state["step"] < cfg.steps + cfg.finetune_steps:
        raise CheckpointError(
            f"the large teacher's run {run_dir} stopped at step {state['step']} of "
            f"{cfg.steps + cfg.finetune_steps}; finish it (run its command again) first"
        )
    model = create_model(cfg.model, num_classes, dropout=cfg.student_dropout)
    model.load_state_dict(state["ema"] if state.get("ema") else state["student"])
    return model.to(device).eval()


def prepare_large_teacher_data(
    cfg: TrainConfig, split: SSLSplit, out_dir: Path, device: torch.device, progress: bool = False
) -> tuple[SSLSplit, tuple[np.ndarray, np.ndarray]]:
    """The split with the selected unlabeled images, and the large teacher's distributions of the
    labeled and of the selected unlabeled images (row-aligned)."""
    teacher = load_large_teacher(Path(cfg.large_teacher), split.num_classes, device)
    probs = []
    for name, images in (("labeled", split.x_labeled), ("unlabeled", split.x_unlabeled)):
        path = out_dir / f"large_teacher_{name}.npy"
        probs.append(
            precompute_distributions(
                teacher,
                images,
                path,
                batch_size=cfg.eval_batch_size,
                device=device,
                progress=progress,
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
        split = dataclasses.replace(split, x_unlabeled=x_u)
        probs_u = probs_u[keep]
    return split, (probs_l, probs_u)
