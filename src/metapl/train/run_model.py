"""The trained model of a `metapl train` run folder, and the images it expects.

One loader for every consumer of a finished run: ReducedMPL's large teacher, `metapl predict` and
`metapl export`. They must agree on which weights a run "is" (its EMA if it kept one, else its
student: the model whose test accuracy ``results.json`` reports), on when a run is finished, and on
the input the model takes, so all three go through :func:`load_run_model` and :func:`input_spec`.

Preprocessing itself is not repeated here: arrays become model input through
:func:`metapl.train.data.model_input` (training, evaluation, predict), and :func:`pixels_to_input` is
its tensor-only twin for exported models, which cannot call numpy. The tests pin the two equal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from metapl import report
from metapl.errors import CheckpointError, ConfigError, DataError, MetaplError
from metapl.models import create_model
from metapl.train.checkpoint import (
    FINGERPRINT_KEY,
    FORMAT_VERSION,
    check_resumable,
    config_fingerprint,
    load_checkpoint,
)
from metapl.train.config import TrainConfig, apply_overrides

CLASSES_FILE = "classes.json"
"""Optional: the run's class names, a JSON list indexed by class (written for image-folder runs)."""


@dataclass(frozen=True)
class InputSpec:
    """What the model was evaluated on: uint8 ``[N, resolution, resolution, channels]`` pixels."""

    resolution: int
    channels: int  # 1: grayscale (digits), 3: RGB

    def describe(self) -> str:
        kind = "grayscale" if self.channels == 1 else "RGB"
        return f"uint8 [N, {self.resolution}, {self.resolution}, {self.channels}] ({kind}, 0..255)"


def input_spec(cfg: TrainConfig) -> InputSpec:
    """The resolution and channels of the images a run of ``cfg`` trained and evaluated on.

    This mirrors what the readers deliver (see :func:`metapl.train.engine.load_data`): digits are
    8x8 grayscale whatever ``image_size`` says, CIFAR-10 and SVHN 32x32 RGB arrays; ImageNet and
    your own data (``folder``, ``npz``) are RGB decoded or fitted at ``image_size``. A new reader
    that breaks these rules must add its own here.
    """
    if cfg.dataset == "digits":
        return InputSpec(8, 1)
    if cfg.dataset.startswith(("cifar10", "svhn")):
        return InputSpec(32, 3)
    return InputSpec(cfg.image_size, 3)  # imagenet-*, folder, npz


def pixels_to_input(pixels: Tensor) -> Tensor:
    """uint8 ``[N, H, W, C]`` tensor -> float32 ``[N, C, H, W]`` in ``[0, 1]``.

    The tensor form of :func:`metapl.data.arrays.to_tensor_nchw` (no mean/std normalization: the
    models learn from raw ``[0, 1]`` pixels), traceable into TorchScript and ONNX.
    """
    return pixels.permute(0, 3, 1, 2).float() / 255.0


class Classifier(nn.Module):
    """A trained model as users call it: uint8 images in, class probabilities out.

    ``forward(pixels)`` takes uint8 ``[N, H, W, C]`` (see :class:`InputSpec`) and returns float32
    ``[N, num_classes]`` softmax probabilities. ``probabilities(x)`` skips the pixel conversion, for
    callers that already hold the model input (``metapl predict`` builds it with the training code).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def probabilities(self, x: Tensor) -> Tensor:
        return torch.softmax(self.model(x).float(), dim=-1)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.probabilities(pixels_to_input(pixels))


@dataclass
class RunModel:
    """A run's reported model (eval mode) with what callers need to use it."""

    model: nn.Module
    config: TrainConfig
    num_classes: int
    weights: str  # "ema" or "student"
    step: int
    total_steps: int
    run_dir: Path

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    @property
    def spec(self) -> InputSpec:
        return input_spec(self.config)

    def describe(self) -> str:
        which = "the EMA of the student" if self.weights == "ema" else "the student"
        return f"{which} of {self.run_dir} ({self.config.model}, step {self.step})"


