"""What a student must be for the exact step's teacher gradient to be the real one.

The exact step differentiates the student's update g -> U(g) by the rule of the optimizer's class
(Appendix B), and computes J by running the student's forward again with torch's global random
numbers replayed. Two kinds of student break that silently, so the step refuses them:

- hooks that change the update where neither the factors nor J can see them (:func:`update_hook`);
- a forward that draws random numbers the step cannot replay (:func:`check_replayable`).

And some fail loudly, but only after the student has moved: a forward with an operation that
forward-mode AD cannot push a tangent through (:func:`check_derivatives` finds it first), and a
batch the student cannot take (of a dtype or device, of one example under BatchNorm) or on which
its logits are not one row per example (:func:`check_student_takes`).

:func:`check_student_update` refuses such hooks every step, with a student that has nothing to
learn and one whose embeddings an exact estimator cannot differentiate (:func:`embedding_problem`).
A forward that writes its parameters in place (:data:`WRITES_PARAMETERS`) or reads one other than
through its module (:func:`parameter_outside_call`) is refused by the exact step's checks here and
by the double-backward step's in :mod:`metapl.mpl.double_backward_checks`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from metapl.errors import ConfigError, DataError, first_line
from metapl.losses import upcast
from metapl.mpl.batch_checks import as_logits, check_learns, check_rows
from metapl.mpl.dual import dual_level
from metapl.mpl.inputs import ModelInput, holding
from metapl.mpl.replay import RngState, buffer_copies, module_device, replayed_rng
from metapl.mpl.tangent import relative_error, tolerance


def update_hook(model: nn.Module, optimizer: torch.optim.Optimizer, params) -> str | None:
    """A hook that can change the student's update behind the Appendix-B rule, or None.

    A hook on a parameter's gradient, a module backward hook or an optimizer step hook (gradient
    clipping, a max-norm projection, per-class reweighting) changes g or U where neither the
    factors nor J can see it: the teacher's gradient was 5-46% off, silently. Global optimizer
    *post* hooks are not checked: ``import torch.profiler`` installs one.
    """
    for p in params:
        if getattr(p, "_backward_hooks", None):
            return "a gradient hook on one of its parameters (Tensor.register_hook)"
        if getattr(p, "_post_accumulate_grad_hooks", None):
            return "a post-accumulate-grad hook on one of its parameters"
    for name, m in model.named_modules():
        if getattr(m, "_backward_hooks", None) or getattr(m, "_backward_pre_hooks", None):
            return f"a backward hook on its module {name or type(m).__name__!r}"
    from torch.nn.modules import module as nn_module
    from torch.optim import optimizer as optim_module

    if nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks:
        return "a global module backward hook (register_module_full_backward_hook)"
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return "a step hook on its optimizer (register_step_pre_hook / register_step_post_hook)"
    if optim_module._global_optimizer_pre_hooks:
        return "a global optimizer step pre-hook (register_optimizer_step_pre_hook)"
    return None


# double_backward is named first: it is exact for a sparse student (docs/library.md), and the
# message used to offer only the first-order estimator.
SPARSE_GRADIENTS = (
    "the student's gradients are sparse ({}): the exact estimator's J needs dense ones (forward "
    "AD takes no sparse tangent); use sparse=False, estimator='double_backward' (the same exact "
    "gradient, through the sparse one) or estimator='first_order'"
)


EMBEDDING_BAG = (
    "the student's module {!r} is an nn.EmbeddingBag: torch has neither forward-mode AD for "
    "embedding_bag (the exact estimator's J) nor its second derivative (double_backward's "
    "graph), so no exact teacher gradient goes through it; compute the bags with nn.Embedding "
    "and a sum / mean / max over their positions (the same function, which both exact "
    "estimators run), or use estimator='first_order'"
)

EMBEDDING_MAX_NORM = (
    "the student's module {!r} is an nn.Embedding with max_norm: its forward renormalizes rows "
    "of its weight in place, which autograd does not see and every extra pass of an exact step "
    "repeats; drop max_norm and renormalize after each step (torch.embedding_renorm_ on the "
    "weight under torch.no_grad()), or use estimator='first_order' (its labeled passes "
    "renormalize the rows x_labeled reads, as any forward does)"
)
EMBEDDING_FREQ = (
    "the student's module {!r} is an nn.Embedding with scale_grad_by_freq: its backward divides "
    "a row's gradient by the row's count in the batch, which is not its forward's derivative, "
    "so neither exact estimator gets R's gradient; drop the option or use "
    "estimator='first_order'"
)


COMPILED = (
    "the student's module {!r} is torch.compile'd: its compiled backward can be neither run "
    "twice on one graph (torch's donated buffers) nor differentiated again, and forward-mode AD "
    "does not go through inductor's kernels, so no exact estimator takes it (torch's own "
    "RuntimeError came instead); pass the student uncompiled (compiling the teacher is fine), or "
    "use estimator='first_order'"
)


def compiled_module(student: nn.Module) -> str | None:
    """The name of the student's first torch.compile'd module (``torch.compile(module)``, whose
    wrapper holds the original as ``_orig_mod``, or ``module.compile()``), or None."""
    for name, m in student.named_modules():
        if isinstance(getattr(m, "_orig_mod", None), nn.Module):
            return name
        if getattr(m, "_compiled_call_impl", None) is not None:
            return name
    return None


def embedding_problem(student: nn.Module, estimator: str) -> str | None:
    """Why the exact ``estimator`` cannot differentiate the student's embeddings, or None.

    An nn.EmbeddingBag stops both exact estimators (double backward failed after the student's
    step: "the derivative for '_embedding_bag_backward' is not implemented"). A sparse
    nn.Embedding stops the exact (JVP) estimator only: forward AD cannot take the sparse tangent
    w (make_dual failed after the student's step). Double backward is exact with one: its sparse
    gradient's graph is differentiable, and its teacher gradient equals the JVP estimator's with
    a dense embedding and central finite differences of the real step (1e-10, float64;
    tests/test_step_usage.py); the optimizers that take sparse gradients (SGD) are checked by
    metapl.mpl.update_rules.check_optimizer.

    Two options of nn.Embedding stop both: ``max_norm`` (its forward renormalizes the rows it
    reads in the weight itself, in place, where autograd does not see it, and each extra pass of
    the step renormalized the real weights once more: the student 32-117% away from a plain
    training step after one, the teacher's gradient 5e-4 to 3.5e-3 off finite differences) and
    ``scale_grad_by_freq`` (its backward is not its forward's derivative, so R's gradient is not
    R's: double backward 1e-3 off finite differences).
    """
    for name, m in student.named_modules():
        if isinstance(m, nn.EmbeddingBag):
            return EMBEDDING_BAG.format(name)
        if not isinstance(m, nn.Embedding):
            continue
        if m.max_norm is not None:
            return EMBEDDING_MAX_NORM.format(name)
        if m.scale_grad_by_freq:
            return EMBEDDING_FREQ.format(name)
        if m.sparse and estimator == "exact":
            return SPARSE_GRADIENTS.format(f"its module {name!r} has sparse=True")
    return None


def check_student_update(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    estimator: str,
    allow_hooks: bool,
) -> None:
    """What the student's update must be for the step to be what it claims: something to learn
    in ``params`` (what ``optimizer`` updates); for the exact estimators, embeddings they can
    differentiate (:func:`embedding_problem`) and, unless ``allow_hooks``, no hook that changes
    the update (:func:`update_hook`)."""
    if not any(p.requires_grad for p in params):
        raise ConfigError(
            "none of the parameters in student_optimizer requires grad: the student has "
            "nothing to learn"
        )
    if estimator != "first_order":
        compiled = compiled_module(student)
        if compiled is not None:
            raise ConfigError(COMPILED.format(compiled))
        problem = embedding_problem(student, estimator)
        if problem is not None:
            raise ConfigError(problem)
    if estimator != "first_order" and not allow_hooks:
        hook = update_hook(student, optimizer, params)
        if hook is not None:
            raise ConfigError(
                f"the student has {hook}: it changes the student's update where the exact "
                "teacher gradient cannot see it; remove it, use estimator='first_order', or "
                "pass allow_student_hooks=True if it only observes (gradient logging)"
            )


def check_replayable(
    student: nn.Module,
    x_u: ModelInput,
    autocast: contextlib.AbstractContextManager,
    autocast_dtype: torch.dtype | None,
) -> None:
    """Before the first exact step: two forwards of ``student`` on ``x_u`` with the same replayed
    torch random numbers (and copies of its buffers) must agree, else a :class:`ConfigError`.

    A forward that draws from elsewhere (its own torch.Generator, numpy, Python's random) or reads
    state it changes outside its buffers is another function in the JVP pass than in the update
    pass, and the teacher's gradient wrong (20-26% in the tests' examples), silently. The two
    forwards draw nothing from the global stream, so training is the same as without the check.
    """
    rng = RngState(module_device(student))
    outs = []
    named = list(student.named_parameters())
    # On copies of the parameters too: a forward that writes them (F.embedding's max_norm) is
    # refused below with the student's own as they were.
    copies = parameter_copies(student)
    with torch.no_grad(), autocast:
        for _ in range(2):
            with replayed_rng(rng):
                out = x_u.functional_call(student, {**buffer_copies(student), **copies})
            if not isinstance(out, Tensor):
                return  # not logits: the step's own check says so
            outs.append(upcast(out))
    written = written_parameter(
        [n for n, _ in named], [p for _, p in named], [copies[n] for n, _ in named]
    )
    if written is not None:  # (the student 2e-4 from its real step, R's gradient 1e-3 off)
        raise ConfigError(WRITES_PARAMETERS.format(written))
    if not bool(torch.isfinite(outs[0]).all()):  # its inputs are finite (checked before):
        raise ConfigError(  # the comparison below blamed random numbers drawn elsewhere
            "the student's logits on x_unlabeled hold NaN or Inf, though its inputs are finite: "
            "its parameters or buffers may hold NaN or Inf (a run that diverged?), or its forward "
            "overflows; the exact step needs finite logits"
        )
    err = relative_error(outs[1], outs[0])
    # not bit for bit: cuDNN may pick other kernels; another dropout mask is off by O(0.1-1)
    if not err <= (0.05 if autocast_dtype is not None else 1e-3):
        raise ConfigError(
            "the student's forward gives other outputs for the same input and the same torch "
            f"random numbers (relative difference {err:.2g}): it draws random numbers elsewhere "
            "(its own torch.Generator, numpy, Python's random) or changes state it reads; the "
            "exact step replays torch's global generator only. Draw from torch's global "
            "generator, or use estimator='double_backward' or 'first_order'"
        )


FORWARD_AD_HELP = (
    "the exact step cannot compute J with it: use estimator='double_backward' (the same "
    "gradient, slower, if the operation has a second derivative) or 'first_order'"
)
EMBEDDING_BAG_HELP = (
    "embedding_bag has neither forward-mode AD nor a second derivative in torch, so no exact "
    "estimator goes through it: compute the bags with F.embedding and a sum / mean / max over "
    "their positions (the same function), or use estimator='first_order'"
)


CUSTOM_JVP_HELP = (
    "give the Function a jvp staticmethod (with setup_context, so forward AD can run it), or "
    "use estimator='double_backward' (if its backward is differentiable) or 'first_order'"
)


def forward_ad_error(err: NotImplementedError) -> ConfigError | None:
    """The ConfigError for torch's "no forward AD for this op" error, or None for another one."""
    if "implement the jvp function" in str(err):  # a custom autograd.Function without jvp
        return ConfigError(
            "the student's forward uses a custom autograd.Function without forward-mode AD "
            f"({first_line(err)}); {CUSTOM_JVP_HELP}"
        )
    if "forward AD" not in str(err):
        return None
    advice = EMBEDDING_BAG_HELP if "embedding_bag" in str(err) else FORWARD_AD_HELP
    return ConfigError(
        "the student's forward uses an operation without forward-mode AD "
        f"({first_line(err)}); {advice}"
    )


def check_derivatives(
    student: nn.Module,
    x_u: ModelInput,
    autocast: Callable[[], contextlib.AbstractContextManager],
    tf32: bool,
    average: Callable[[list[Tensor]], None],
) -> None:
    """Before the first exact step: the student has a forward-mode derivative, and its backward
    is that derivative's adjoint, <u, J t> = <B^T u, t> for a random u of its logits on x_u and t
    the gradient of another random cotangent, scaled element by element (as the step's w is);
    else a :class:`ConfigError`.

    - **Forward AD.** An op without it (spectral_norm's normalize, embedding_bag, ops of a
      torch.compile'd module) failed after the student's optimizer had stepped: every path of
      the exact step computes its first J by forward AD (the tangent tape's first J is checked
      against it), and the error came with the student moved and the teacher not.
    - **Adjoint.** The step takes the student's update from its backward and J from forward
      mode, and the teacher's gradient is exact only if the two are one derivative. They are not
      for a custom ``autograd.Function`` whose backward is not its forward's derivative (gradient
      scaling or reversal, a straight-through estimator whose jvp is the true derivative, a
      wrong hand-written backward): the teacher's gradient was 8% off, silently.

    Both passes run under the step's ``autocast`` (so the tolerance is the tape check's for the
    logits' dtype), on copies of the buffers and the same random numbers, which they give back;
    t and u come from a generator of their own (the same on every process). A parameter the
    backward does not reach gets no tangent, as in the step, where v has none for it either; nor
    does an element no gradient reaches (``nn.Embedding``'s padding row: forward AD differentiates
    it, the backward never moves it, and a random t there refused an exact student). With
    data parallelism t and the sums are ``average``d: a layer that reduces over processes
    (``sync_batchnorm``) is an adjoint pair over the whole batch, not per process, and the
    parameters' tangent must be one on every process, as they are one.
    """
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if not trainable:
        return
    rng, own = RngState(module_device(student)), torch.Generator().manual_seed(0)

    def logits_of(state: dict[str, Tensor]) -> Tensor:
        with replayed_rng(rng), autocast():
            out = x_u.functional_call(student, state)
        return as_logits(out, "student")

    state = {**buffer_copies(student), **dict(trainable)}
    native = logits_of(state)
    check_learns(native, "student")  # (torch's "does not require grad" from the backward below)
    logits = upcast(native)

    def backward(retain: bool) -> tuple[Tensor, Sequence[Tensor | None]]:
        u = torch.randn(logits.shape, generator=own, dtype=torch.float64).to(logits)
        with holding(student, state):  # a checkpoint's recompute: on the copies too
            grads = torch.autograd.grad(
                (logits * u).sum(),
                [p for _, p in trainable],
                retain_graph=retain,
                allow_unused=True,
            )
        return u, grads

    # t in the range of the backward, as w is (w = factors * v, v a gradient): a direction no
    # gradient ever takes (nn.Embedding's padding row) is none the step uses either.
    _, directions = backward(retain=True)
    average([d for d in directions if d is not None])
    u, grads = backward(retain=False)
    if any(g is not None and g.layout != torch.strided for g in grads):  # F.embedding(sparse=True)
        raise ConfigError(SPARSE_GRADIENTS.format("a sparse gradient from the student's backward"))
    reached = [
        (n, p, g, d)
        for (n, p), g, d in zip(trainable, grads, directions)
        if g is not None and d is not None  # (both or neither: one graph)
    ]
    t = [
        d * torch.empty(p.shape, dtype=torch.float64).uniform_(0.5, 1.5, generator=own).to(p)
        for _, p, _, d in reached
    ]
    with torch.no_grad(), dual_level():
        duals = {n: fwad.make_dual(p.detach(), ti) for (n, p, _, _), ti in zip(reached, t)}
        try:
            jt = fwad.unpack_dual(logits_of({**buffer_copies(student), **duals})).tangent
        except NotImplementedError as e:
            error = forward_ad_error(e)
            if error is None:
                raise
            raise error from None
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    back = [(g.double() * ti.double()).sum() for (_, _, g, _), ti in zip(reached, t)]
    forward = zero if jt is None else (jt.double() * u.double()).sum()
    sums = torch.stack([forward, sum(back, zero), sum((b.abs() for b in back), zero)])
    average([sums])
    forward_sum, backward_sum, scale = sums.tolist()
    err = abs(forward_sum - backward_sum) / scale if scale > 0 else abs(forward_sum)
    if not err <= tolerance(native.dtype, tf32):
        # (a refusal: one more forward on copies of the buffers costs no step)
        untracked = ops_without_grad(logits_of, buffer_copies(student), reached, t)
        if untracked:
            # Not a custom Function: the same refusal blamed one, named 'first_order' and sent
            # the user away from double backward, which takes this student.
            raise ConfigError(
                "the student's forward computes with gradients off (a torch.no_grad() block: "
                f"{', '.join(untracked)}) on values that depend on its parameters: its backward "
                "takes them as constants, forward-mode AD does not, so J would differentiate "
                "another function than the student's update. Use .detach() there (the same "
                "values, constants for both), or estimator='double_backward'"
            )
        # A parameter the forward reads through a reference of its own: forward AD's duals,
        # swapped in, never reach it. (The message blamed a custom Function.)
        copies = {n: p.detach().requires_grad_() for n, p, _, _ in reached}
        outside = parameter_outside_call(
            student,
            logits_of({**buffer_copies(student), **copies}),
            [p for _, p, _, _ in reached],
        )
        if outside is not None:
            raise ConfigError(
                OUTSIDE_CALL.format(
                    outside, "the exact step's J", "J has no tangent for it, as if it were frozen"
                )
            )
        raise ConfigError(
            "the student's backward is not the adjoint of its forward-mode derivative "
            f"(<u, J t> and <B^T u, t> differ by {err:.2e}, relative): a custom "
            "autograd.Function whose backward is not its forward's derivative (gradient scaling "
            "or reversal, a straight-through estimator, a wrong hand-written backward) makes J "
            "differentiate another function than the student's update, and R's gradient "
            "(taken by that backward) is not R's: use estimator='first_order', which reads R's "
            "values only"
        )


class _GradOffWatch(TorchFunctionMode):
    """Names the operations that run with gradients off on a tensor carrying a forward-mode
    tangent. A custom Function's forward runs with gradients off too, but on plain tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and fwad.unpack_dual(a).tangent is not None
            for a in (*args, *kwargs.values())
        ):
            name = getattr(func, "__name__", str(func))
            if name not in self.names:
                self.names.append(name)
        return func(*args, **kwargs)


def ops_without_grad(
    logits_of: Callable[[dict[str, Tensor]], Tensor],
    buffers: dict[str, Tensor],
    reached: Sequence[tuple[str, Tensor, Tensor, Tensor]],
    t: Sequence[Tensor],
) -> list[str]:
    """The operations the student's forward runs inside ``torch.no_grad()`` on values that
    depend on its parameters (a stop-gradient, an EMA buffer updated from the activations and
    read later), at most 5. Forward-mode AD goes through such a block, the backward does not:
    :func:`check_derivatives` failed on them with a message about custom Functions."""
    watch = _GradOffWatch()
    with torch.enable_grad(), dual_level():
        duals = {n: fwad.make_dual(p.detach(), ti) for (n, p, _, _), ti in zip(reached, t)}
        with watch:
            logits_of({**buffers, **duals})
    return watch.names[:5]


def autograd_nodes(roots: Iterable) -> Iterator:
    """The autograd nodes reachable from ``roots`` (nodes), each once."""
    seen: set = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(n for n, _ in node.next_functions if n is not None)


OUTSIDE_CALL = (
    "the student's forward reads its parameter {!r} other than as its module's attribute (a "
    "tensor kept in a list, a dict or a closure when the module was built): the step's passes "
    "that run the student on other weights (torch.func.functional_call: {}) never reach it, so "
    "{}. Read the parameter from its module in the forward (self.<module>.weight), or use "
    "estimator='first_order'"
)


def parameter_outside_call(
    student: nn.Module, logits: Tensor, swapped: Sequence[Tensor]
) -> str | None:
    """The name of a student parameter among ``swapped`` that ``logits``, computed by a functional
    call with other tensors in place of ``swapped``, still reached, or None. (A parameter the call
    left in place, one no optimizer trains, is read as the module's own, rightly.)

    A forward that reads a parameter through a reference it kept (``self.held = [self.fc.weight]``,
    a lambda over it) reads the module's own tensor whatever functional_call swaps in, so that
    parameter is a constant of every such pass: double backward's differentiable update of
    theta_t left it out (the student stepped another way than its optimizer alone, the teacher's
    gradient 22% off, silently), and the exact step's J has no tangent for it.
    """
    kept = {id(p) for p in swapped}
    own = {id(p): name for name, p in student.named_parameters() if id(p) in kept}
    for node in autograd_nodes([logits.grad_fn]):
        variable = getattr(node, "variable", None)  # an AccumulateGrad node's leaf
        if variable is not None and id(variable) in own:
            return own[id(variable)]
    return None


WRITES_PARAMETERS = (
    "the student's forward writes its parameter {!r} in place (F.embedding with max_norm "
    "renormalizes the rows it reads; a constraint applied as weight.data.clamp_(...)): autograd "
    "does not see the write, and every extra pass of an exact step (on other weights, at "
    "theta_{{t+1}}) writes again, so the student steps another way than its optimizer alone and "
    "the teacher's gradient is not R's. Apply the constraint after each step (under "
    "torch.no_grad()), or use estimator='first_order'"
)


def parameter_copies(student: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the student's parameters, by name, for a trial forward."""
    return {n: p.detach().clone() for n, p in student.named_parameters()}


def written_parameter(
    names: Sequence[str], params: Sequence[Tensor], ran_on: Sequence[Tensor]
) -> str | None:
    """The name of the first parameter whose copy in ``ran_on`` (what a forward ran on, in place
    of ``params``) the forward changed, or None."""
    for name, p, copy in zip(names, params, ran_on):
        a, b = copy.detach(), p.detach()
        # a NaN is not equal to itself: a diverged weight read as one the forward had written
        if not torch.equal(a, b) and not torch.allclose(a, b, rtol=0, atol=0, equal_nan=True):
            return name
    return None


def check_student_takes(
    student: nn.Module,
    inputs: Sequence[tuple[str, ModelInput, bool]],
    labels: Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager],
    passed: set,
    batch_dim: int,
) -> None:
    """Before the teacher's forward: the student can take each batch, and gives one row of logits
    per example on it; else a DataError (dtype, device) or a ConfigError (a batch of one in
    training mode, logits of another shape).

    The student met ``x_unlabeled`` after the teacher's forward, and ``x_labeled`` only after its
    own step (in the exact step): torch's "expected m1 and m2 to have the same dtype" (a float32
    ``x_labeled`` for a float64 student: the teacher's ``cat`` promotes it next to a float64 x_u),
    BatchNorm's "Expected more than 1 value per channel when training", or logits [2 * batch, C]
    silently cut to the labels' rows came with the student moved. So a batch is tried first, by a
    forward on copies of the buffers with torch's random numbers given back, when it is new in a
    way that may fail: of another dtype or device than the student's first floating parameter
    (one of those costs nothing: bf16 under autocast, a student that casts its input itself; an
    integer batch is tried once per dtype, so uint8 images for a float model are named here, not
    in a raw error from the teacher's forward, and token ids for an embedding pass), of
    one example in training mode, or, for the inputs ``(what, x, every_size)`` with
    ``every_size``, of a number of examples not tried yet. What passed is remembered in
    ``passed``. (Not every new size of every batch: a student that draws random numbers of its
    own, which the double-backward and first-order steps take, would see its stream move.)
    ``labels`` must be on the student's kind of device (its cross-entropy on the labeled batch
    comes after its step).
    """
    param = next((p for p in student.parameters() if p.is_floating_point()), None)
    if param is None:
        return
    # Met first by the student's labeled loss, after its step. (Only the device type: a student
    # split over two GPUs has its logits on another device than its first parameter.)
    if labels.device.type != param.device.type:
        raise DataError(
            f"y_labeled is on {labels.device} and the student on {param.device}: move the labels "
            "to the student's device"
        )
    for what, x, every_size in inputs:
        dtypes = {
            (what, t.dtype, t.device, param.dtype, param.device)
            for t in x.leaves
            if t.device != param.device or t.dtype != param.dtype
        }
        size = (what, x.batch_shape, student.training)
        new = (dtypes | ({size} if every_size or x.size == 1 else set())) - passed
        if not new:
            continue
        # (copies of the parameters too: a forward that writes them, F.embedding's max_norm,
        # moved the student's weights in a trial; check_replayable refuses it)
        state = {**buffer_copies(student), **parameter_copies(student)}
        try:
            with torch.no_grad(), replayed_rng(RngState(module_device(student))), autocast():
                out = x.functional_call(student, state)
        except (RuntimeError, TypeError) as err:
            if not dtypes & new:
                raise
            _, dtype, device, *_ = min(dtypes & new, key=str)
            fix = "cast the batch to the student's dtype and device"
            if not (dtype.is_floating_point or dtype.is_complex):
                fix += f" (uint8 images: x.to({param.dtype}) / 255)"
            raise DataError(
                f"the student cannot take {what} of dtype {dtype} on {device} (its parameters "
                f"are {param.dtype} on {param.device}): {first_line(err)}; {fix}"
            ) from None
        except ValueError as err:
            if x.size != 1 or not student.training:
                raise
            kind = what.removeprefix("x_")
            raise ConfigError(
                f"the student cannot take a{'n' if kind[0] == 'u' else ''} {kind} batch of one "
                f"example in training mode ({first_line(err)}); use at least 2 {kind} examples "
                "per step"
            ) from None
        check_rows(as_logits(out, "student"), x, "student", what, batch_dim)
        passed |= new
