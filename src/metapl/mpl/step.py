"""One Meta Pseudo Labels step for any teacher/student pair and their own torch optimizers.

Data flow of one exact step (Section 3.1, Figure 4; the math is in docs/design.md §1):

1. teacher forward on [x_l, x_u, extras]       -> q = softmax(teacher(x_u) / T)
2. student forward+backward on x_u with q      -> g; factors dU/dg from the optimizer's state;
                                                  student_optimizer.step(): theta_t -> theta_{t+1}
3. student forward+backward on x_l at theta_{t+1} -> v = grad R(theta_{t+1})
4. w = (dU/dg) * v; one forward-mode JVP of log p_theta(x_u) at theta_t along w -> J
   (same dropout mask as in 2, BatchNorm batch statistics, running statistics untouched).
   By default J comes from forward-mode AD (``torch.autograd.forward_ad``), which recomputes the
   primal forward. With ``jvp="auto"`` (what ``metapl train`` uses) step 2 runs the student as a
   traced graph that keeps the primal values, and J is a tangent-only pass over them
   (:mod:`metapl.mpl.tangent`); models it cannot serve use forward-mode AD.
5. teacher loss = supervised CE + extra + mpl_weight * (-mean_i sum_c q_ic J_ic), J held constant:
   the gradient of the last term is exactly grad_Psi R(theta_{t+1}). One teacher backward, one step.

No second-order graph is built. The first-order estimator (later versions of the paper) replaces
3-4 by a REINFORCE-style term; see :meth:`MetaPseudoLabels._first_order_student_step`. The
``double_backward`` estimator computes the same exact gradient the obvious, slow way (a second-order
graph through a differentiable copy of the optimizer's step): it is the yardstick of `metapl bench`
and an end-to-end oracle for the exact step.

``MetaPseudoLabels._step`` runs a step top to bottom: the checks that must pass before anything
moves (options.py and setup_checks.py at construction, and options.py again after an option is
set on the object; batch_checks.py, student_checks.py and update_rules.py every step), the
teacher's forward, one estimator's student step (which steps the student's optimizer), then the
teacher's loss, backward and optimizer step. J's two paths, forward AD and the tangent tape, are
:class:`metapl.mpl.jvp.JvpPaths`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metapl.errors import ConfigError, DataError, MetaplWarning, first_line
from metapl.losses import (
    batch_mean,
    hard_cross_entropy,
    member_mean,
    soft_cross_entropy,
    upcast,
)
from metapl.mpl.batch_checks import (
    as_logits,
    check_baseline_shape,
    check_devices,
    check_finite_for_student_checks,
    check_label_range,
    check_learns,
    check_rows,
    check_same_classes,
    check_shapes,
    check_values,
    teacher_view,
)
from metapl.mpl.clipping import NormClip, clip_
from metapl.mpl.double_backward_checks import (
    check_double_backward_student,
    check_gradient_derivative,
    check_second_derivatives,
    grad_to_targets,
)
from metapl.mpl.inputs import Input, ModelInput, holding, joint_forward, model_input
from metapl.mpl.jvp import JvpPaths, UpdatePass
from metapl.mpl.labeled_graph import (
    LabeledGraph,
    LabeledResult,
    check_cuda_student,
    leaf_aliases,
    pass_key,
)
from metapl.mpl.options import OPTIONS, check_jvp, check_options
from metapl.mpl.replay import (
    RestorePoint,
    RngState,
    buffer_copies,
    clones,
    differentiable_attention,
    module_device,
    replayed_rng,
    restore_buffers,
    tf32_disabled,
)
from metapl.mpl.setup_checks import (
    check_listed_once,
    check_models_and_optimizers,
    check_owned,
    check_unshared,
)
from metapl.mpl.student_checks import (
    SPARSE_GRADIENTS,
    check_derivatives,
    check_replayable,
    check_student_takes,
    check_student_update,
)
from metapl.mpl.tangent import CompiledGraphRefused, TangentTape, TapeRecord, tolerance
from metapl.mpl.update_rules import (
    check_optimizer,
    optimizer_params,
    reference_update,
    times_factors,
    update_factors,
)

# torch.compile's modes -> the tape's (compile_student_tape): the same without CUDA graphs
TAPE_COMPILE_MODES = {
    "default": "default",
    "reduce-overhead": "default",
    "max-autotune": "max-autotune-no-cudagraphs",
    "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
}


@dataclass
class TeacherLogits:
    """The teacher's logits of one step, for an extra teacher loss such as UDA's consistency."""

    labeled: Tensor
    unlabeled: Tensor
    extra: tuple[Tensor, ...]
    labels: Tensor
    step: int


TeacherLoss = Callable[[TeacherLogits], Tensor]


class MetaPseudoLabels:
    """The MPL update of a teacher and a student (Pham et al., Section 3; Appendix B).

    ``step(x_labeled, y_labeled, x_unlabeled)`` moves the student one step of *its own optimizer*
    on the teacher's soft targets, then the teacher one step of *its own optimizer* on its
    supervised loss plus the exact gradient of the student's labeled loss after that step.

    Args:
        teacher, student: any ``nn.Module`` mapping inputs to logits ``[..., C]``; an input may be
            several tensors (see :meth:`step`).
        teacher_optimizer: a ``torch.optim`` optimizer over the teacher's parameters whose
            ``step()`` needs no closure (not LBFGS) and that is not ``differentiable=True``.
        student_optimizer: SGD, RMSprop, Adam or AdamW (their Appendix-B factors are exact);
            any optimizer whose ``step()`` needs no closure works with ``estimator="first_order"``.
            The two models share no parameter an optimizer trains (a frozen one,
            ``requires_grad`` off, they may).
        temperature: targets are ``softmax(teacher_logits / temperature)``.
        supervised_weight: weight of the teacher's CE on the labeled batch (Figure 4); 0 = pure MPL.
        label_smoothing: smoothing of that supervised CE (Table 3: 0.1 on ImageNet).
        mpl_weight: weight of the MPL signal in the teacher's loss.
        student_labeled_weight: weight of a CE on the labeled batch in the *student's* own loss,
            next to the teacher's targets on x_u (as NoisyStudent's student learns both). 0, the
            default, is the paper's MPL: the labeled batch is the student's validation data and
            reaches it only through the teacher. The labeled term does not depend on the
            teacher, so it changes theta_{t+1} (and the Appendix-B factors) but not J; the exact
            gradient stays exact (tested against double backward and finite differences). With
            ``estimator="first_order"`` the reward R_old - R_new then also holds the labeled
            term's own (label-independent) drop: no bias, more variance; use ``baseline_decay``.
        teacher_extra_loss: ``f(TeacherLogits) -> scalar`` added to the teacher's loss (e.g. UDA);
            its extra inputs come from ``step(..., teacher_extra_inputs=...)``.
        estimator: ``"exact"`` (default), ``"first_order"`` (REINFORCE with h = R_old - R_new), or
            ``"double_backward"`` (the exact gradient by second-order autograd: same result as
            ``"exact"``, slower and more memory; single process only).
        baseline_decay: first-order only: subtract a moving average of h (decay in [0, 1)),
            started at 0; ``None`` for no moving-average baseline.
        autocast_dtype: e.g. ``torch.bfloat16`` to run forward passes under autocast; losses and
            targets stay in float32.
        batch_dim: the dimension of every input tensor and of the logits that indexes examples.
            Leading dimensions index independent ensemble members (e.g. stacked seeds) whose
            losses are summed.
        check_inputs: check every step that labels are in range and floating-point inputs are
            finite (one host sync on GPU).
        allow_tf32: let the student's passes of the exact step (g, v and the JVP) use TF32 on
            CUDA. Off by default: TF32 costs the meta-gradient 14-20% relative error on an H200
            (docs/design.md §1); the teacher's own passes keep PyTorch's global setting.
        grad_sync: data parallelism: an object with ``mean_(tensors)`` and ``world_size`` that
            averages gradients across processes in place (:class:`metapl.distributed.
            GradientAverager`); each process then passes its own shard of the batches.
        jvp: how the exact step computes J, the student's JVP on x_u (same value either way):
            ``"tape"`` runs the student's update pass as a ``torch.fx`` graph that keeps its
            activations, then propagates tangents only (no second primal forward:
            :mod:`metapl.mpl.tangent`); ``"forward_ad"`` recomputes the forward with dual tensors;
            ``"auto"`` uses the tape when the student can (fx traces it; no in-place ops, hooks,
            or random ops other than dropout and tangent-free sources such as stochastic depth's
            ``torch.rand``) and forward AD otherwise. ``"tape"`` raises a :class:`ConfigError`
            for a student that cannot use it. The first step of each traced graph is checked
            against the module and forward AD; ``"auto"`` falls back (with a warning) on a
            difference. ``last_jvp_path`` says which path the last step took,
            ``jvp_fallback_reason`` why it was not the tape. The default is ``"forward_ad"``:
            fx tracing runs the student's ``forward`` once on proxies, so Python side effects in
            a user's ``forward`` (appending to a list, counters) would see proxies, and the traced
            graph would skip them. The engine opts in with ``"auto"`` for the registry's models
            (config key ``mpl_jvp``). Other estimators compute no J: a ``jvp`` other than the
            default is then a ConfigError.
        allow_student_hooks: let the exact estimators run with hooks that can change the
            student's update (a gradient hook on its parameters, a module backward hook, a step
            hook on its optimizer), which are refused by default. For hooks that only observe
            (gradient logging): one that changes a gradient or the update makes the teacher's
            gradient wrong, silently (5-46% in the tests' examples).
        student_max_grad_norm, teacher_max_grad_norm: clip that model's gradient before its
            optimizer's step exactly as ``torch.nn.utils.clip_grad_norm_`` does (L2 norm over the
            gradients of the parameters its optimizer updates, after ``grad_sync``'s average);
            ``None``, the default (and the paper's), does not clip. The student's clipped
            gradient is what its optimizer and the Appendix-B factors see, and the exact
            estimators differentiate through the clip (:mod:`metapl.mpl.clipping`), so the
            teacher's gradient stays exact. With ``batch_dim`` > 0 (stacked ensemble members) a
            ConfigError: one norm over all members would couple independent models.
        labeled_cuda_graph: exact estimator on a CUDA student: replay its labeled pass at
            theta_{t+1} (forward on the labeled batch and v = grad R) from a CUDA graph, captured
            at the second step of each batch shape (:mod:`metapl.mpl.labeled_graph`). The same
            function, launched once instead of some 350 times. It pays where the host holds the
            step up: an H200's training step 66.1 -> 59.8 ms, the step alone unchanged. It costs
            the pass's memory, held by the graph between steps. A student that cannot be captured
            (a host sync in its forward) runs eagerly, with a warning. ``last_labeled_path`` says
            which the last step took.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        teacher_optimizer: torch.optim.Optimizer,
        student_optimizer: torch.optim.Optimizer,
        *,
        temperature: float = 1.0,
        supervised_weight: float = 1.0,
        label_smoothing: float = 0.0,
        mpl_weight: float = 1.0,
        student_labeled_weight: float = 0.0,
        teacher_extra_loss: TeacherLoss | None = None,
        estimator: str = "exact",
        baseline_decay: float | None = None,
        autocast_dtype: torch.dtype | None = None,
        batch_dim: int = 0,
        check_inputs: bool = True,
        grad_sync=None,
        allow_tf32: bool = False,
        jvp: str = "forward_ad",
        allow_student_hooks: bool = False,
        student_max_grad_norm: float | None = None,
        teacher_max_grad_norm: float | None = None,
        labeled_cuda_graph: bool = False,
    ):
        options = {name: value for name, value in locals().items() if name in OPTIONS}
        check_options(teacher, student, options)
        check_models_and_optimizers(
            teacher, student, teacher_optimizer, student_optimizer, estimator, grad_sync
        )
        self.teacher, self.student = teacher, student
        self._objects_checked: tuple = (teacher, student, teacher_optimizer, student_optimizer)
        self.teacher_optimizer, self.student_optimizer = teacher_optimizer, student_optimizer
        self.temperature = temperature
        self.supervised_weight = supervised_weight
        self.label_smoothing = label_smoothing
        self.mpl_weight = mpl_weight
        self.student_labeled_weight = student_labeled_weight
        self.teacher_extra_loss = teacher_extra_loss
        self.estimator = estimator
        self.baseline_decay = baseline_decay
        self.autocast_dtype = autocast_dtype
        self.batch_dim = batch_dim
        self.check_inputs = check_inputs
        self.grad_sync = grad_sync
        self.allow_tf32 = allow_tf32
        self.student_max_grad_norm = student_max_grad_norm
        self.teacher_max_grad_norm = teacher_max_grad_norm
        self.labeled_cuda_graph = labeled_cuda_graph
        self._labeled_graph = LabeledGraph()  # used only with labeled_cuda_graph
        self._options_checked = options  # see _check_set_options
        self.step_count = 0
        self._num_classes: int | None = None  # of the teacher's logits, at the last step
        self._shapes_checked: set[tuple] = set()  # see _restore_point
        self._restore: RestorePoint | None = None  # this step's, see _restore_point
        self._replay_checked = False  # see metapl.mpl.student_checks.check_replayable
        self.baseline: Tensor | None = None
        self.allow_student_hooks = allow_student_hooks
        # How the exact step gets J (jvp), with the traced students and last_jvp_path: jvp.py
        self._jvp_paths = JvpPaths(student, jvp)
        self._student_params: list[Tensor] = []
        self._holdings: dict[str, list[tuple[int, bool]]] = {}  # see _check_holdings
        self._follow_student_optimizer()
        self._check_holdings("teacher")
        self._check_student_update()  # fail now, not at the first step
        self._optimizers_checked: dict[str, object] = {}  # see _check_optimizers
        self._inputs_taken: set = set()  # see metapl.mpl.student_checks.check_student_takes
        self._check_optimizers()
        if estimator == "exact" and jvp == "tape":
            self._jvp_paths.tape()  # a student that cannot use the tape fails now, not at the first step

    # ------------------------------------------------------------------ public API

    def step(
        self,
        x_labeled: Input,
        y_labeled: Tensor,
        x_unlabeled: Input,
        *,
        teacher_extra_inputs: Sequence[Input] = (),
        teacher_x_labeled: Input | None = None,
        teacher_x_unlabeled: Input | None = None,
    ) -> dict[str, Tensor]:
        """One MPL step of both models. Returns detached scalar tensors, not floats (no host sync
        to make them; the step itself syncs only for ``check_inputs`` and its first-use checks).

        Each input is a tensor (the model is called as ``model(x)``), a tuple or list of tensors
        (``model(*x)``: token ids and an attention mask, say) or a dict of str -> tensor
        (``model(**x)``); every tensor in it holds the batch's examples along ``batch_dim``
        (:mod:`metapl.mpl.inputs`).

        ``teacher_x_labeled`` / ``teacher_x_unlabeled``: what the teacher sees of the same examples,
        when it is not the student's input (ReducedMPL: the large teacher's precomputed
        distributions, while the student sees the images).

        Runs with gradients on, also inside ``torch.no_grad()`` (a training step needs them).
        """
        if torch.is_inference_mode_enabled():
            raise ConfigError(
                "MetaPseudoLabels.step() trains both models and needs autograd: call it outside "
                "torch.inference_mode()"
            )
        with torch.enable_grad():
            return self._step(
                x_labeled,
                y_labeled,
                x_unlabeled,
                teacher_extra_inputs,
                teacher_x_labeled,
                teacher_x_unlabeled,
            )

    def _step(
        self,
        x_labeled: Input,
        y_labeled: Tensor,
        x_unlabeled: Input,
        teacher_extra_inputs: Sequence[Input],
        teacher_x_labeled: Input | None,
        teacher_x_unlabeled: Input | None,
    ) -> dict[str, Tensor]:
        self._check_set_options()
        if self.labeled_cuda_graph:
            check_cuda_student(self.student)
        self._check_replaced()
        self._follow_student_optimizer()
        self._check_holdings("teacher")
        self._check_student_update()
        bd = self.batch_dim
        x_l = model_input("x_labeled", x_labeled, bd)
        x_u = model_input("x_unlabeled", x_unlabeled, bd)
        self._check_optimizers()
        check_shapes(x_l, y_labeled, x_u, bd)
        if self.baseline is not None and self.baseline_decay is not None:
            check_baseline_shape(self.baseline, x_l)
        t_l = teacher_view("teacher_x_labeled", teacher_x_labeled, x_l, bd)
        t_u = teacher_view("teacher_x_unlabeled", teacher_x_unlabeled, x_u, bd)
        if teacher_extra_inputs is None or isinstance(teacher_extra_inputs, Tensor | Mapping | str):
            # a tensor was taken row by row, each row a batch of its own
            raise DataError(
                "teacher_extra_inputs must be a list or tuple of batches, got a "
                f"{type(teacher_extra_inputs).__name__}: pass one batch x as [x]"
            )
        extras = [
            model_input(f"teacher_extra_inputs[{i}]", x, bd)
            for i, x in enumerate(teacher_extra_inputs)
        ]
        if extras and self.teacher_extra_loss is None:
            # their logits went nowhere, but their examples joined the teacher's batch (its
            # BatchNorm statistics, so its targets) without a word
            raise ConfigError(
                "teacher_extra_inputs are given, but no teacher_extra_loss reads their logits: "
                "pass teacher_extra_loss to MetaPseudoLabels, or leave the extra inputs out"
            )
        check_devices(self.teacher, self.student)
        # Every new size of x_l is tried for the exact step, which meets x_l only after the
        # student's step (the others before it: first_order's R_old, double_backward's
        # differentiable theta_{t+1}); the trial is invisible to the replayable student it needs.
        check_student_takes(
            self.student,
            (("x_labeled", x_l, self.estimator == "exact"), ("x_unlabeled", x_u, False)),
            y_labeled,
            lambda: self._autocast(module_device(self.student)),
            self._inputs_taken,
            bd,
        )
        # Class indices as int64: what gather and cross-entropy index with (int16 and uint8
        # labels passed the checks, then failed inside the loss after the student had moved).
        y_l = y_labeled.long()
        # Before the teacher's forward: a NaN in a batch would reach its BatchNorm statistics.
        label_range = None
        if self.check_inputs:
            label_range = check_values(y_l, (x_l, x_u, t_l, t_u, *extras))
        shapes = self._restore_point(label_range, (t_l, t_u, *extras, x_u))
        with self._undone_on_error():
            logits = self._teacher_forward(t_l, y_l, t_u, extras)
            check_learns(logits.unlabeled, "teacher")
            if label_range is not None:
                check_label_range(*label_range, logits.labeled.shape[-1])
                self._num_classes = logits.labeled.shape[-1]
            # The extra loss depends on the teacher's logits alone: computed (and checked) before
            # the student moves, so that a loss of the wrong kind fails with the models as they
            # were (the teacher's forward given back).
            extra = self._teacher_extra(logits)
            if self.step_count == 0 and self.check_inputs:  # one host sync, on the first step
                _check_teacher_finite(logits, extra)
            # Also before the student moves: with check_inputs=False a label beyond the classes
            # fails here, in the gather (on a CPU), instead of after the student's step.
            supervised = batch_mean(
                hard_cross_entropy(logits.labeled, y_l, self.label_smoothing), bd
            )
        targets = F.softmax(logits.unlabeled / self.temperature, dim=-1)

        if self.estimator == "exact":
            with self._student_precision(), differentiable_attention():
                mpl_term, metrics = self._exact_student_step(x_l, y_l, x_u, targets)
        elif self.estimator == "double_backward":
            with differentiable_attention():
                mpl_term, metrics = self._double_backward_student_step(x_l, y_l, x_u, targets)
        else:
            mpl_term, metrics = self._first_order_student_step(x_l, y_l, x_u, logits.unlabeled)

        teacher_loss = self.supervised_weight * supervised + self.mpl_weight * mpl_term
        if extra is not None:
            teacher_loss = teacher_loss + extra
            metrics["teacher_extra"] = extra.detach()
        self.teacher_optimizer.zero_grad(set_to_none=True)
        teacher_loss.backward()
        self._average([p.grad for p in self.teacher.parameters()])
        if self.teacher_max_grad_norm is not None:  # the same on every process: averaged
            teacher_grads = [p.grad for _, p in optimizer_params(self.teacher_optimizer)]
            clip_(teacher_grads, self.teacher_max_grad_norm)
        self.teacher_optimizer.step()
        self.step_count += 1
        self._shapes_checked.add(shapes)

        metrics.update(
            teacher_loss=teacher_loss.detach(),
            teacher_supervised=supervised.detach(),
            teacher_mpl=mpl_term.detach(),
        )
        return metrics

    def state_dict(self) -> dict:
        """The step's own state (counter, first-order baseline); the models and optimizers keep
        theirs."""
        return {"step_count": self.step_count, "baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`'s output; a state of another shape is a ConfigError with
        nothing changed (a missing key set the counter and then raised a KeyError; a baseline that
        is not a tensor failed in the next first-order step, after the student had moved)."""
        if not isinstance(state, Mapping) or set(state) != {"step_count", "baseline"}:
            raise ConfigError(  # (another key, a typo of one or another object's, was ignored)
                "MetaPseudoLabels.load_state_dict needs a dict with keys step_count and baseline, "
                "no others (from state_dict())"
            )
        count, baseline = state["step_count"], state["baseline"]
        if isinstance(count, Tensor) and count.numel() == 1 and not count.is_floating_point():
            count = int(count)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError(f"state_dict's step_count must be an integer >= 0, got {count!r}")
        if baseline is not None and not (
            isinstance(baseline, Tensor) and baseline.is_floating_point()
        ):
            raise ConfigError(
                f"state_dict's baseline must be None or a floating-point tensor, got {baseline!r}"
            )
        if baseline is not None and not bool(torch.isfinite(baseline).all()):
            # (a NaN baseline made the teacher NaN at the next first-order step, silently)
            raise ConfigError(f"state_dict's baseline must be finite, got {baseline!r}")
        self.step_count, self.baseline = count, baseline

    @property
    def jvp(self) -> str:
        """The ``jvp`` option: how the exact step computes J (held by :mod:`metapl.mpl.jvp`)."""
        return self._jvp_paths.mode

    @jvp.setter
    def jvp(self, mode: str) -> None:
        # the construction's checks: a typo ("tapee") or None ran as "auto", silently
        check_jvp(mode, self.estimator)
        self._jvp_paths.mode = mode

    @property
    def last_jvp_path(self) -> str | None:
        """``"tape"`` or ``"forward_ad"``: how the last exact step computed J (None before)."""
        return self._jvp_paths.last_path

    @property
    def jvp_fallback_reason(self) -> str | None:
        """Why J did not come from the tangent tape (None when it did, or was not asked to)."""
        return self._jvp_paths.fallback_reason

    def compile_student_tape(self, mode: str = "default") -> None:
        """``torch.compile`` the exact step's update pass where J comes from the tangent tape
        (``jvp`` "tape" or "auto"): the student's forward and backward on x_u run as compiled code
        (:meth:`metapl.mpl.tangent.TangentTape.compile`), the tangent pass and the labeled pass
        stay eager. The student module itself cannot be compiled for an exact estimator (a
        ConfigError), the tape's graph can. ``mode`` is torch.compile's, without CUDA graphs:
        ``"reduce-overhead"`` compiles as ``"default"`` and ``"max-autotune"`` as
        ``"max-autotune-no-cudagraphs"``, because a CUDA graph's next replay would overwrite
        the activations the tape keeps for the tangent pass. Its dropout draws eager
        PyTorch's random numbers, so a step is the eager one up to rounding. At a graph's first
        use the eager graph is checked against the module beside the pass, and the compiled
        pass's logits against the module's before its backward: one that differs or fails to
        compile runs eagerly from then on, with a MetaplWarning."""
        if self.estimator != "exact":
            raise ConfigError(
                f"compile_student_tape: estimator {self.estimator!r} has no tangent tape "
                "(the exact estimator's): compile the student itself instead"
            )
        if self.jvp == "forward_ad":  # (it would compile nothing, silently)
            raise ConfigError(
                "compile_student_tape: jvp='forward_ad' computes J without the tangent tape: "
                "pass jvp='auto' or jvp='tape' to MetaPseudoLabels"
            )
        if mode not in TAPE_COMPILE_MODES:
            raise ConfigError(
                f"compile_student_tape: mode must be one of {', '.join(TAPE_COMPILE_MODES)}, "
                f"got {mode!r}"
            )
        paths = self._jvp_paths
        paths.compile_mode = TAPE_COMPILE_MODES[mode]
        for entry in paths.tapes.values():
            if isinstance(entry, TangentTape):
                entry.compile(paths.compile_mode)

    @property
    def _tapes(self) -> dict[tuple, TangentTape | str]:
        """The traced students by module signature, or why not (read by tests)."""
        return self._jvp_paths.tapes

    # ------------------------------------------------------------------ before anything moves

    def _check_set_options(self) -> None:
        """The constructor's checks of the options again when one was set on the object since
        (``mpl.mpl_weight = ...`` for a warm-up is fine; ``mpl.temperature = 0`` is not)."""
        options = {name: getattr(self, name) for name in OPTIONS}
        checked = self._options_checked
        if all(options[n] is checked[n] or options[n] == checked[n] for n in OPTIONS):
            return
        check_options(self.teacher, self.student, options)
        self._options_checked = options
        # the models' and optimizers' checks depend on the estimator: run them again
        self._objects_checked = (None, None, None, None)

    def _check_replaced(self) -> None:
        """The construction's checks again for a model or optimizer set on the step object after
        it (``mpl.student_optimizer = NAdam(...)``): an optimizer of a class without an update
        rule failed mid-step, after both models' forwards had moved their running statistics."""
        objects = (self.teacher, self.student, self.teacher_optimizer, self.student_optimizer)
        if all(a is b for a, b in zip(objects, self._objects_checked, strict=True)):
            return
        check_models_and_optimizers(*objects, self.estimator, self.grad_sync)
        self._objects_checked = objects

    def _follow_student_optimizer(self) -> None:
        """The student's trainable parameters, named, in its optimizer's order: read again when
        the optimizer's parameters change (``add_param_group`` after construction), since w and
        the Appendix-B factors must cover exactly what the optimizer updates."""
        params = self._check_holdings("student")
        if params is None:
            return
        name_of = {id(p): n for n, p in self.student.named_parameters()}
        self._student_params = params
        self._student_names = [name_of[id(p)] for p in params]
        self._jvp_paths.set_trainable(params, self._student_names)  # drops the traced graphs

    def _check_holdings(self, who: str) -> list[Tensor] | None:
        """The parameters ``who``'s optimizer trains, checked again (the model's own, none shared
        with the other model) when they or the model's parameters changed since the last step,
        else None. The model's, too: a submodule replaced (``student.fc = nn.Linear(...)``) left
        the optimizer on the old one's parameters, and both exact estimators silently wrong; a
        parameter added to the teacher's optimizer that the models share moved the student's
        function where the step's gradient cannot see it."""
        model, optimizer = (
            (self.student, self.student_optimizer)
            if who == "student"
            else (self.teacher, self.teacher_optimizer)
        )
        params = [p for _, p in optimizer_params(optimizer)]
        # (with the flags: a shared frozen parameter unfrozen later is one an optimizer trains)
        ids = [(id(p), p.requires_grad) for p in params] + [(-1, False)]
        ids += [(id(p), p.requires_grad) for p in model.parameters()]
        if ids == self._holdings.get(who):
            return None
        check_owned(who, model, params)
        if who == "student" and self.estimator != "first_order":  # the first-order step reads no
            check_listed_once(model, params)  # update rule: torch's double update is its own
        check_unshared(self.teacher, self.student, (self.teacher_optimizer, self.student_optimizer))
        self._holdings[who] = ids
        return params

    def _check_student_update(self) -> None:
        """What the student's update must be for the step to be what it claims (every step:
        ``requires_grad`` and hooks can change after construction):
        metapl.mpl.student_checks.check_student_update."""
        check_student_update(
            self.student,
            self.student_optimizer,
            self._student_params,
            self.estimator,
            self.allow_student_hooks,
        )

    def _check_optimizers(self) -> None:
        """What would make either optimizer's step() fail in the middle of a step (the teacher's
        after the student's): metapl.mpl.update_rules.check_optimizer; its per-parameter part runs
        again only when the optimizer's state or flags change."""
        for who, model, optimizer in (
            ("student", self.student, self.student_optimizer),
            ("teacher", self.teacher, self.teacher_optimizer),
        ):
            checked = self._optimizers_checked.get(who)
            self._optimizers_checked[who] = check_optimizer(who, optimizer, model, checked)

    def _restore_point(
        self, label_range: tuple[int, int] | None, inputs: Sequence[ModelInput]
    ) -> tuple:
        """Save what the models' forwards move (this step's :class:`RestorePoint`) when their
        outputs may turn out wrong; returns the step's input shapes, to remember once it passed.

        Whether the highest label fits is known only from the teacher's logits, and whether each
        model gives one row of logits per example only from its outputs (a teacher that returns
        [2 * batch, C], or squeezes a batch of one to [C]): by then their BatchNorm statistics and
        the random stream have moved. They are saved when such an error can come: on the first
        step, for batches of sizes no step has passed with yet (a last, smaller batch), and for a
        label beyond the classes of the last step. Not every step: it copies every buffer of both
        models, a kernel launch each on a GPU (about a hundred for WRN-28-2). (Batch sizes, not
        whole shapes: a model's rows per example do not
        depend on a sequence's length, and variable lengths would save every step.)
        """
        shapes = tuple((x.structure, x.batch_shape) for x in inputs)
        labels_may_not_fit = label_range is not None and (
            self._num_classes is None or label_range[1] >= self._num_classes
        )
        self._restore = None
        if labels_may_not_fit or shapes not in self._shapes_checked:
            self._restore = RestorePoint((self.teacher, self.student))
        return shapes

    @contextlib.contextmanager
    def _undone_on_error(self):
        """Give back this step's :class:`RestorePoint` (if it has one) on a refusal from the
        block, or any other error (the caller's extra loss or a model's forward failing: an
        IndexError in ``teacher_extra_loss`` left the teacher's BatchNorm statistics moved): the
        block must run before any parameter or optimizer state moves."""
        try:
            yield
        except CompiledGraphRefused:
            raise  # (the exact step undoes the student's pass alone, and goes on)
        except Exception:
            if self._restore is not None:
                self._restore.restore()
            raise

    def _teacher_extra(self, logits: TeacherLogits) -> Tensor | None:
        """``teacher_extra_loss`` on the teacher's logits, if it is a scalar; else a ConfigError."""
        if self.teacher_extra_loss is None:
            return None
        extra = self.teacher_extra_loss(logits)
        if not isinstance(extra, Tensor) or extra.dim() != 0:
            shape = tuple(extra.shape) if isinstance(extra, Tensor) else type(extra).__name__
            raise ConfigError(
                f"teacher_extra_loss must return a scalar (0-d) tensor, got {shape}: "
                "reduce it (e.g. .mean()) in the loss"
            )
        if not extra.is_floating_point():  # a complex one failed in the teacher's backward,
            raise ConfigError(  # after the student had moved
                f"teacher_extra_loss must return a real floating-point tensor, got {extra.dtype}"
            )
        return extra

    # ------------------------------------------------------------------ processes and precision

    def _average(self, tensors) -> None:
        """Average across data-parallel processes (no-op without ``grad_sync``)."""
        if self.grad_sync is not None:
            self.grad_sync.mean_([t for t in tensors if t is not None])

    def _tf32_on(self) -> bool:
        return self.allow_tf32 and module_device(self.student).type == "cuda"

    def _student_precision(self):
        if self.allow_tf32:
            return contextlib.nullcontext()
        return tf32_disabled(module_device(self.student))

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ the models' passes

    def _teacher_forward(
        self, x_l: ModelInput, y_l: Tensor, x_u: ModelInput, extras: Sequence[ModelInput]
    ) -> TeacherLogits:
        """One teacher forward on all its inputs at once (BatchNorm sees them together, as in the
        paper's implementation); separate forwards only if the shapes cannot be concatenated."""

        def forward(x: ModelInput, what: str) -> Tensor:
            return check_rows(
                as_logits(x.call(self.teacher), "teacher"), x, "teacher", what, self.batch_dim
            )

        named = [("labeled", x_l), ("unlabeled", x_u)]
        named += [(f"teacher_extra_inputs[{i}]", x) for i, x in enumerate(extras)]
        with self._autocast(module_device(self.teacher)):
            outs = joint_forward(forward, named, self.batch_dim)
        outs = [upcast(o) for o in outs]
        return TeacherLogits(outs[0], outs[1], tuple(outs[2:]), y_l, self.step_count)

    @overload
    def _student_update(
        self,
        x_u: ModelInput,
        targets: Tensor,
        labeled: tuple[ModelInput, Tensor],
        tape: None = None,
    ) -> tuple[dict[str, Tensor], list[Tensor | None], Tensor]: ...

    @overload
    def _student_update(
        self,
        x_u: ModelInput,
        targets: Tensor,
        labeled: tuple[ModelInput, Tensor],
        tape: TangentTape,
        native: Tensor | None = None,
        update: UpdatePass | None = None,
    ) -> tuple[dict[str, Tensor], list[Tensor | None], TapeRecord]: ...

    def _student_update(
        self,
        x_u: ModelInput,
        targets: Tensor,
        labeled: tuple[ModelInput, Tensor],
        tape: TangentTape | None = None,
        native: Tensor | None = None,
        update: UpdatePass | None = None,
    ) -> tuple[dict[str, Tensor], list[Tensor | None], Tensor | TapeRecord]:
        """Forward+backward of the student on (x_u, targets), plus its labeled CE on ``labeled``
        when ``student_labeled_weight`` > 0; leaves the gradients in .grad. Returns the losses
        (metrics), the gradients and the x_u logits, or with a ``tape`` its record of the x_u
        pass (the same computation, keeping what the tangent pass needs). ``native``: the first
        use of a compiled tape, whose logits must be these (the module's, on ``update``'s random
        numbers and buffers); else, or where the compiled pass fails, CompiledGraphRefused
        before anything but the forward has moved."""
        # What fails here, before the backward (the student's own forward, what the logits'
        # checks refuse), comes with what the forwards moved given back.
        with self._undone_on_error():
            with self._autocast(module_device(self.student)):
                out: Tensor | TapeRecord
                if tape is None:
                    out = s_logits = as_logits(x_u.call(self.student), "student")
                elif native is None:
                    out = tape.record(x_u.args, x_u.kwargs)
                    s_logits = out.logits
                else:
                    assert update is not None  # (given with native)
                    out = _first_compiled_record(tape, x_u, native, update)
                    s_logits = out.logits
            check_same_classes(s_logits, targets)
            check_learns(s_logits, "student")
            unlabeled = batch_mean(soft_cross_entropy(upcast(s_logits), targets), self.batch_dim)
            losses = {"student_unlabeled": unlabeled.detach()}
            if self.student_labeled_weight > 0:
                # A pass of its own, after the x_u pass (whose random numbers J replays), with its
                # own batch statistics; the x_u pass alone updates the running statistics.
                labeled_state = self._labeled_state()
                labeled_loss = self._labeled_loss(*labeled, labeled_state).sum()
                losses["student_labeled"] = labeled_loss.detach()
        self.student_optimizer.zero_grad(set_to_none=True)
        if self.student_labeled_weight > 0:  # its own backward: a checkpoint's recompute must
            with holding(self.student, labeled_state):  # see the copies of the buffers too
                (self.student_labeled_weight * labeled_loss).backward()
        unlabeled.backward()
        grads = [p.grad for p in self._student_params]
        self._average(grads)  # before the optimizer (and the factors) read g
        return losses, grads, out

    def _labeled_state(self, weights: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The state of a labeled pass: copies of the student's buffers, so that its running
        statistics stay as they are, and its own parameters or ``weights`` (name -> tensor)."""
        return {**buffer_copies(self.student), **(weights or {})}

    def _labeled_loss(self, x_l: ModelInput, y_l: Tensor, state: dict[str, Tensor]) -> Tensor:
        """The student's per-member labeled CE with ``state`` (:meth:`_labeled_state`)."""
        with self._autocast(module_device(self.student)):
            s_logits = as_logits(x_l.functional_call(self.student, state), "student")
        check_rows(s_logits, x_l, "student", "x_labeled", self.batch_dim)
        return member_mean(hard_cross_entropy(upcast(s_logits), y_l), self.batch_dim)

    # ------------------------------------------------------------------ the estimators

    def _exact_student_step(
        self, x_l: ModelInput, y_l: Tensor, x_u: ModelInput, targets: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        device = module_device(self.student)
        params = self._student_params
        if not self._replay_checked:  # the first step: it has a restore point for the refusals
            with self._undone_on_error():
                check_finite_for_student_checks(x_u)
                check_replayable(self.student, x_u, self._autocast(device), self.autocast_dtype)
                check_derivatives(
                    self.student,
                    x_u,
                    lambda: self._autocast(device),
                    self._tf32_on(),
                    self._average,
                )
            self._replay_checked = True
        update_rng = RngState(device)
        # (tracing a new graph runs the forward: before the copies)
        tape = self._jvp_paths.tape(x_u.structure)
        # What J must replay of the update pass, with the buffers as the pass finds them: J must
        # differentiate that pass's function, and a buffer the forward both updates and reads (a
        # step counter, an EMA a layer normalizes with) is one step further after it (the
        # teacher's gradient was 8-20% off).
        update = UpdatePass(
            x_u,
            update_rng,
            buffer_copies(self.student),
            lambda: self._autocast(device),
            self._tf32_on(),
        )
        record = native = None
        if tape is not None and tape.compiled and x_u.structure not in tape.checked:
            # a compiled graph's first use: checked beside the pass, which then runs it
            native = self._jvp_paths.check_compiled(tape, update)
            tape = None if native is None else tape
        if tape is not None and native is not None:
            try:
                losses, grads, record = self._student_update(
                    x_u, targets.detach(), (x_l, y_l), tape, native, update
                )
            except CompiledGraphRefused as refused:
                # before the backward: only the pass's forward moved the student's buffers and
                # the random stream; the graph stays, eager (its first use below)
                restore_buffers(self.student, update.buffers)
                update.rng.restore()
                tape.uncompile()
                warnings.warn(
                    f"metapl: the student's compiled update pass is not used: {refused}; it "
                    "runs eagerly",
                    MetaplWarning,
                    stacklevel=3,
                )
        if tape is None or (x_u.structure not in tape.checked and not tape.compiled):
            losses, grads, s_logits = self._student_update(x_u, targets.detach(), (x_l, y_l))
            if tape is not None:  # first use of this graph with x_u's structure: record, compare
                record = self._jvp_paths.first_record(tape, s_logits, update)
                tape = None if record is None else tape
        elif native is None:  # a graph's later steps, compiled or not
            losses, grads, record = self._student_update(x_u, targets.detach(), (x_l, y_l), tape)
        if any(g is not None and g.layout != torch.strided for g in grads):
            raise ConfigError(SPARSE_GRADIENTS.format("a sparse gradient from the update pass"))
        clip = clip_(grads, self.student_max_grad_norm)  # the factors are the clipped g's
        factors = update_factors(self.student_optimizer, params, grads)
        # theta_t, for J after the step moves the parameters in place: copied only now, so that
        # the copy is not held through the update pass's backward, where the step's memory peaks.
        with torch.no_grad():  # (copies without a graph, no detach of each)
            theta_t = clones(list(params))
        self.student_optimizer.step()

        # v = grad of R at theta_{t+1}; w = (dU/dg)^T v (diagonal), times clip's Jacobian.
        labeled_after, v = self._labeled_gradient(x_l, y_l)
        self._average(v)
        w = times_factors(factors, v)
        if clip is not None:  # v and g are averaged already: <g, f v> is the same on every process
            w = clip.jacobian_times(grads, w)
        tangents = {
            name: wi.to(p.dtype)
            for name, p, wi in zip(self._student_names, theta_t, w)
            if wi is not None
        }

        # J = d/de log p_{theta_t + e w}(x_u): the same function as the update pass.
        if tape is not None:
            assert record is not None  # the tape is kept only with its record of the x_u pass
            jvp = self._jvp_paths.from_tape(tape, record, theta_t, tangents, update)
        else:
            jvp = self._jvp_paths.forward_ad(theta_t, tangents, update)
        if jvp is None:  # nothing the student learns from x_u changes its labeled loss
            jvp = torch.zeros_like(targets)
        # <g(Psi), w> with J constant: its gradient in Psi is exactly grad_Psi R(theta_{t+1}).
        mpl_term = batch_mean(-(targets * jvp.detach()).sum(dim=-1), self.batch_dim)
        return mpl_term, {**losses, "student_labeled_after": labeled_after.detach().sum()}

    def _labeled_gradient(self, x_l: ModelInput, y_l: Tensor) -> LabeledResult:
        """The student's per-member labeled loss at its parameters (theta_{t+1} in the exact
        step) and v, its gradient; from a CUDA graph with ``labeled_cuda_graph``."""
        params = self._student_params

        def labeled_pass(x: ModelInput, y: Tensor) -> LabeledResult:
            weights, wrt = None, params
            if self.labeled_cuda_graph:
                weights = leaf_aliases(self.student)
                wrt = [weights[name] for name in self._student_names]
            state = self._labeled_state(weights)
            loss = self._labeled_loss(x, y, state)
            with holding(self.student, state):  # a checkpoint's recompute: on the copies too
                return loss, self._grad_of_trainable(loss.sum(), wrt)

        if not self.labeled_cuda_graph:
            return labeled_pass(x_l, y_l)
        key = pass_key(self.student, params, x_l, y_l, self.autocast_dtype)
        return self._labeled_graph(labeled_pass, key, x_l, y_l)

    @property
    def last_labeled_path(self) -> str | None:
        """How the last exact step ran its labeled pass: "graph", "eager" (the first step of a
        batch shape, or a pass that could not be captured), or None without labeled_cuda_graph."""
        return self._labeled_graph.last_path if self.labeled_cuda_graph else None

    @staticmethod
    def _grad_of_trainable(
        loss: Tensor, params: list[Tensor], create_graph: bool = False
    ) -> list[Tensor | None]:
        """d loss / d p for the parameters that require grad, None for the others: a parameter
        frozen after construction (still in the optimizer) gets no gradient, so the optimizer does
        not move it and its factor is 0 (autograd.grad used to fail on it, after the student's
        step)."""
        trainable = [p for p in params if p.requires_grad]
        found = iter(
            torch.autograd.grad(loss, trainable, create_graph=create_graph, allow_unused=True)
        )
        return [next(found) if p.requires_grad else None for p in params]

    def _double_backward_student_step(
        self, x_l: ModelInput, y_l: Tensor, x_u: ModelInput, targets: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The exact gradient by a second-order graph (docs/design.md §1's oracle, as a step).

        g is kept as a function of the teacher's targets (``create_graph``), theta_{t+1} = U(g)
        through a differentiable copy of the optimizer's rule, and dR(theta_{t+1})/d targets is
        taken through the student's backward, before the student's real step (an operation
        without a second derivative fails with nothing moved). The MPL term is R with that
        gradient on the targets. Random numbers are drawn in the same order as the exact step
        (update pass, then the labeled pass), so both see the same dropout masks and give the
        same teacher update.
        """
        device = module_device(self.student)
        params = self._student_params
        # The graph is built on copies of theta_t, which nothing writes in place (optimizer.step()
        # writes the parameters), with the module's own buffers (running statistics update once).
        # A frozen parameter (requires_grad off, still in the optimizer) stays a constant: the
        # real step does not move it (it moved in this graph: 2% off the real teacher gradient).
        theta_t = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
        unlabeled_state = dict(zip(self._student_names, theta_t))
        # Nothing moves but the forwards' buffers and random numbers until the real step below:
        # what fails (the student's forward) or the checks refuse (on x_u, on x_l, a missing
        # second derivative) comes with those given back. Hence R(theta_{t+1}) and its gradient
        # before the real step (which draws no random numbers).
        with self._undone_on_error():
            with self._autocast(device):
                s_logits = as_logits(x_u.functional_call(self.student, unlabeled_state), "student")
            check_same_classes(s_logits, targets)
            check_learns(s_logits, "student")
            unlabeled = batch_mean(soft_cross_entropy(upcast(s_logits), targets), self.batch_dim)
            losses = {"student_unlabeled": unlabeled.detach()}
            grads = self._grad_of_trainable(unlabeled, theta_t, create_graph=True)
            if self.student_labeled_weight > 0:  # as _student_update: own pass and backward
                state = self._labeled_state(unlabeled_state)
                labeled_loss = self._labeled_loss(x_l, y_l, state).sum()
                losses["student_labeled"] = labeled_loss.detach()
                with holding(self.student, state):
                    labeled_grads = self._grad_of_trainable(
                        self.student_labeled_weight * labeled_loss, theta_t, create_graph=True
                    )
                grads = [_added(g, h) for g, h in zip(grads, labeled_grads)]
            if self._restore is not None:  # first use of these shapes: a graph walk, not per step
                check_double_backward_student(self.student, params, theta_t, s_logits)
                check_second_derivatives(grads, s_logits)
                with holding(self.student, {**buffer_copies(self.student), **unlabeled_state}):
                    check_gradient_derivative(  # (a checkpoint's recompute: on copies of buffers)
                        grads,
                        theta_t,
                        targets,
                        lambda d: batch_mean(
                            soft_cross_entropy(upcast(s_logits), d), self.batch_dim
                        ),
                        tolerance(s_logits.dtype, _tf32_allowed(device)),
                    )
            if self.student_max_grad_norm is not None:  # differentiably, as the real step's
                grads = NormClip.of(grads, self.student_max_grad_norm).apply(grads)
            theta_next = reference_update(self.student_optimizer, grads)  # reads the state first
            after_state = self._labeled_state(dict(zip(self._student_names, theta_next)))
            labeled_after = self._labeled_loss(x_l, y_l, after_state).sum()
            with holding(self.student, after_state):
                grad_targets = grad_to_targets(labeled_after, targets)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.detach()
        self.student_optimizer.step()
        # R's value, and R's gradient in the teacher's parameters through the targets.
        mpl_term = labeled_after.detach() + (grad_targets * (targets - targets.detach())).sum()
        return mpl_term, {**losses, "student_labeled_after": labeled_after.detach()}

    def _first_order_student_step(
        self, x_l: ModelInput, y_l: Tensor, x_u: ModelInput, teacher_logits_u: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """REINFORCE with the first-order reward (later versions of the paper, docs/design.md §2).

        The student learns sampled hard labels y_hat ~ q; the teacher's term is
        advantage * sum_i CE(y_hat_i, teacher(x_u)_i) with advantage = (R_old - R_new) - baseline:
        its expectation is the first-order approximation of the exact gradient. Labels that
        lowered the student's labeled loss become more likely. The same labels feed both models,
        and R_old and R_new see the same dropout mask, so h measures the update alone.
        """
        device = module_device(self.student)
        probs = F.softmax(teacher_logits_u.detach() / self.temperature, dim=-1)
        # validate_args=False: the check of probs is a host sync every step (softmax is valid)
        sampled = torch.distributions.Categorical(probs=probs, validate_args=False).sample()
        labeled_rng = RngState(device)
        with torch.no_grad(), self._undone_on_error():
            before = self._labeled_loss(x_l, y_l, self._labeled_state())
        losses, grads, _ = self._student_update(
            x_u, F.one_hot(sampled, probs.shape[-1]).to(probs.dtype), (x_l, y_l)
        )
        clip_(grads, self.student_max_grad_norm)  # R_new is after the step the student takes
        self.student_optimizer.step()
        with torch.no_grad(), replayed_rng(labeled_rng):
            after = self._labeled_loss(x_l, y_l, self._labeled_state())
        self._average([before, after])  # R over the whole (all processes') labeled batch
        reward = before - after  # old minus new: positive when the update helped
        advantage = reward
        if self.baseline_decay is not None:
            if self.baseline is None:
                self.baseline = torch.zeros_like(reward)
            # (a resumed baseline comes from a checkpoint loaded on the CPU)
            self.baseline = self.baseline.to(reward.device)
            advantage = reward - self.baseline
            self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * reward
        # REINFORCE over the batch of labels: log q(y_hat) = sum_i log q(y_hat_i | x_i), a *sum*
        # over examples, so that the expectation matches grad R(theta_{t+1}) in size, not only in
        # direction (a batch mean would shrink it by 1 / len(x_u)).
        log_q_sum = hard_cross_entropy(teacher_logits_u / self.temperature, sampled).sum(
            dim=self.batch_dim
        )
        if self.grad_sync is not None:  # a sum over all processes' examples, averaged back later
            log_q_sum = log_q_sum * self.grad_sync.world_size
        mpl_term = (advantage.detach() * log_q_sum).sum()
        return mpl_term, {
            **losses,
            "student_labeled_before": before.sum(),
            "student_labeled_after": after.sum(),
            "advantage": advantage.detach().sum(),
        }


def _first_compiled_record(
    tape: TangentTape, x_u: ModelInput, native: Tensor, update: UpdatePass
) -> TapeRecord:
    """The first pass of a compiled tape (its compile included), held to the module's logits."""
    try:
        record = tape.record(x_u.args, x_u.kwargs)
    except Exception as e:  # noqa: BLE001  (dynamo, inductor or a kernel: the eager graph serves)
        raise CompiledGraphRefused(f"it fails ({type(e).__name__}: {first_line(e)})") from e
    why = JvpPaths.compiled_logits_differ(record.logits, native, update)
    if why is not None:
        raise CompiledGraphRefused(why)
    return record


def _check_teacher_finite(logits: TeacherLogits, extra: Tensor | None) -> None:
    """A ConfigError when the teacher's logits (its inputs finite: checked before) hold NaN or
    +Inf, or its extra loss is not finite. A teacher with a NaN weight made every parameter of the
    student NaN at the first step, silently (the student's own logits are checked on its first
    exact step). -Inf logits pass: a class masked out has probability 0 in the targets."""
    parts = [logits.labeled, logits.unlabeled]
    sound = [~(torch.isnan(t) | torch.isposinf(t)).any() for t in (p.detach() for p in parts)]
    if extra is not None:
        sound.append(torch.isfinite(extra.detach()).all())
    ok = torch.stack(sound)
    if not bool(ok.all()):
        what = "teacher_extra_loss is" if bool(ok[:2].all()) else "the teacher's logits hold"
        raise ConfigError(
            f"{what} NaN or Inf, though the inputs are finite: the teacher's parameters or "
            "buffers may hold NaN or Inf (a run that diverged?), or its forward overflows"
        )


def _tf32_allowed(device: torch.device) -> bool:
    """Whether the double-backward step's passes may use TF32 (it keeps torch's settings)."""
    cuda = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    return device.type == "cuda" and cuda


def _added(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a + b, where None (no gradient) is 0."""
    return b if a is None else a if b is None else a + b