class _SkipInit(TorchFunctionMode):
    """Skips ``torch.nn.init``'s functions and the tensor fills they call. Meta tensors hold no
    values, so these compute nothing, yet torch's meta ``normal_`` imports torch._dynamo on its
    first call: 1.2-1.7 s, measured as half of `metapl predict`'s start on a small run."""

    FILLS = frozenset({Tensor.normal_, Tensor.uniform_, Tensor.fill_, Tensor.zero_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


def _num_classes(model_name: str, weights: dict, name: str) -> int:
    """The class count the checkpoint's classifier was built for.

    The model is built twice, for 1 and 2 classes, on the meta device without initialisation (no
    memory, no init cost); the tensors whose shapes differ are the classifier's, and their size in
    the checkpoint is the answer. So runs on any number of classes (image folders, small ImageNet
    subsets) load without knowing their dataset.
    """
    with torch.device("meta"), _SkipInit():
        one, two = (create_model(model_name, n).state_dict() for n in (1, 2))
    counts = set()
    for key, tensor in one.items():
        if tensor.shape == two[key].shape:
            continue
        if key not in weights:
            raise CheckpointError(f"{name}: its checkpoint lacks {key} of model {model_name}")
        dim = next(d for d, (a, b) in enumerate(zip(tensor.shape, two[key].shape)) if a != b)
        counts.add(int(weights[key].shape[dim]))
    if len(counts) != 1:
        raise CheckpointError(f"{name}: its checkpoint does not fit model {model_name}")
    return counts.pop()


def _read_config(path: Path, name: str) -> TrainConfig:
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):  # apply_overrides would fail on .items()
            raise TypeError(f"it holds a JSON {type(saved).__name__}, not an object of keys")
        return apply_overrides(TrainConfig(), saved)
    except (OSError, ValueError, TypeError, MetaplError) as exc:
        raise ConfigError(f"{name}: {path} is not a readable metapl config ({exc})") from None


def check_run_folder(run_dir: Path | str, name: str | None = None) -> None:
    """A ConfigError unless ``run_dir`` holds a run's config.json and checkpoint.pt: the cheap
    part of :func:`load_run_model`'s checks, for commands to run before their other inputs (a
    mistyped --run is the more basic mistake)."""
    run_dir = Path(run_dir)
    name = name or f"run folder {run_dir}"
    if not (run_dir / "config.json").is_file() or not (run_dir / "checkpoint.pt").is_file():
        what = "does not exist" if not run_dir.exists() else "is not a `metapl train` run folder"
        raise ConfigError(
            f"{name} {what} (a run folder holds config.json and checkpoint.pt): give the --out "
            "folder of a `metapl train` run, trained first"
        )


# What `metapl train` writes in a run folder (metapl.train.engine and metapl.train.large_teacher,
# whose files start with large_teacher_; tb/ holds TensorBoard's), which an output file of `metapl
# predict` or `metapl export` must not replace.
RUN_FILES = frozenset(
    {
        "checkpoint.pt",
        "checkpoint.prev.pt",
        "config.json",
        CLASSES_FILE,
        "metrics.csv",
        "results.json",
        "figure10.json",
        "curves.png",
    }
)


def check_not_a_run_file(output: Path | str, run_dir: Path | str, option: str) -> None:
    """A ConfigError when ``output`` names a file of the run in ``run_dir`` (one of
    :data:`RUN_FILES`, a large teacher's file or anything in tb/): `metapl predict --json
    RUN/checkpoint.pt` replaced the run's checkpoint with its predictions, and `metapl export
    --output RUN/checkpoint.pt` with the exported model. A result file of another run folder, or
    of a folder holding another command's results.json, is refused too."""
    target, run = Path(output).resolve(), Path(run_dir).resolve()
    name = target.name
    in_tb = run / "tb" in target.parents
    if in_tb or (target.parent == run and (name in RUN_FILES or name.startswith("large_teacher_"))):
        raise ConfigError(
            f"{option} {output} would replace a file that `metapl train` wrote in the run folder "
            f"{run_dir}; give another file name"
        )
    # ... and the results of another run or command (report.check_not_a_result)
    report.check_not_a_result(output, option)


def load_run_model(
    run_dir: Path | str,
    device: torch.device | str = "cpu",
    *,
    num_classes: int | None = None,
    allow_unfinished: bool = False,
    name: str | None = None,
    unfinished_hint: str = "",
) -> RunModel:
    """The reported model of the run in ``run_dir``: its EMA if it kept one, else its student.

    ``name`` is how error messages refer to the run (default: ``run folder DIR``). A run is finished
    when its checkpoint reached ``steps + finetune_steps`` of its ``config.json``; an unfinished run
    is a :class:`CheckpointError` (ending with ``unfinished_hint``) unless ``allow_unfinished``.
    With ``num_classes``, a checkpoint for another class count is a :class:`CheckpointError`.
    """
    run_dir = Path(run_dir)
    name = name or f"run folder {run_dir}"
    check_run_folder(run_dir, name)
    config_path, ckpt_path = run_dir / "config.json", run_dir / "checkpoint.pt"
    cfg = _read_config(config_path, name)
    state = load_checkpoint(ckpt_path, format_version=FORMAT_VERSION)
    # A checkpoint.pt copied in from another run (or a config.json edited) of the same model was
    # used with this run's name and class names, or reported as "stopped at step N". (One
    # without a fingerprint, made by hand, is held to its architecture only, below.)
    if FINGERPRINT_KEY in state:
        check_resumable(
            state,
            config_fingerprint(cfg.to_dict()),
            ckpt_path,
            config=cfg.to_dict(),
            defaults=TrainConfig().to_dict(),
            advice=f"it and {config_path} come from different runs: put back {name}'s own files",
        )
    step, total = int(state["step"]), cfg.steps + cfg.finetune_steps
    if step < total and not allow_unfinished:
        raise CheckpointError(
            f"{name} stopped at step {step} of {total}; finish it first (run its `metapl train` "
            f"command again){unfinished_hint}"
        )
    weights_name = "ema" if state.get("ema") else "student"
    weights = state.get(weights_name)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{name}: its checkpoint {ckpt_path} holds no student weights")
    found = _num_classes(cfg.model, weights, name)
    if num_classes is not None and found != num_classes:
        raise CheckpointError(
            f"{name} predicts {found} classes, but this data has {num_classes}: "
            "it was trained on another dataset"
        )
    model = create_model(cfg.model, found, dropout=cfg.student_dropout)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{name}: {ckpt_path} does not fit {cfg.model} ({detail})") from None
    model = model.to(device).eval().requires_grad_(False)
    return RunModel(model, cfg, found, weights_name, step, total, run_dir)


def class_names(run_dir: Path | str, num_classes: int) -> list[str]:
    """The names in ``run_dir/classes.json`` when it exists, else ``"0" .. "num_classes - 1"``."""
    path = Path(run_dir) / CLASSES_FILE
    if not path.exists():
        return [str(i) for i in range(num_classes)]
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path} must hold a JSON list of class names (strings)")
    if len(names) != num_classes:
        raise DataError(f"{path} names {len(names)} classes, but the model has {num_classes}")
    # As the data readers require of the names they take (hand-edited here): predict prints one
    # tab-separated line per image, which a tab or newline in a name broke, and two classes of
    # one name could not be told apart.
    seen: set[str] = set()
    for k, name in enumerate(names):
        # (a blank name, " ", is a class folder's name the folder reader takes: allowed)
        if not name or not name.isprintable() or name in seen:
            why = "a name given twice" if name in seen else "empty or with a control character"
            raise DataError(
                f"{path}: class {k}'s name {name!r} is {why}; give each class a distinct, "
                "printable name (or put back the run's own classes.json)"
            )
        seen.add(name)
    return names
