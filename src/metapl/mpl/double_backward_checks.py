"""What a student must be for ``estimator="double_backward"`` to give the real teacher gradient.

The double-backward step differentiates the student's gradient g, built with ``create_graph``,
through a differentiable copy of its optimizer's rule. Autograd gives a *wrong* second derivative,
without an error, where the student's backward is not differentiable in the ordinary way, so the
step checks on the first use of each batch shape, before anything moves:

- a custom Function whose backward is ``@once_differentiable`` (:func:`check_second_derivatives`)
  or computes off the graph, with numpy or ``.detach()`` (:func:`check_gradient_derivative`);
- a forward that reads a parameter other than through its module, or writes one in place
  (:func:`check_double_backward_student`);
- an operation without a second derivative, named in torch's error (:func:`grad_to_targets`).

The exact step's own checks are in :mod:`metapl.mpl.student_checks`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from metapl.errors import ConfigError, first_line
from metapl.mpl.student_checks import (
    EMBEDDING_BAG_HELP,
    OUTSIDE_CALL,
    WRITES_PARAMETERS,
    autograd_nodes,
    parameter_outside_call,
    written_parameter,
)

ONCE_DIFFERENTIABLE = (
    "the student's forward uses a custom autograd.Function whose backward is marked "
    "@once_differentiable{}: its gradient has no derivative, so estimator='double_backward' "
    "cannot differentiate through the student's update (torch's autograd.grad would skip that "
    "part of R's gradient without a word); use estimator='exact' (it needs the Function's jvp) "
    "or 'first_order'"
)


def check_second_derivatives(grads: Sequence[Tensor | None], logits: Tensor) -> None:
    """For the double-backward step: the student's gradient, built with ``create_graph``, has a
    graph all the way down; else a :class:`ConfigError`.

    A custom ``autograd.Function`` whose backward is ``@once_differentiable`` returns its gradient
    from an error node *without inputs*: ``.backward()`` would raise at it, but
    ``autograd.grad(R, targets)`` only runs the nodes on a path to the targets, so it passed that
    branch by and the teacher's MPL gradient came out wrong, silently (25% off, relative, on a
    small net). The graph of ``grads`` is walked for such a node; ``logits``' graph names the
    Function.
    """
    if not _has_node(grads, "torch::autograd::Error"):
        return
    names = sorted(_once_differentiable_functions(logits))
    raise ConfigError(ONCE_DIFFERENTIABLE.format(f" ({', '.join(names)})" if names else ""))


def _has_node(tensors: Sequence[Tensor | None], name: str) -> bool:
    roots = [t.grad_fn for t in tensors if t is not None]
    return any(node.name() == name for node in autograd_nodes(roots))


def _once_differentiable_functions(logits: Tensor) -> set[str]:
    """The custom Functions in ``logits``' graph whose backward is once_differentiable's wrapper
    (functools.wraps keeps the backward's name, not its code)."""
    names = set()
    for node in autograd_nodes([logits.grad_fn]):
        cls = getattr(node, "_forward_cls", None)
        code = getattr(getattr(cls, "backward", None), "__code__", None)
        if (
            cls is not None
            and code is not None
            and code.co_name == "wrapper"
            and "autograd" in code.co_filename
        ):
            names.add(cls.__name__)
    return names


DETACHED_BACKWARD = (
    "the student's backward returns a gradient that its graph does not link to the incoming "
    "gradient (autograd's derivative of g in the teacher's targets and g's own change differ by "
    "{err:.2e}, relative): a custom autograd.Function whose backward computes off the graph "
    "(numpy, .detach(), torch.no_grad()) gives a gradient that is right but holds no derivative, "
    "so estimator='double_backward' cannot differentiate through the student's update (torch "
    "takes that part of R's gradient as 0, without a word); use estimator='exact' (it needs the "
    "Function's jvp) or 'first_order'"
)


def check_gradient_derivative(
    grads: Sequence[Tensor | None],
    theta: Sequence[Tensor],
    targets: Tensor,
    loss_of: Callable[[Tensor], Tensor],
    tol: float,
) -> None:
    """For the double-backward step: autograd's derivative of the student's gradient g (built with
    ``create_graph`` on ``theta``) in the teacher's ``targets`` is g's own; else a
    :class:`ConfigError`.

    The student's loss on x_u is linear in its targets (``loss_of(q)``, a soft cross-entropy), so
    g is too, and g's change along a direction d of the targets is the gradient of ``loss_of(d)``
    (a first-order backward, which any backward gives right). Double backward takes it from g's
    graph instead, and a custom Function whose backward computes off the graph (numpy, as in
    torch's tutorial on extensions; ``.detach()`` or ``torch.no_grad()`` in its backward) returns a
    gradient with no graph, or less of one, without an error node for
    :func:`check_second_derivatives` to find: torch takes its derivative as 0, and the teacher's
    gradient was 6-8% off finite differences, silently (a gradient with no graph at all failed
    with torch's "element 0 of tensors does not require grad"). Compared along one random d and
    random weights r of g's entries (a generator of their own): <d, dg/dq^T r> = <grad loss_of(d), r>.
    """
    reached = [(g, p) for g, p in zip(grads, theta) if g is not None]
    if not reached:  # the optimizer trains nothing the forward uses: g is 0, and so is dg/dq
        return  # (torch's grad() refused the empty list: "`inputs` ... cannot be empty")
    own = torch.Generator().manual_seed(0)
    d = torch.randn(targets.shape, generator=own, dtype=torch.float64).to(targets)
    r = [torch.randn(g.shape, generator=own, dtype=torch.float64).to(g) for g, _ in reached]
    along = torch.autograd.grad(
        loss_of(d), [p for _, p in reached], retain_graph=True, allow_unused=True
    )
    terms = [(a.double() * ri.double()).sum() for a, ri in zip(along, r) if a is not None]
    expected = float(sum(terms, torch.zeros((), dtype=torch.float64)))
    scale = float(sum((t.abs() for t in terms), torch.zeros((), dtype=torch.float64)))
    linked = [(g * ri).sum() for (g, _), ri in zip(reached, r) if g.requires_grad]
    got = 0.0
    if linked:
        total = torch.stack(linked).sum()
        with second_derivatives_named():  # (an operation without one is named as it was)
            (h,) = torch.autograd.grad(total, targets, retain_graph=True, allow_unused=True)
        got = 0.0 if h is None else float((h.double() * d.double()).sum())
    err = abs(got - expected) / scale if scale > 0 else abs(got)
    if not err <= tol:
        raise ConfigError(DETACHED_BACKWARD.format(err=err))


def check_double_backward_student(
    student: nn.Module, params: Sequence[Tensor], theta: Sequence[Tensor], logits: Tensor
) -> None:
    """For the double-backward step's first use: its forward on ``theta`` (copies of the
    student's ``params``, which gave ``logits``) reached none of the student's own parameters
    (:func:`parameter_outside_call`) and wrote none of the copies (F.embedding's max_norm, which
    left the student 2e-4 away from its real step and the teacher's gradient 1e-3 off finite
    differences, silently; the construction's check sees only an nn.Embedding's max_norm); else
    a :class:`ConfigError`."""
    name_of = {id(p): n for n, p in student.named_parameters()}
    written = written_parameter([name_of[id(p)] for p in params], params, theta)
    if written is not None:
        raise ConfigError(WRITES_PARAMETERS.format(written))
    outside = parameter_outside_call(student, logits, params)
    if outside is not None:
        raise ConfigError(
            OUTSIDE_CALL.format(
                outside,
                "the double-backward step's differentiable update starts from copies of theta_t",
                "that parameter's part of the student's gradient is left out of its update",
            )
        )


def grad_to_targets(labeled_after: Tensor, targets: Tensor) -> Tensor:
    """dR(theta_{t+1}) / d targets, through the student's backward, for the double-backward step
    before the student's real step; a :class:`ConfigError` naming the operation without a second
    derivative (torch's CTC loss, ``torch.cdist`` before torch 2.14, a fused kernel) if there is
    one.

    Taken before the real step so that such an operation fails with nothing moved: when the
    teacher's backward ran through the second-order graph after the student's step, torch's "the
    derivative for '_cdist_backward' is not implemented" left the student moved and the teacher
    not. The caller runs it with the student :func:`~metapl.mpl.inputs.holding` the labeled
    pass's state (a checkpointed student recomputes that pass in this backward).
    """
    with second_derivatives_named():
        (grad,) = torch.autograd.grad(labeled_after, targets, allow_unused=True)
    return torch.zeros_like(targets) if grad is None else grad


@contextlib.contextmanager
def second_derivatives_named() -> Iterator[None]:
    """Torch's "the derivative for ... is not implemented" from the block (a backward through a
    student's gradient) as a :class:`ConfigError` that names the operation and the way out."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as err:
        if "derivative for" not in str(err) or "not implemented" not in str(err):
            raise
        advice = (
            EMBEDDING_BAG_HELP
            if "embedding_bag" in str(err)
            else "estimator='double_backward' cannot differentiate through its update: use "
            "estimator='exact' (forward-mode AD, if the operation has it) or 'first_order'"
        )
        raise ConfigError(
            "the student's forward uses an operation without a second derivative "
            f"({first_line(err)}); {advice}"
        ) from None
