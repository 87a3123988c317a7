"""J, the student's JVP on x_u, for the exact step: by forward-mode AD or from the tangent tape.

J = d/de log p_{theta_t + e w}(x_u) must differentiate the very function of the student's update
pass (:class:`UpdatePass`: its input, its random numbers, its buffers as it found them, its
precision). Two paths give the same value:

- forward-mode AD (``torch.autograd.forward_ad``): the student's forward again, on dual tensors;
- the tangent tape (:mod:`metapl.mpl.tangent`): the update pass runs as a traced graph that keeps
  its activations, and J is a tangent-only pass over them.

:class:`JvpPaths` keeps one step object's traced graphs (one per :func:`module_signature`: modes,
modules, attributes) and decides when to trust one: its first record is compared with the module's
own logits and its backward with the module's (the record pass trains the student), its first J
with forward AD's, each once per input structure (way of calling the student). A graph that fails
or differs is given up for forward AD for that structure (``jvp="auto"``, with a warning once; a
random operation without a tangent gives it up for all) or is a ConfigError (``jvp="tape"``).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn

from metapl.errors import ConfigError, MetaplWarning
from metapl.losses import upcast
from metapl.mpl.batch_checks import as_logits
from metapl.mpl.dual import dual_level
from metapl.mpl.inputs import ModelInput, holding
from metapl.mpl.replay import (
    RngState,
    buffer_copies,
    module_device,
    replayed_rng,
    restore_buffers,
)
from metapl.mpl.student_checks import forward_ad_error
from metapl.mpl.tangent import (
    TangentTape,
    TapeRecord,
    TapeUnsupportedError,
    module_signature,
    relative_error,
    tolerance,
)

MAX_TAPES = 8  # traced students kept per step object (one per set of modes/attributes seen)


@dataclass
class UpdatePass:
    """The student's update pass on x_u, as J must replay it: its input, the random numbers it
    drew, the buffers as it found them (a buffer the forward both updates and reads is one step
    further after it), its autocast (a fresh context each call) and whether TF32 was on."""

    x_u: ModelInput
    rng: RngState
    buffers: dict[str, Tensor]
    autocast: Callable[[], contextlib.AbstractContextManager]
    tf32: bool


class JvpPaths:
    """The exact step's ways to J for one student: ``mode`` is the step's ``jvp`` option.

    Holds the student's trainable parameters and their names (:meth:`set_trainable`, in its
    optimizer's order), the traced graphs, and, for the step's API, ``last_path`` ("tape" or
    "forward_ad", after an exact step) and ``fallback_reason`` (why J did not come from the tape).
    """

    def __init__(self, student: nn.Module, mode: str):
        self.student = student
        self.mode = mode
        self.params: list[Tensor] = []
        self.names: list[str] = []
        # Traced students by module_signature (modes, modules, parameters), or why not.
        self.tapes: dict[tuple, TangentTape | str] = {}
        # torch.compile's mode for the tapes' record passes (TangentTape.compile), or None: eager
        self.compile_mode: str | None = None
        self.last_path: str | None = None
        self.fallback_reason: str | None = None

    def set_trainable(self, params: list[Tensor], names: list[str]) -> None:
        """The parameters the student's optimizer updates, named, in its order."""
        self.params, self.names = params, names
        self.tapes.clear()  # traced with the old set of trainable parameters

    def tape(self, structure: Hashable | None = None) -> TangentTape | None:
        """The traced student for its current modes, or None (forward AD) when it has none or
        has failed for the call ``structure`` (:attr:`ModelInput.structure`) before."""
        if self.mode == "forward_ad":
            return None
        key, why = module_signature(self.student)
        if why is None:
            assert key is not None  # module_signature gives a key or a reason
            entry = self.tapes.get(key)
            if entry is None:
                entry = self._trace()
                if len(self.tapes) >= MAX_TAPES:  # a key that changes every step: keep a few
                    self.tapes.pop(next(iter(self.tapes)))
                self.tapes[key] = entry
            if isinstance(entry, TangentTape):
                why = entry.failed.get(structure)
                if why is None:
                    self.fallback_reason = None
                    return entry
            else:
                why = entry
        self._give_up(why)
        return None

    def _trace(self) -> TangentTape | str:
        """A new traced student, or why it cannot have one."""
        # fx runs the forward on proxies, but a buffer it reads by attribute is a real
        # tensor: a forward that updates one (a step counter) updates it while tracing,
        # and the graph holds the value it had then, never updated again (the student
        # trained on a stale copy of its forward, the teacher's gradient 15% off).
        # Likewise a call that takes no proxy (noise of a fixed shape, torch.randn(6)) runs for
        # real and draws from the global stream: between the step's snapshot of the stream and
        # the update pass, so that J replayed other random numbers than the pass drew (the
        # teacher's gradient 4-32% off at a graph's first step). The trace gives them back.
        saved = buffer_copies(self.student)
        entry: TangentTape | str
        try:
            with replayed_rng(RngState(module_device(self.student))):
                entry = TangentTape(self.student, self.params)
            if self.compile_mode is not None:  # (compiles at its first record)
                entry.compile(self.compile_mode)
        except TapeUnsupportedError as e:
            entry = str(e)
        finally:
            changed = [
                n
                for n, b in self.student.named_buffers()
                if n in saved and not torch.equal(b, saved[n])
            ]
            restore_buffers(self.student, saved)
        if changed:
            entry = f"its forward updates the buffer {changed[0]!r} outside fx's graph"
        return entry

    def _give_up(
        self, why: str, tape: TangentTape | None = None, structure: Hashable | None = None
    ) -> None:
        """Forward AD from now on for this traced graph, or only for its calls of ``structure``
        (``jvp="tape"``: a ConfigError). A graph that fails one way of calling it (an argument
        left out that the forward tests for None) may serve the others: each is checked on its
        own first use anyway."""
        if tape is not None and structure is not None:
            tape.failed[structure] = why
        elif tape is not None:
            self.tapes[tape.key] = why
        self.fallback_reason = why
        if self.mode == "tape":
            raise ConfigError(
                f"jvp='tape': the student cannot use the tangent tape: {why}; "
                "use jvp='auto' (falls back to forward-mode AD) or jvp='forward_ad'"
            )
        if tape is not None:  # a surprise after tracing succeeded: say so once
            # stacklevel 4: past first_record or from_tape and the exact step, to its caller
            warnings.warn(
                f"metapl: the exact step uses forward-mode AD: {why}", MetaplWarning, stacklevel=4
            )

    def first_record(
        self, tape: TangentTape, s_logits: Tensor, update: UpdatePass
    ) -> TapeRecord | None:
        """The first use of a traced graph: the module itself has just run the update pass; run the
        graph on the same random numbers (copies of the buffers) and compare, so that a graph that
        computes something else (Python state fx baked in) never trains the student.

        With autograd on, as the later steps' records: BatchNorm's forward then saves its batch
        statistics, which the tangent pass reads (:func:`metapl.mpl.tangent_ops.saved_bn_stats`);
        without them it computes them again, equal up to rounding only, and a run resumed from a
        checkpoint (its first step a first use) was no longer bit for bit the uninterrupted one."""
        x_u = update.x_u
        structure = x_u.structure
        try:
            # (quiet: fx prints the generated code's traceback to stderr when a graph fails)
            with (
                replayed_rng(update.rng),
                torch.enable_grad(),
                update.autocast(),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                record = tape.record(x_u.args, x_u.kwargs, buffers=tape.buffer_copies())
        except Exception as e:  # noqa: BLE001  (any failure means: not this graph)
            self._give_up(f"the traced student fails ({type(e).__name__}: {e})", tape, structure)
            return None
        return record if self._agrees(tape, record.logits, s_logits, update) else None

    def check_compiled(self, tape: TangentTape, update: UpdatePass) -> Tensor | None:
        """The first use of a compiled tape (:meth:`TangentTape.compile`) for a way of calling
        it, before the update pass: the module and the eager graph run beside the pass, on its
        random numbers and copies of its buffers, and are compared as :meth:`first_record`
        compares them. Returns the module's logits, which the compiled pass must then give
        (``compiled_logits_differ``), or None, having given the graph up (the module runs the
        pass). The update pass runs compiled from its first step, not as the module's pass as with
        an eager tape: a run resumed from a checkpoint starts with a first use, and only so is it
        bit for bit the uninterrupted run."""
        x_u = update.x_u

        def beside(forward: Callable[[dict[str, Tensor]], Tensor]) -> Tensor:
            buffers = {n: b.clone() for n, b in update.buffers.items()}
            with (
                replayed_rng(update.rng),
                torch.no_grad(),
                update.autocast(),
                contextlib.redirect_stderr(io.StringIO()),  # (as first_record)
            ):
                return forward(buffers)

        native = beside(lambda b: as_logits(x_u.functional_call(self.student, b), "student"))
        try:
            traced = beside(
                lambda b: (
                    tape.record(
                        x_u.args,
                        x_u.kwargs,
                        buffers={n: b[n] for n in tape.buffer_names() if n in b},
                    ).logits
                )
            )
        except Exception as e:  # noqa: BLE001  (as first_record)
            self._give_up(
                f"the traced student fails ({type(e).__name__}: {e})", tape, x_u.structure
            )
            return None
        return native if self._agrees(tape, traced, native, update) else None

    @staticmethod
    def compiled_logits_differ(logits: Tensor, native: Tensor, update: UpdatePass) -> str | None:
        """Why the compiled pass's logits are not the module's (``native``, from
        :meth:`check_compiled` on the same random numbers and buffers), or None."""
        err = relative_error(logits, native)
        if err <= tolerance(native.dtype, update.tf32):
            return None
        return f"its logits differ from the module's (relative error {err:.2e})"

    def _agrees(
        self, tape: TangentTape, traced: Tensor, native: Tensor, update: UpdatePass
    ) -> bool:
        """Whether the graph's logits (``traced``) are the module's (``native``) and its backward
        is the module's, up to :func:`tolerance`; else it gives the graph up for this call."""
        structure = update.x_u.structure
        err = relative_error(traced, native)
        if not err <= tolerance(native.dtype, update.tf32):
            self._give_up(
                f"the traced student's logits differ from the module's (relative error {err:.2e})",
                tape,
                structure,
            )
            return False
        try:
            err = self._backward_difference(tape, update)
        except Exception as e:  # noqa: BLE001  (as first_record)
            self._give_up(
                f"the traced student's backward fails ({type(e).__name__}: {e})", tape, structure
            )
            return False
        if not err <= tolerance(native.dtype, update.tf32):
            self._give_up(
                "the traced student's backward differs from the module's (relative error "
                f"{err:.2e}: a custom autograd.Function or checkpoint that fx traced through?)",
                tape,
                structure,
            )
            return False
        return True

    def _backward_difference(self, tape: TangentTape, update: UpdatePass) -> float:
        """How far the traced graph's backward is from the module's: the gradient of <u, logits>
        for a random u, both on the update pass's random numbers and buffers.

        The record pass *is* the student's update pass, so its backward trains the student. fx
        traces through a custom ``autograd.Function`` (and ``torch.utils.checkpoint``) into the
        operations of its forward, so the graph's backward is autograd's derivative of those, not
        the Function's own: a straight-through estimator's identity became its forward's derivative, and a
        reentrant checkpoint that gives its layers no gradient gave them one (the student trained
        another way than without the tape, the teacher's gradient 14% off at the second step).
        Equal logits and J cannot see it: only a backward can.
        """
        trainable = [p for p in self.params if p.requires_grad]

        def gradient(forward: Callable[[dict[str, Tensor]], Tensor]) -> Tensor:
            buffers = {n: b.clone() for n, b in update.buffers.items()}
            with replayed_rng(update.rng), update.autocast():
                logits = upcast(forward(buffers))
            own = torch.Generator().manual_seed(0)  # one u for both; the global stream untouched
            u = torch.randn(logits.shape, generator=own, dtype=torch.float64).to(logits)
            grads: Sequence[Tensor | None] = [None] * len(trainable)
            if logits.requires_grad:  # (a graph that detaches its logits reaches nothing)
                with holding(self.student, buffers):  # a checkpoint's recompute: on the copies
                    grads = torch.autograd.grad((logits * u).sum(), trainable, allow_unused=True)
            return torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(trainable, grads)
                ]
            )

        x_u = update.x_u
        native = gradient(lambda b: as_logits(x_u.functional_call(self.student, b), "student"))
        traced = gradient(
            lambda b: (
                tape.record(
                    x_u.args, x_u.kwargs, buffers={n: b[n] for n in tape.buffer_names() if n in b}
                ).logits
            )
        )
        return relative_error(traced, native)

    def forward_ad(
        self, theta_t: list[Tensor], tangents: dict[str, Tensor], update: UpdatePass
    ) -> Tensor | None:
        """J by forward-mode AD: the student's forward again, on dual tensors, with the update
        pass's random numbers replayed and its ``buffers``, the step's copies of the buffers the
        update pass started from. This pass may update them: every path of a step runs it at most
        once. Sets ``last_path``."""
        self.last_path = "forward_ad"
        with dual_level(), replayed_rng(update.rng), update.autocast():
            weights = {
                n: fwad.make_dual(p, tangents[n]) if n in tangents else p
                for n, p in zip(self.names, theta_t)
            }
            try:
                out = update.x_u.functional_call(self.student, {**update.buffers, **weights})
            except NotImplementedError as e:
                # An op PyTorch cannot push a tangent through (spectral_norm's normalize, ops
                # with out=): check_derivatives finds it before the first step; one that only a
                # later step's forward takes ends here.
                error = forward_ad_error(e)
                if error is None:
                    raise
                raise ConfigError(
                    f"{error} This step has moved the student, not the teacher's parameters"
                ) from None
            log_p = F.log_softmax(upcast(as_logits(out, "student")), dim=-1)
            return fwad.unpack_dual(log_p).tangent

    def from_tape(
        self,
        tape: TangentTape,
        record: TapeRecord,
        theta_t: list[Tensor],
        tangents: dict[str, Tensor],
        update: UpdatePass,
    ) -> Tensor | None:
        """J from the record: tangents only; forward AD (from now on) if that fails. Sets
        ``last_path``. The first J of a graph for each input structure is also computed by
        forward AD and compared."""
        self.last_path = "forward_ad"  # until the tape has given J
        structure = update.x_u.structure
        theta = {id(p): th for p, th in zip(self.params, theta_t)}
        tw = {id(p): tangents[n] for p, n in zip(self.params, self.names) if n in tangents}
        try:
            with torch.no_grad(), update.autocast():
                d_logits = tape.tangent(record, theta, tw, release=True)
                jvp = None
                if d_logits is not None:  # d log_softmax(z) from dz, as forward AD does it
                    with dual_level():
                        dual = fwad.make_dual(record.logits.detach(), d_logits)
                        log_p = F.log_softmax(upcast(dual), dim=-1)
                        jvp = fwad.unpack_dual(log_p).tangent
        except TapeUnsupportedError as e:  # a generic op drew random numbers: the whole graph
            self._give_up(str(e), tape)
            return self.forward_ad(theta_t, tangents, update)
        except Exception as e:  # noqa: BLE001
            if structure in tape.checked:
                raise
            self._give_up(f"the tangent pass fails ({type(e).__name__}: {e})", tape, structure)
            return self.forward_ad(theta_t, tangents, update)
        if structure not in tape.checked:  # first use: J as forward AD's, or not this graph
            ref = self.forward_ad(theta_t, tangents, update)
            zero = torch.zeros(())
            err = relative_error(zero if jvp is None else jvp, zero if ref is None else ref)
            if math.isnan(err) and ref is not None and not bool(torch.isfinite(ref).all()):
                # forward AD's J is not finite either (a NaN loss follows, which the caller
                # names): no verdict on the tape, whose check waits for a step with numbers
                return ref
            if not err <= tolerance(record.logits.dtype, update.tf32):
                reason = f"the tangent pass differs from forward-mode AD (relative error {err:.2e})"
                self._give_up(reason, tape, structure)
                return ref
            tape.checked.add(structure)
        self.last_path = "tape"
        return jvp
