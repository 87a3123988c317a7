"""One training run's live objects: both models through their method, optimizers, schedules,
EMA, the fine-tuning phase; one step of the current phase; and how all of it goes into and
comes out of a checkpoint. The engine (:mod:`metapl.train.engine`) drives it step by step and
decides when to evaluate, log and save."""

from __future__ import annotations

import numpy as np
import torch

from metapl.data.splits import SSLSplit
from metapl.distributed import DataParallel
from metapl.methods.build import autocast_dtype, build_method
from metapl.methods.mpl import MPLMethod
from metapl.methods.supervised import SupervisedMethod
from metapl.models import param_groups_for_weight_decay
from metapl.mpl.step import TAPE_COMPILE_MODES
from metapl.sync_batchnorm import convert_global_batchnorm
from metapl.train.batches_ahead import BatchesAhead
from metapl.train.checkpoint import FORMAT_VERSION, capture_rng, restore_rng
from metapl.train.config import TrainConfig
from metapl.train.data import BatchSource, stream_seed
from metapl.train.ema import EMA
from metapl.train.schedule import make_scheduler


class Run:
    """One training run's live objects, and how they go into and come out of a checkpoint."""

    def __init__(
        self,
        cfg: TrainConfig,
        split: SSLSplit,
        device: torch.device,
        dp: DataParallel | None = None,
    ):
        self.cfg, self.split, self.device = cfg, split, device
        # Data parallelism: every optimizer step below reads gradients averaged over the processes.
        self.dp = dp if dp is not None else DataParallel()
        torch.manual_seed(stream_seed(cfg.seed, "init"))  # the same models on every rank
        self.method = build_method(cfg, split.num_classes, device, grad_sync=self.dp.grad_sync)
        if cfg.sync_batchnorm and self.dp.enabled:
            for model in self.method.models.values():
                # In place: BatchNorm children are swapped, their parameters and buffers kept (the
                # optimizers hold them); a model's root is never a BatchNorm.
                convert_global_batchnorm(model)
        self.schedulers = {
            name: make_scheduler(opt, cfg.steps, cfg.warmup_steps)
            for name, opt in self.method.optimizers.items()
        }
        student = self.method.models["student"]
        self.ema = EMA(student, cfg.ema_decay) if cfg.ema_decay > 0 else None
        # Optional last phase: the student alone on the labeled data (its own optimizer/schedule).
        self.finetune = self.finetune_scheduler = None
        if cfg.finetune_steps > 0:
            opt = torch.optim.SGD(
                param_groups_for_weight_decay(student, cfg.weight_decay),
                lr=cfg.finetune_lr,
                momentum=cfg.momentum,
                nesterov=cfg.momentum > 0,
            )
            self.finetune = SupervisedMethod(
                student,
                opt,
                label_smoothing=cfg.label_smoothing,
                autocast_dtype=autocast_dtype(cfg),
                grad_sync=self.dp.grad_sync,
            )
            self.finetune_scheduler = make_scheduler(opt, cfg.finetune_steps, 0)
        self.before_finetune: dict | None = None
        self.figure10: dict[str, list] = {}  # ReducedMPL: quarter -> teacher distributions
        self.step = 0

    def compile_models(self) -> list[str]:
        """``torch.compile`` the models whose step allows it (``compile=true``), in place
        (``Module.compile``: the state dict keeps its names, so checkpoints, ``predict`` and
        ``export`` are unchanged), in ``compile_mode``; the names compiled. The EMA copy, made
        uncompiled, stays so."""
        # A fresh compiler state, as in a new process (metapl digits' and tune's runs share one):
        # after another run's shapes, torch compiles shape-generic kernels, which may round
        # differently, so a run's numbers would depend on what ran before it in its process.
        torch.compiler.reset()
        # Static graphs (below) recompile per input shape: training's batches, each evaluation
        # set's last partial batch, fine-tuning's, for teacher and student alike when they share
        # a class. Past torch's limit of 8 per function new shapes run eagerly, so which shapes
        # ran compiled would depend on the run's history (a resumed run's is shorter).
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        exact_student = self.cfg.uses_mpl and self.cfg.mpl_estimator != "first_order"
        names = [n for n in self.method.models if not (n == "student" and exact_student)]
        for name in names:
            # dynamic=False: a static graph per input shape. With torch's automatic dynamic
            # shapes a model's second batch shape (a first_order student sees two a step)
            # recompiled a shape-generic graph that later steps used for both, while a resumed
            # run's first step used the static one again, so it did not resume exactly.
            self.method.models[name].compile(dynamic=False, mode=self.cfg.compile_mode)
        tape = self.cfg.mpl_estimator == "exact" and self.cfg.mpl_jvp != "forward_ad"
        if exact_student and tape and isinstance(self.method, MPLMethod):
            # The exact step's student cannot be compiled, but its update pass on the tangent
            # tape can (J from the tape; forward AD's dual tensors do not compile).
            self.method.mpl.compile_student_tape(self.cfg.compile_mode)
            mode = TAPE_COMPILE_MODES[self.cfg.compile_mode]  # (no CUDA graphs for the tape)
            alike = mode == self.cfg.compile_mode
            names.append(
                f"student (its update pass on the tangent tape{'' if alike else ', ' + mode})"
            )
        return names

    @property
    def total_steps(self) -> int:
        return self.cfg.steps + self.cfg.finetune_steps

    def views_at(self, step: int) -> tuple[str, ...] | None:
        """The views of ``step``'s batch: the method's (None: the source's own) during the main
        phase, the labeled images alone during fine-tuning."""
        return None if step < self.cfg.steps else ()

    def advance(self, batch_source: BatchSource | BatchesAhead) -> dict:
        """One step of the current phase (MPL or baseline, then fine-tuning)."""
        # Dropout and sampling; with several processes each draws its own (independent masks for
        # the slices, as under DistributedDataParallel).
        rank = ("rank", self.dp.rank) if self.dp.enabled else ()
        torch.manual_seed(stream_seed(self.cfg.seed, "step", self.step, *rank))
        batch = batch_source.batch(self.step, self.views_at(self.step))
        if self.step < self.cfg.steps:
            metrics = self.method.step(batch)
            schedulers = list(self.schedulers.values())
        else:
            # steps past cfg.steps exist only when finetune_steps > 0, which made both
            assert self.finetune is not None and self.finetune_scheduler is not None
            metrics = self.finetune.step(batch)
            metrics = {f"finetune_{k}": v for k, v in metrics.items()}
            schedulers = [self.finetune_scheduler]
        for sched in schedulers:
            sched.step()
        if self.ema is not None:
            self.ema.update(self.method.models["student"])
        self.step += 1
        return metrics

    def learning_rates(self) -> dict[str, float]:
        opts = dict(self.method.optimizers)
        if self.finetune is not None:
            opts["finetune"] = self.finetune.optimizers["student"]
        return {f"{name}_lr": opt.param_groups[0]["lr"] for name, opt in opts.items()}

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.method.models["student"]

    def state_dict(self, fingerprint: str) -> dict:
        state = {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "data_position": {"step": self.step},  # batches are a function of (seed, step)
            "config": self.cfg.to_dict(),
            "config_fingerprint": fingerprint,
            "optimizers": {k: o.state_dict() for k, o in self.method.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "method": self.method.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": capture_rng(),
            "before_finetune": self.before_finetune,
            "figure10": self.figure10,
        }
        if self.finetune is not None:
            assert self.finetune_scheduler is not None  # made together with self.finetune
            state["finetune_optimizer"] = self.finetune.optimizers["student"].state_dict()
            state["finetune_scheduler"] = self.finetune_scheduler.state_dict()
        for name, model in self.method.models.items():
            state[name] = model.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for name, model in self.method.models.items():
            model.load_state_dict(state[name])
        for name, opt in self.method.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        self.method.load_state_dict(state["method"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        restore_rng(state["rng"])
        if self.finetune is not None:
            assert self.finetune_scheduler is not None  # made together with self.finetune
            self.finetune.optimizers["student"].load_state_dict(state["finetune_optimizer"])
            self.finetune_scheduler.load_state_dict(state["finetune_scheduler"])
        self.before_finetune = state.get("before_finetune")
        self.figure10 = state.get("figure10") or {}
        self.step = int(state["step"])


class Figure10Series:
    """Figure 10: the reduced teacher's distribution on a few fixed unlabeled images at each
    quarter of training, next to the large teacher's (kept in the checkpoint, so resumable)."""

    IMAGES = 6

    def __init__(self, run: Run, teacher_probs):
        self.run = run
        # evenly spaced over the selection, which is grouped by class: several classes show
        probs_u = teacher_probs[1]
        rows = np.linspace(0, len(probs_u) - 1, self.IMAGES).astype(int)
        self.large = np.asarray(probs_u[rows], dtype=np.float32)
        total = run.cfg.steps
        self.quarters = {max(1, round(total * k / 4)): k for k in (1, 2, 3, 4)}

    def maybe_record(self, step: int) -> None:
        if step not in self.quarters or step > self.run.cfg.steps:
            return
        teacher = self.run.method.models["teacher"]
        was_training = teacher.training
        teacher.eval()
        with torch.no_grad():
            x = torch.from_numpy(self.large).to(self.run.device)
            probs = torch.softmax(teacher(x) / self.run.cfg.mpl_temperature, -1)
        teacher.train(was_training)
        self.run.figure10[str(self.quarters[step])] = probs.cpu().tolist()

    def series(self) -> dict:
        return {
            "large_teacher": self.large.tolist(),
            "reduced_teacher_by_quarter": self.run.figure10,
        }
