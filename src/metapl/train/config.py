"""The training configuration: one typed dataclass, the single source of truth.

Presets (``metapl presets``) are small TOML files of overrides; ``--set key=value`` overrides them in
turn. Unknown keys and ill-typed values are errors, and the resolved configuration is saved next to
every run (``config.json``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from metapl.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import torch

METHODS = (
    "supervised",
    "label_smoothing",
    "randaugment",
    "uda",
    "supervised_mpl",
    "randaugment_mpl",
    "uda_mpl",
    "noisy_student",
    "reduced_mpl",
)
# Methods that learn from a large teacher's precomputed distributions (Section 4.2, Table 2).
LARGE_TEACHER_METHODS = ("noisy_student", "reduced_mpl")
OPTIMIZERS = ("sgd", "rmsprop", "adam")
# torch.compile's modes (compile_mode, with compile=true)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_DEFAULT_LABELS_PER_CLASS = 5
MPL_METHODS = tuple(m for m in METHODS if m.endswith("_mpl"))
UDA_METHODS = ("uda", "uda_mpl")
# Methods that draw an unlabeled batch, and those that draw a strong (RandAugment + cutout) view.
UNLABELED_METHODS = tuple(
    m for m in METHODS if m not in ("supervised", "label_smoothing", "randaugment")
)
STRONG_VIEW_METHODS = (
    "randaugment",
    "uda",
    "randaugment_mpl",
    "uda_mpl",
    "noisy_student",
    "reduced_mpl",
)
# Keys that only some methods read: key -> (those methods, how the message names them). Setting one
# explicitly (--set) for another method is an error (TrainConfig.check_keys_apply), since the run
# would ignore it without a word. Presets set some of them for every row of a dataset (Table 3's
# column), so this is checked on the keys a user sets, not on the resolved values.
METHOD_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    **dict.fromkeys(
        (
            "teacher_lr",
            "teacher_dropout",
            "teacher_optimizer",
            "teacher_weight_decay",
            "mpl_temperature",
            "mpl_weight",
            "mpl_estimator",
            "mpl_jvp",
            "mpl_labeled_cuda_graph",
            "mpl_baseline_decay",
            "student_labeled_weight",
            "teacher_grad_clip",
        ),
        (MPL_METHODS, "the +MPL methods"),
    ),
    "teacher_hidden": (("reduced_mpl",), "the reduced teacher"),
    **dict.fromkeys(
        ("uda_factor", "uda_temperature", "uda_threshold", "uda_warmup_steps"),
        (UDA_METHODS, "the UDA methods"),
    ),
    "unlabeled_ratio": (UNLABELED_METHODS, "the methods with unlabeled data"),
    **dict.fromkeys(
        ("randaugment_ops", "randaugment_magnitude", "cutout"),
        (STRONG_VIEW_METHODS, "the methods with a strong (RandAugment) view"),
    ),
    **dict.fromkeys(
        ("large_teacher", "unlabeled_per_class"),
        (LARGE_TEACHER_METHODS, "the large-teacher methods"),
    ),
}
# Datasets whose images come at a fixed size (image_size is read by the others only).
FIXED_SIZE_PREFIXES = ("digits", "cifar10", "svhn")
# The largest seed numpy's RandomState and scikit-learn's random_state take (2**32 - 1).
MAX_SEED = 2**32 - 1
# Sizes far beyond any run (a typo such as 1e15): they failed as out-of-memory tracebacks once the
# data was read, or got the process killed. A batch (labeled, or unlabeled: batch_size x
# unlabeled_ratio) of at most MAX_BATCH images, images of at most MAX_IMAGE_SIZE pixels a side (the
# presets: 8 to 600), a reduced teacher at most MAX_TEACHER_HIDDEN wide (the paper: 128 and 512).
MAX_BATCH = 2**20
MAX_IMAGE_SIZE = 4096
MAX_TEACHER_HIDDEN = 8192
# The largest float32: training computes in float32, and a larger learning rate or weight decay
# failed inside the optimizer's step as a traceback ("cannot be converted to type float").
FLOAT32_MAX = 3.4028234663852886e38

# The options that name a file or folder: two names of one (relative then, absolute now) are the
# same run when it resumes or is rerun (metapl.report.same_file). `metapl reduced` names each
# student's large teacher after --out, so `--out rd` then `--out $PWD/rd` was refused as "a
# different configuration (large_teacher: ...)", an option the user never set.
PATH_KEYS = ("data_dir", "large_teacher", "unlabeled_dir", "preset")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults follow Table 3's CIFAR-10 column."""

    # -- what to train
    dataset: str = "cifar10-4k"
    data_dir: str | None = None
    method: str = "uda_mpl"
    model: str = "wrn28_2"
    seed: int = 0
    # Evaluate on the reserved tuning split during training (never on test for selection).
    tuning: bool = False
    # digits only: labeled examples per class (the split's seed is `seed`; see metapl.data.digits)
    labels_per_class: int = _DEFAULT_LABELS_PER_CLASS
    # digits only: T more labeled images per class reserved as the tuning split (0 = none; see
    # metapl.data.digits). `metapl tune` needs a tuning split: --set tune_per_class=T on digits.
    tune_per_class: int = 0

    # -- schedule (App. C.1: cosine decay to 0 after linear warm-up)
    steps: int = 1_000_000
    warmup_steps: int = 2_000
    batch_size: int = 128  # labeled batch (teacher and student alike, Table 3)
    unlabeled_ratio: int = 7  # unlabeled batch = ratio x batch_size (UDA's code's ratio)

    # -- optimization (Nesterov 0.9 for both models)
    student_lr: float = 0.3
    teacher_lr: float = 0.125
    momentum: float = 0.9
    weight_decay: float = 5e-4  # not applied to BatchNorm parameters or biases
    student_dropout: float = 0.35
    teacher_dropout: float = 0.5
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # 0 = no EMA of the student
    # After the main steps, fine-tune the student on the labeled data alone (later versions of the
    # paper); results.json reports the accuracy before and after. 0 = no fine-tuning. Fine-tuning
    # uses SGD (Nesterov with `momentum`, `weight_decay`, `label_smoothing`) whatever
    # student_optimizer is, with a cosine decay from finetune_lr and no warm-up.
    finetune_steps: int = 0
    finetune_lr: float = 0.01

    # -- UDA (Table 3) and MPL
    uda_factor: float = 1.0
    uda_temperature: float = 0.8
    uda_threshold: float = 0.8  # weak view's confidence mask; not in the paper: UDA's CIFAR value
    uda_warmup_steps: int = 5_000  # linear ramp of the UDA factor; not given in the paper
    mpl_temperature: float = 1.0  # student targets = softmax(teacher logits / T)
    # weight of the MPL signal in the teacher's loss (the paper's 1; the UDA factor weights UDA)
    mpl_weight: float = 1.0
    # +MPL rows: weight of a CE on the labeled batch in the student's own loss (NoisyStudent's
    # student learns the labels too); 0 = the paper's MPL, where labels reach the student only
    # through the teacher's MPL signal (and fine-tuning, finetune_steps)
    student_labeled_weight: float = 0.0
    mpl_estimator: str = "exact"
    # mpl_estimator=first_order only: decay of the moving-average baseline subtracted from the
    # reward h = R_old - R_new, started at 0 (MetaPseudoLabels' baseline_decay); < 0 = none. The
    # first-order term is a sum over the unlabeled batch (its expectation is the exact gradient's
    # size); at the presets' mpl_weight and teacher_lr it wrecked digits UDA+MPL's teacher, and 1
    # or 10 / the unlabeled batch (1 is a batch mean, as in public code) suited the digits rows
    # (docs/results.md, "The first-order estimator in training runs").
    mpl_baseline_decay: float = -1.0
    # how the exact step gets the student's JVP (metapl.mpl.step): "auto" = from the update pass's
    # saved activations when the model allows (tangent tape), else forward-mode AD; "tape";
    # "forward_ad" (recomputes the forward). The same J either way.
    mpl_jvp: str = "auto"
    # exact estimator on a GPU: replay the labeled pass at theta_{t+1} (v) from a CUDA graph, one
    # launch instead of ~350 (metapl.mpl.labeled_graph); it holds that pass's memory between steps
    mpl_labeled_cuda_graph: bool = False

    # -- optimizers: "sgd" = Nesterov (Section 4.1); "rmsprop" = EfficientNet's recipe (decay 0.9,
    #    momentum 0.9, eps 1e-3; App. C.2); "adam" = betas 0.9/0.999, eps 1e-7 (the reduced teacher)
    student_optimizer: str = "sgd"
    teacher_optimizer: str = "sgd"
    teacher_weight_decay: float = -1.0  # < 0: the same as weight_decay
    # -- gradient clipping (not in the paper): each step's gradient clipped to this L2 norm as
    #    torch.nn.utils.clip_grad_norm_ clips it, after the data-parallel average and before the
    #    optimizer's step; 0 = off. The student's in every method (not in fine-tuning, which keeps
    #    its own recipe), the +MPL teacher's with teacher_grad_clip. The teacher's MPL gradient
    #    stays exact through the student's clipped step (metapl.mpl.clipping).
    student_grad_clip: float = 0.0
    teacher_grad_clip: float = 0.0

    # -- ReducedMPL and NoisyStudent (Section 4.2): a finished run folder whose student is the
    #    large teacher, the unlabeled images kept per class by its confidence (0 = all), and the
    #    reduced teacher's hidden width (128 CIFAR-10/SVHN, 512 ImageNet)
    large_teacher: str | None = None
    unlabeled_dir: str | None = None  # full-dataset splits: a folder of unlabeled images
    unlabeled_per_class: int = 0
    teacher_hidden: int = 128

    # -- augmentation
    image_size: int = 32
    flip: bool = True
    pad: int = 4
    randaugment_ops: int = 2
    randaugment_magnitude: float = 10.0
    cutout: int = 16

    # -- bookkeeping
    eval_every: int = 5_000
    log_every: int = 100
    checkpoint_every: int = 5_000
    eval_batch_size: int = 512
    # image files decoded on demand (ImageNet, folders of your own too large to decode at the
    # start): threads that decode them (0 = one per core; metapl.data.decoding), and whether the
    # next step's files decode while this step trains (it holds one more step's images in memory).
    # Neither changes the batches, so neither changes a run's results.
    data_threads: int = 0
    data_prefetch: bool = True
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast on the forward passes)
    # memory layout of image models and batches: "auto" = channels_last on CUDA (2-3x with bf16 on
    # an H200, docs/design.md §3) and contiguous on CPU; "channels_last" on a 2-core CPU measured
    # WRN-28-2's exact UDA+MPL step 10-16% faster, ResNet-50 no faster (docs/results.md, CPU step timings)
    memory_format: str = "auto"
    # torchrun (data parallel): BatchNorm with the statistics of the whole global batch instead of
    # each process's shard (metapl.sync_batchnorm: any device, exact MPL included; no effect in one
    # process)
    sync_batchnorm: bool = False
    # torch.compile (inductor) of the models whose step differentiates them by ordinary backward
    # only: the teacher always, the student unless MPL's exact estimators differentiate through its
    # update (they refuse a compiled student, docs/library.md); the exact step's update pass on the
    # tangent tape compiles instead (MetaPseudoLabels.compile_student_tape). Off by default:
    # compiling takes a minute or more at the first steps, changes float summation order and
    # dropout's random stream, and on a 2-core CPU made the digits CNN's step no faster
    # (docs/results.md)
    compile: bool = False
    # torch.compile's mode with compile=true: "reduce-overhead" adds CUDA graphs on a GPU, where a
    # step is bound by the host's kernel launches (the H200's UDA+MPL training step: 73.5 ms
    # uncompiled, 85.1 compiled in the default mode, 65.0 in reduce-overhead mode, the teacher
    # compiled; docs/results.md); on a CPU the modes compile alike
    compile_mode: str = "default"

    # -- where the preset came from (informational: load_preset sets it, --set refuses it)
    preset: str | None = field(default=None)

    def validate(self) -> TrainConfig:
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        from metapl.data.splits import DATASETS

        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset {self.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(
                f"device must be auto, cpu or cuda, got {self.device!r}"
                + did_you_mean(self.device, ("auto", "cpu", "cuda"))
            )
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"
            )
        for name in ("student_optimizer", "teacher_optimizer"):
            if getattr(self, name) not in OPTIMIZERS:
                raise ConfigError(
                    f"{name} must be one of {', '.join(OPTIMIZERS)}, got {getattr(self, name)!r}"
                )
        if self.method in LARGE_TEACHER_METHODS and not self.large_teacher:
            raise ConfigError(
                f"method {self.method} learns from a large teacher: set large_teacher to the run "
                "folder of a finished `metapl train` run (--set large_teacher=DIR)"
            )
        # "not x > 0" rather than "x <= 0", so that NaN is refused too. A temperature of 0 would
        # give NaN targets later, a negative one would invert them silently.
        for name in ("student_lr", "teacher_lr", "mpl_temperature", "uda_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        nonnegative = (
            "mpl_weight",
            "student_labeled_weight",
            "uda_factor",
            "weight_decay",
            "student_grad_clip",
            "teacher_grad_clip",
        )
        for name in nonnegative:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.uda_threshold <= 1.0:  # above 1 would mask every example silently
            raise ConfigError(f"uda_threshold must be in [0, 1], got {self.uda_threshold}")
        if self.student_labeled_weight > 0 and not self.uses_mpl:
            raise ConfigError(
                "student_labeled_weight applies to the +MPL methods only (supervised_mpl, "
                f"randaugment_mpl, uda_mpl, reduced_mpl); method {self.method} does not use it: "
                "leave it at 0"
            )
        if self.memory_format not in ("auto", "channels_last", "contiguous"):
            raise ConfigError(
                "memory_format must be auto, channels_last or contiguous, "
                f"got {self.memory_format!r}"
            )
        if not self.mpl_baseline_decay < 1.0:  # NaN too; any negative value means none
            raise ConfigError(
                "mpl_baseline_decay must be < 1 (in [0, 1) for a moving-average baseline of the "
                f"first-order reward, < 0 for none), got {self.mpl_baseline_decay}"
            )
        if self.mpl_jvp not in ("auto", "tape", "forward_ad"):
            raise ConfigError(f"mpl_jvp must be auto, tape or forward_ad, got {self.mpl_jvp!r}")
        if self.mpl_estimator not in ("exact", "first_order", "double_backward"):
            raise ConfigError(
                "mpl_estimator must be exact, first_order or double_backward (the same exact "
                f"gradient by second-order autograd, slower), got {self.mpl_estimator!r}"
            )
        positive = (
            "steps",
            "batch_size",
            "unlabeled_ratio",
            "eval_every",
            "log_every",
            "checkpoint_every",
            "eval_batch_size",
            "image_size",
            "labels_per_class",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("student_dropout", "teacher_dropout", "label_smoothing", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:  # numpy and scikit-learn take seeds in 0..2**32-1
            raise ConfigError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        for name in ("pad", "cutout", "randaugment_ops", "unlabeled_per_class"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        from metapl.data.decoding import MAX_THREADS

        if not 0 <= self.data_threads <= MAX_THREADS:
            raise ConfigError(
                f"data_threads must be in 0..{MAX_THREADS} (0: one per core), got {self.data_threads}"
            )
        if not self.randaugment_magnitude >= 0:
            raise ConfigError(
                f"randaugment_magnitude must be >= 0, got {self.randaugment_magnitude}"
            )
        if self.teacher_hidden < 1:
            raise ConfigError(f"teacher_hidden must be >= 1, got {self.teacher_hidden}")
        for name, limit in (
            ("batch_size", MAX_BATCH),
            ("image_size", MAX_IMAGE_SIZE),
            ("teacher_hidden", MAX_TEACHER_HIDDEN),
        ):
            if getattr(self, name) > limit:
                raise ConfigError(f"{name} must be at most {limit:,}, got {getattr(self, name):,}")
        if self.method in UNLABELED_METHODS and self.batch_size * self.unlabeled_ratio > MAX_BATCH:
            raise ConfigError(
                f"the unlabeled batch (batch_size x unlabeled_ratio = {self.batch_size:,} x "
                f"{self.unlabeled_ratio:,}) must be at most {MAX_BATCH:,} images; lower "
                "unlabeled_ratio"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.tune_per_class < 0 or (self.tune_per_class and self.dataset != "digits"):
            raise ConfigError("tune_per_class must be >= 0, and only digits reads it")
        if self.labels_per_class != _DEFAULT_LABELS_PER_CLASS and self.dataset != "digits":
            raise ConfigError(
                f"labels_per_class applies to dataset digits only; {self.dataset} does not use "
                "it (its split fixes the labeled set): do not set it"
            )
        if self.finetune_steps < 0 or not self.finetune_lr > 0:
            raise ConfigError("finetune_steps must be >= 0 and finetune_lr > 0")
        if self.warmup_steps < 0 or self.uda_warmup_steps < 0:
            raise ConfigError("warm-up steps must be >= 0")
        if self.warmup_steps > self.steps:
            raise ConfigError(
                f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps}); "
                "lower it with --set warmup_steps=N"
            )
        # Last, so that the checks above name their own rule for NaN; an Inf passes most of them
        # and would otherwise surface as a NaN loss at the first step.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
            if isinstance(value, float) and abs(value) > FLOAT32_MAX:
                raise ConfigError(
                    f"{f.name} must be at most {FLOAT32_MAX:.4g} in size (float32's largest: "
                    f"training computes in float32), got {value}"
                )
        return self

    def ignored_key(self, key: str) -> str | None:
        """Why this run would not read config key ``key`` (a one-line error), or None if it does."""
        if key == "preset":
            # Only a record of the run's preset (config.json, progress bar, summary line): a --set
            # renamed the run and trained the --preset one, as if the named preset had trained.
            return (
                "preset only records the preset a run came from and changes nothing; choose the "
                "preset with --preset (train, tune): do not set it"
            )
        if key in METHOD_KEYS:
            methods, who = METHOD_KEYS[key]
            if self.method not in methods:
                return (
                    f"{key} applies to {who} only ({', '.join(methods)}); method {self.method} "
                    "does not use it: do not set it"
                )
        if key == "mpl_jvp" and self.uses_mpl and self.mpl_estimator != "exact":
            return (
                f"mpl_jvp applies to mpl_estimator=exact only; mpl_estimator "
                f"{self.mpl_estimator} does not use it: do not set it"
            )
        if key == "mpl_labeled_cuda_graph" and self.uses_mpl and self.mpl_estimator != "exact":
            return (
                f"mpl_labeled_cuda_graph applies to mpl_estimator=exact only; mpl_estimator "
                f"{self.mpl_estimator} does not use it: do not set it"
            )
        if key == "mpl_labeled_cuda_graph" and self.device == "cpu":
            return "mpl_labeled_cuda_graph needs device=cuda (CUDA graphs): do not set it"
        if key == "mpl_baseline_decay" and self.uses_mpl and self.mpl_estimator != "first_order":
            return (
                f"mpl_baseline_decay applies to mpl_estimator=first_order only; mpl_estimator "
                f"{self.mpl_estimator} has no baseline: do not set it"
            )
        if key == "finetune_lr" and self.finetune_steps == 0:
            return "finetune_lr applies only with finetune_steps > 0: set finetune_steps too"
        if key == "compile_mode" and not self.compile:
            return "compile_mode applies only with compile=true: set compile=true too"
        if key == "momentum" and not self.sgd_optimizers:
            return (
                "momentum applies to the sgd optimizers only (student_optimizer, the +MPL "
                "methods' teacher_optimizer, fine-tuning); this run has none: do not set it"
            )
        if key == "labels_per_class" and self.dataset != "digits":
            return (
                f"labels_per_class applies to dataset digits only; {self.dataset} does not use it"
            )
        if key in ("data_dir", "unlabeled_dir") and self.dataset == "digits":
            return f"{key} does not apply to dataset digits (scikit-learn ships it): do not set it"
        if key == "unlabeled_dir" and self.dataset != "digits":
            from metapl.data.splits import TAKES_UNLABELED_DIR

            if self.dataset not in TAKES_UNLABELED_DIR:
                # (the split's loader refused it later, naming loader options no key sets)
                return (
                    f"unlabeled_dir applies to {', '.join(TAKES_UNLABELED_DIR)} only; "
                    f"{self.dataset} takes its unlabeled images from its own split: do not set it"
                )
        if key in ("data_threads", "data_prefetch") and not self.reads_image_files:
            return (
                f"{key} applies to image files decoded as they are read (imagenet-*, folder, an "
                f"unlabeled_dir); {self.dataset}'s images are arrays in memory: do not set it"
            )
        if key == "image_size" and self.dataset.startswith(FIXED_SIZE_PREFIXES):
            return (
                f"image_size applies to imagenet-*, folder and npz only; {self.dataset}'s images "
                "have a fixed size: do not set it"
            )
        return None

    def check_keys_apply(self, keys: Iterable[str]) -> TrainConfig:
        """Refuse config keys set explicitly (``--set``) that this run would ignore."""
        for key in keys:
            why = self.ignored_key(key)
            if why is not None:
                raise ConfigError(why)
        return self

    @property
    def sgd_optimizers(self) -> list[str]:
        """The optimizers of this run that are SGD (the ones that read ``momentum``)."""
        out = ["student"] if self.student_optimizer == "sgd" else []
        if self.uses_mpl and self.teacher_optimizer == "sgd":
            out.append("teacher")
        if self.finetune_steps > 0:
            out.append("finetune")
        return out

    @property
    def reads_image_files(self) -> bool:
        """Whether images come from files decoded as they are read (metapl.data.decoding): ImageNet,
        a folder of your own, an unlabeled_dir; the others' images are arrays in memory."""
        return (
            self.dataset.startswith("imagenet")
            or self.dataset == "folder"
            or self.unlabeled_dir is not None
        )

    @property
    def uses_mpl(self) -> bool:
        return self.method.endswith("_mpl")

    @property
    def uses_large_teacher(self) -> bool:
        return self.method in LARGE_TEACHER_METHODS

    def channels_last(self, device: torch.device) -> bool:
        """Whether models and image batches on ``device`` use the channels_last layout."""
        if self.memory_format == "auto":
            return device.type == "cuda"
        return self.memory_format == "channels_last"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _kind_name(kind: type) -> str:
    """How an error message names a config value's type."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(kind, f"a {kind.__name__}")


def _coerce(key: str, value: Any) -> Any:
    """Convert ``value`` (from TOML or a ``--set`` string) to the type of field ``key``."""
    if not key:
        raise ConfigError("a config key is empty: write --set key=value")
    if key not in _FIELDS:
        # the closest keys by spelling (a prefix match missed a typo in the first letters)
        hint = did_you_mean(key, _FIELDS, n=3)
        raise ConfigError(f"unknown config key {key!r}{hint}; `metapl train --help` lists them")
    default = getattr(TrainConfig(), key)
    kind = type(default) if default is not None else str
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key} expects true or false, got {value!r}")
        try:
            if kind is int and "e" in text.lower():  # 1e6: a whole number in float notation
                number = float(text)
                if not number.is_integer():  # 2.5e0 (or 1e400, inf) is no step count
                    raise ValueError(text)
                return int(number)
            return kind(text)
        except ValueError:
            raise ConfigError(f"{key} expects {_kind_name(kind)}, got {value!r}") from None
    if kind is int and isinstance(value, bool):  # a TOML `steps = true` trained 1 step
        raise ConfigError(f"{key} expects {_kind_name(kind)}, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"{key} expects {_kind_name(kind)}, got {value!r}")
    return value


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A new config with ``overrides`` applied (keys checked, values converted)."""
    values = {k: _coerce(k, v) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **values)


def parse_set_options(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; malformed items are a ConfigError."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def warmup_cut_to(
    steps: int | None,
    preset: TrainConfig,
    overrides: dict,
    command: str,
    earlier_warmup: int | None = None,
) -> tuple[dict, str | None]:
    """``({"warmup_steps": steps}, note)`` when ``--steps`` shortens a run below the preset's LR
    warm-up, else ``({}, None)``. A quick run of a preset should not need a second option; an
    explicit ``--set warmup_steps=N`` is the user's, and is still checked against the steps. The
    command prints the note on stderr once its inputs are checked: a mistake is then one line.

    ``earlier_warmup``: the warm-up of the run being resumed. One that was lowered to fit its
    ``--steps`` is kept when a longer ``--steps`` extends that run: a new cut (or none) would be
    another configuration, refused as such, with a message naming warmup_steps, not --steps."""
    if steps is None or steps < 1 or "warmup_steps" in overrides:
        return {}, None
    warmup = apply_overrides(preset, overrides).warmup_steps
    if earlier_warmup is not None and earlier_warmup < warmup and earlier_warmup <= steps:
        note = (
            f"metapl {command}: note: warmup_steps {earlier_warmup}, as in the run being resumed "
            f"(the preset's is {warmup})"  # lowered by its --steps, or set by its --set
        )
        return {"warmup_steps": earlier_warmup}, note
    if warmup <= steps:
        return {}, None
    note = f"metapl {command}: note: warmup_steps lowered from {warmup} to {steps} to fit --steps {steps}"
    return {"warmup_steps": steps}, note


def uda_warmup_note(cfg: TrainConfig, command: str) -> str | None:
    """A note when the UDA factor's linear ramp outlasts the run, else None. `--steps 300` on a
    preset with the 5,000-step ramp trains with 6% of its consistency loss at the last step; that
    should not pass without a word. Unlike the LR warm-up it is not cut: a ramp that ends after the
    run is a valid schedule, and shortening it would change the method's loss."""
    if cfg.method not in UDA_METHODS or cfg.uda_warmup_steps <= cfg.steps:
        return None
    reached = cfg.steps / cfg.uda_warmup_steps  # UDALoss.weight at the last step, over uda_factor
    return (
        f"metapl {command}: note: uda_warmup_steps {cfg.uda_warmup_steps} is longer than the "
        f"run's {cfg.steps} steps: the UDA factor reaches {reached:.0%} of uda_factor; "
        "--set uda_warmup_steps=N to shorten the ramp"
    )


def first_order_note(cfg: TrainConfig, command: str, explicit: Iterable[str]) -> str | None:
    """A note when an +MPL run takes the first-order estimator at the presets' mpl_weight of 1
    without choosing it (--set). Its REINFORCE term sums over the unlabeled batch, the exact
    gradient's size in expectation, and at that weight and the presets' teacher_lr its noise
    wrecked the teacher (docs/results.md); public implementations take a batch mean, which is
    mpl_weight = 1 / the unlabeled batch. A preset file's other weight is a choice too."""
    if not cfg.uses_mpl or cfg.mpl_estimator != "first_order" or "mpl_weight" in explicit:
        return None
    if cfg.mpl_weight != 1.0:
        return None
    unlabeled = cfg.batch_size * cfg.unlabeled_ratio
    return (
        f"metapl {command}: note: mpl_estimator=first_order sums its REINFORCE term over the "
        f"{unlabeled} unlabeled images of a batch; at mpl_weight=1 that wrecked "
        f"the teacher of digits UDA+MPL (docs/results.md); --set mpl_weight={1 / unlabeled:.3g} "
        "makes it a batch mean, as public implementations have it, and mpl_baseline_decay=0.99 "
        "subtracts a baseline"
    )


def joined_notes(*notes: str | None) -> str | None:
    """The given notes, one per line, or None if there are none."""
    given = [note for note in notes if note is not None]
    return "\n".join(given) if given else None
