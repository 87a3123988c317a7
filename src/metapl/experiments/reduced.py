"""Section 4.2 on a CPU: ReducedMPL vs NoisyStudent vs supervised on scikit-learn's digits.

Per seed, through the same engine and presets as the full datasets (``digits-reduced-*``):

1. the large teacher (a 3x wider CNN with RandAugment) trains on the labeled digits;
2. each student run precomputes the large teacher's distributions, keeps the top-K unlabeled
   images per class, drops the large teacher, and trains: supervised (labeled only), NoisyStudent
   (labeled + the large teacher's distributions under noise), ReducedMPL (the reduced MLP teacher
   calibrates those distributions by MPL + the supervised signal).

Writes ``results.json`` (records with "method", "seed", "accuracy") and ``figure10.png``.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from metapl.errors import ConfigError
from metapl.experiments.digits import summarize
from metapl.report import print_accuracy_table, write_json_atomic

STUDENTS = ("supervised", "noisy_student", "reduced_mpl")


@dataclass
class ReducedConfig:
    dataset: str = "digits"
    seeds: list[int] = field(default_factory=lambda: list(range(5)))
    steps: int | None = None
    labels_per_class: int | None = None
    device: str = "cpu"
    workers: int = 0

    def validate(self) -> ReducedConfig:
        if self.dataset != "digits":
            raise ConfigError(
                f"`metapl reduced --dataset {self.dataset}`: only digits runs end to end here; for "
                "CIFAR-10/SVHN/ImageNet use `metapl train --preset <dataset>-full-large-teacher`, "
                "then the -supervised/-noisy-student/-reduced-mpl presets with "
                "--set large_teacher=RUN_DIR"
            )
        return self


def _overrides(cfg: ReducedConfig, seed: int) -> dict:
    out = {"seed": seed, "device": cfg.device}
    if cfg.steps is not None:
        out["steps"] = cfg.steps
        out["warmup_steps"] = min(100, cfg.steps)
    if cfg.labels_per_class is not None:
        out["labels_per_class"] = cfg.labels_per_class
    return out


def _run(job: tuple[str, int, ReducedConfig, str]) -> dict:
    method, seed, cfg, out = job
    import torch

    torch.set_num_threads(1)
    from metapl.train.config import apply_overrides
    from metapl.train.engine import train
    from metapl.train.presets import load_preset

    overrides = _overrides(cfg, seed)
    if method != "large_teacher":
        overrides["large_teacher"] = str(Path(out) / "large_teacher" / f"seed{seed}")
    preset = f"digits-reduced-{method.replace('_', '-')}"
    run_cfg = apply_overrides(load_preset(preset), overrides)
    summary = train(run_cfg, Path(out) / method / f"seed{seed}", show_progress=False)
    record = summary["results"][0]
    return {
        "method": method,
        "seed": seed,
        "accuracy": record["accuracy"],
        "steps": record["steps"],
    }


def run_reduced(cfg: ReducedConfig, out: Path, show_progress: bool = True) -> dict:
    import os

    from tqdm import tqdm

    from metapl.experiments.figure10 import plot_figure10

    cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    workers = min(cfg.workers or os.cpu_count() or 1, len(cfg.seeds) * len(STUDENTS))
    records = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        stage = [("large_teacher", s, cfg, str(out)) for s in cfg.seeds]
        for record in tqdm(
            pool.map(_run, stage),
            total=len(stage),
            disable=not show_progress,
            desc="large teachers",
            unit="run",
        ):
            records.append(record)
        jobs = [(m, s, cfg, str(out)) for m in reversed(STUDENTS) for s in cfg.seeds]
        for record in tqdm(
            pool.map(_run, jobs),
            total=len(jobs),
            disable=not show_progress,
            desc="students",
            unit="run",
        ):
            records.append(record)
    order = ("large_teacher", *STUDENTS)
    records.sort(key=lambda r: (order.index(r["method"]), r["seed"]))
    summary = summarize(records)
    payload = {"config": asdict(cfg), "results": records, "summary": summary}
    write_json_atomic(out / "results.json", payload)
    plot_figure10(
        out / "reduced_mpl" / f"seed{cfg.seeds[0]}" / "figure10.json", out / "figure10.png"
    )
    print_accuracy_table(
        f"digits ReducedMPL (Section 4.2), seeds {cfg.seeds}: test accuracy (497 images)", summary
    )
    return payload
