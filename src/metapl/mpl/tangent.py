"""The student's JVP from the update pass's activations: the *tangent tape* (issue 5, lever 1).

The exact step needs J = d/de log p_{theta_t + e w}(x_u), the student's forward-mode derivative on
x_u at theta_t along w, for *the very function* of the update pass (same dropout masks, BatchNorm
with batch statistics). Plain forward-mode AD (``torch.autograd.forward_ad``) recomputes the whole
primal forward beside the tangent. The primal values are not new, though: the update pass computed
them a moment earlier, and autograd kept most of them for its backward anyway. So:

1. **Record** (the update pass itself): the student, traced once with ``torch.fx``, runs as generated
   code that returns the logits *and* the primal values the tangent rules will need (conv and linear
   inputs, BatchNorm inputs, activation inputs or outputs, dropout masks). Autograd sees the same
   operations as ``student(x)``: ``loss.backward()`` fills the student's ``.grad`` and each BatchNorm
   updates its running statistics once, in the module's own mode.
2. **Tangent** (after the optimizer step): only tangents flow through the graph, in topological
   order, with hand-written rules for the common operations (conv, linear, BatchNorm, ReLU family,
   SiLU, sigmoid, GELU, + - * /, matmul, reductions, reshapes, pooling, cat, dropout;
   :mod:`metapl.mpl.tangent_rules`) that read the saved primals and theta_t (the clones the step
   keeps: the optimizer has already moved the parameters in place). A conv costs two
   convolutions (dx with W, x with dW) instead of forward AD's three; BatchNorm is two of its own
   fused kernels. Any other operation is differentiated on its own by forward AD from its saved
   inputs (exact; it recomputes only that node's primal).

Why a transformed graph rather than an ``fx.Interpreter``: the record pass is the student's training
forward, run every step, so it should cost what ``student(x)`` costs; generated code has no
per-node interpreter overhead. Why dropout masks are recorded instead of replaying the RNG: the
record pass draws each mask as ``dropout(ones_like(x))`` (the same shape, dtype and device as
``dropout(x)``, so the same random numbers) and multiplies; the tangent pass then draws nothing, so
it may visit operations in any order. Other random sources (``torch.rand`` for stochastic depth,
...) have no tangent: their values are saved like any other primal.

What cannot use the tape (the step falls back to forward AD, or ``jvp="tape"`` is a ConfigError):
models fx cannot trace (data-dependent Python control flow), in-place operations (``inplace=True``,
``x.add_()``, ``out=``, item assignment: the saved primals must stay what the update pass saw),
random operations other than dropout and tangent-free sources, modules with hooks or
parametrizations (fx does not run hooks of inner modules). Python-side state that fx bakes into the
graph at trace time (``self.training`` of inner modules, ...) is handled by keying the tape on the
modules' modes (:func:`module_signature`); the step also compares the first record (its logits and
its backward) and the first tangent of each tape against the module itself and forward AD, and
falls back on any difference. fx traces through a custom ``autograd.Function`` (and
``torch.utils.checkpoint``) into its forward's operations, losing its own backward: the
comparison of the backward is what catches that.
fx records ``x += y`` as an out-of-place add: equal to the module unless another reference to x's
old value is read later (then the first-use comparison sees the difference).

Memory: the saved primals are tensors autograd keeps for the update pass's backward anyway (a test
holds the registry's models to it). A ReLU or leaky ReLU reads whichever of its input and output
another rule keeps (the output, where a convolution reads it), and where none does (WRN's last
activation, before the pooling), the input's signs, packed 8 to a byte: autograd frees that input
early in the update pass's backward, where the exact step's memory peaks, and the tape would not.
They live on until the tangent pass (through the labeled pass that computes v), and the tangent
pass frees each one after its last reader.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.fx as fx
from torch import Tensor, nn

from metapl.mpl import tangent_ops as ops
from metapl.mpl.dual import dual_level
from metapl.mpl.inputs import restoring_functional_call
from metapl.mpl.replay import RngState
from metapl.mpl.tangent_rules import Rule, TangentRules
from metapl.sync_batchnorm import GlobalBatchNorm

JVP_MODES = ("auto", "tape", "forward_ad")


class TapeUnsupportedError(Exception):
    """The student cannot use the tangent tape; the message says why."""


class CompiledGraphRefused(Exception):
    """A compiled record pass failed, or differed from the module, at its first use; the message
    says how. The step undoes what the pass moved and runs it eagerly
    (:meth:`TangentTape.uncompile`)."""


# ----------------------------------------------------------------------------- the tape


@dataclass
class TapeRecord:
    """What the record pass kept for the tangent pass: the logits, the saved primals (in the
    tape's order) and the shape/dtype of every output that can carry a tangent."""

    logits: Tensor
    saved: tuple
    metas: tuple


@dataclass
class _Step:
    node: fx.Node
    rule: Callable  # (val, tan, theta, tw) -> tangent
    meta: int  # index into TapeRecord.metas
    free: tuple  # keys whose primal/tangent is not needed after this step
    generic: bool


# Exact types, a set lookup per attribute (module_signature runs every step).
_SCALAR_TYPES = frozenset((bool, int, float, str, type(None)))
_SEQUENCES = frozenset((tuple, list))


def _bakeable(v: object) -> bool:
    """A scalar, or a tuple or list of scalars: a value fx bakes into a graph as it is."""
    return type(v) in _SCALAR_TYPES or (
        type(v) in _SEQUENCES and all(type(e) in _SCALAR_TYPES for e in cast("Sequence[object]", v))
    )


def _held_values(obj: object) -> tuple:
    """The bakeable entries of a dict, or the bakeable attributes of an object with a
    ``__dict__`` (lists as tuples), by name."""
    items = obj if type(obj) is dict else getattr(obj, "__dict__", None)
    if not isinstance(items, dict):
        return ()
    return tuple((k, tuple(v) if type(v) is list else v) for k, v in items.items() if _bakeable(v))


# What every module holds (its parameters, buffers, submodules, hooks, mode): read above.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _held(m: nn.Module) -> tuple:
    """What else of ``m``'s own fx bakes into a graph, by attribute name:

    - one level into a config object or dict it holds, its scalars (``self.cfg.drop_rate``,
      ``self.opts["scale"]``): a schedule changing one kept training the student on the old graph
      (its step 0.7% off its own optimizer's, the teacher's gradient 9-14% off);
    - the functions it calls by attribute (``self.act = torch.tanh``, a replaced ``forward``),
      call targets of the graph: a swapped activation kept the old one (the student's step 3%
      off, the teacher's gradient 92% off); and the scalars of a callable object's own, or of a
      bound method's object (``self.act = scaler.apply`` bakes ``scaler.k``: a changed k kept the
      old graph, its logits the old k's).

    Values from outside the modules (a global) are beyond any key: the README's ``jvp`` says so."""
    return tuple(
        # a callable object's own scalars too; a bound method's: its object's
        (k, _identity(v) if callable(v) else None, _held_values(_owner(v)))
        for k, v in m.__dict__.items()
        if k not in _MODULE_INTERNALS and not (_bakeable(v) or isinstance(v, Tensor))
    )


def _owner(v: object) -> object:
    """The object whose attributes a held value reads: a bound method's ``__self__``, else the
    value itself."""
    return v.__self__ if inspect.ismethod(v) else v


def _identity(fn: object) -> object:
    """``fn`` itself for a key where it can be hashed (held, its id cannot be reused by a new
    function while the key lives), else its id (a method of an unhashable object)."""
    try:
        hash(fn)
    except TypeError:
        return id(fn)
    return fn


class _Tracer(fx.Tracer):
    """fx's tracer, keeping :class:`GlobalBatchNorm` whole: its collectives cannot run on proxies,
    and as one node it gets the generic rule (forward AD of the layer, collectives included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, GlobalBatchNorm) or super().is_leaf_module(m, qualname)


def module_signature(module: nn.Module) -> tuple[tuple | None, str | None]:
    """``(key, None)``: what a traced graph of ``module`` depends on beyond its parameters' values,
    or ``(None, why)`` when the module cannot use a tape at all right now (hooks: fx runs no hook
    of an inner module).

    fx bakes the Python values a forward reads into the graph: each module's train/eval mode where
    code branches on it, plain attributes (a stochastic-depth rate, a slope, a ``p`` passed to
    ``F.dropout``, private ones too), tuples of them (a conv's padding), and the tensors it reads
    by attribute (buffers and plain tensors, by identity: ``module.to(...)`` or an assignment
    replaces them), one level into an object or dict it holds (its scalars), and the functions it
    calls by attribute. The key holds them, with the modules and parameters themselves, so that a
    schedule changing one gets a new graph instead of a stale one: a changed private scale, a
    replaced buffer or a conv's new padding kept training the student on the old graph, the
    teacher's gradient 0.1-2x off. (About 0.3 ms per step for WRN-28-2, 2.5 ms for
    EfficientNet-B0's 300 modules, on a CPU; :func:`_held` adds about a fifth.)"""
    key: list[tuple] = []
    for m in module.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            if getattr(m, hooks, None):
                return None, f"{type(m).__name__} has {hooks.strip('_').replace('_', ' ')}"
        if getattr(m, "_backward_pre_hooks", None):
            return None, f"{type(m).__name__} has backward pre hooks"
        # Values fx may bake into the graph: scalars, tuples or lists of them (a conv's padding:
        # its rule reads it at trace time), tensors by identity; private attributes too.
        # (lists as tuples: hashable, and a copy, so that a change in place is seen)
        values = tuple(
            (k, tuple(v) if type(v) is list else v)
            for k, v in m.__dict__.items()
            if _bakeable(v) or isinstance(v, Tensor)
        )
        key.append((id(m), values, _held(m), tuple(map(id, m._buffers.values()))))
    key.append(tuple(id(p) for p in module.parameters()))
    return tuple(key), None


class TangentTape:
    """The student traced once: :meth:`record` runs its forward keeping the primals the tangent
    rules need, :meth:`tangent` propagates a parameter tangent through the recorded pass.

    Args:
        module: the student (any ``nn.Module`` ``inputs -> logits`` that ``torch.fx`` can trace;
            each argument of its forward becomes a placeholder of the graph).
        trainable: the parameters that may carry a tangent (the student optimizer's).

    Raises :class:`TapeUnsupportedError` (with the reason) for models it cannot serve.
    """

    def __init__(self, module: nn.Module, trainable: Iterable[Tensor]):
        from torch.nn.utils import parametrize

        for m in module.modules():
            if parametrize.is_parametrized(m):
                raise TapeUnsupportedError(f"{type(m).__name__} has parametrizations")
        key, why = module_signature(module)
        if why is not None:
            raise TapeUnsupportedError(why)
        assert key is not None  # module_signature gives a key or a reason
        self.key = key
        try:
            gm = fx.GraphModule(module, _Tracer().trace(module))
        except Exception as e:  # any failure to trace means: use forward AD
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise TapeUnsupportedError(
                f"torch.fx cannot trace it ({type(e).__name__}: {first[:200]})"
            ) from None
        self._trainable = list(trainable)
        self._trainable_ids = trainable_ids = {id(p) for p in self._trainable}
        self._modules = dict(gm.named_modules())
        nodes = list(gm.graph.nodes)
        outputs = [n for n in nodes if n.op == "output"]
        if len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
            raise TapeUnsupportedError("its forward must return one tensor (the logits)")
        self._out = outputs[0].args[0]

        for node in nodes:
            self._check_supported(node)

        # Which nodes carry a tangent: those downstream of a trainable parameter.
        active: set[fx.Node] = set()
        tainted: set[fx.Node] = set()  # may alias a trainable parameter (see record)
        attr_params: list[tuple[fx.Node, Tensor]] = []
        for node in nodes:
            if node.op == "get_attr":
                obj = self._fetch(gm, node.target)
                if isinstance(obj, Tensor) and id(obj) in trainable_ids:
                    active.add(node)
                    tainted.add(node)
                    attr_params.append((node, obj))
                continue
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            if any(n in tainted for n in node.all_input_nodes):
                tainted.add(node)
            if self._has_no_tangent(node):
                continue
            if any(n in active for n in node.all_input_nodes):
                active.add(node)
            elif node.op == "call_module" and any(
                id(p) in trainable_ids for p in self._modules[node.target].parameters()
            ):
                active.add(node)
        self._active = active

        # One rule per active node, and the primals each needs.
        steps: list[tuple[fx.Node, Rule, list, bool]] = []
        self.generic_ops: list[str] = []
        rules = TangentRules(self._modules, active, trainable_ids)
        for node in nodes:
            if node not in active or node.op == "get_attr":
                continue
            rule, needs, generic = rules.rule(node)
            if generic:
                self.generic_ops.append(_describe(node, self._modules))
            steps.append((node, rule, needs, generic))
        # (in place: the needs of those rules' steps)
        rules.choose_sign_sources([needs for _, _, needs, _ in steps])

        needed: dict = {}  # ordered set of primal keys the rules read
        for _, _, needs, _ in steps:
            for k in needs:
                needed[k] = None
        attr_nodes = {n for n in nodes if n.op == "get_attr"}
        self._attr_params = attr_params
        self._attr_values = [
            (k, self._fetcher(gm, k.target)) for k in needed if k in attr_nodes and k not in active
        ]
        self._saved_keys = [k for k in needed if k not in attr_nodes]
        self._check_keys = [i for i, k in enumerate(self._saved_keys) if k in tainted]

        # Free primals and tangents after their last reader (peak memory as forward AD's).
        last_use: dict = {}
        for i, (node, _, needs, _) in enumerate(steps):
            for k in needs:
                last_use[k] = i
            for n in node.all_input_nodes:
                last_use[n] = i
        frees: list[list] = [[] for _ in steps]
        for k, i in last_use.items():
            if k is not self._out:
                frees[i].append(k)

        meta_nodes = [node for node, _, _, _ in steps]
        meta_index = {n: i for i, n in enumerate(meta_nodes)}
        self._steps = [
            _Step(node, rule, meta_index[node], tuple(frees[i]), generic)
            for i, (node, rule, _, generic) in enumerate(steps)
        ]
        self._dropouts = rules.dropouts  # dropout nodes on the tangent's path -> their input
        self._bn_stats = rules.bn_stats  # BatchNorm nodes whose statistics the record keeps
        self._signs = rules.signs  # activations' inputs whose signs the record keeps, packed
        self._has_generic = any(s.generic for s in self._steps)
        self._gm = self._record_module(gm, nodes, meta_nodes)
        # torch.compile'd record pass (:meth:`compile`), built from the same traced graph
        self._compiled: Callable | None = None
        self._build_compilable = lambda: self._record_module(gm, nodes, meta_nodes, compiled=True)
        # The call structures (ModelInput.structure) for which the step has seen a record and a
        # tangent match the module's: fx traced every argument of the forward as a proxy, also one
        # that a call leaves at its default, so each way of calling the graph is checked once.
        self.checked: set[Hashable] = set()
        # The call structures it failed for (first use: a record, its backward or J not the
        # module's), and why: those calls use forward AD, the others the graph.
        self.failed: dict[Hashable, str] = {}
        self.num_nodes = len(nodes)

    # ------------------------------------------------------------------ building

    @staticmethod
    def _fetch(root: nn.Module, target: str):
        obj = root
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _fetcher(self, root: nn.Module, target: str) -> Callable[[], object]:
        def fetch():
            value = self._fetch(root, target)
            return value.detach() if isinstance(value, Tensor) else value

        return fetch

    def _check_supported(self, node: fx.Node) -> None:
        what = _describe(node, self._modules)
        if node.op == "call_module":
            m = self._modules[node.target]
            if getattr(m, "inplace", False):
                raise TapeUnsupportedError(f"{what} works in place (inplace=True)")
            if isinstance(m, ops.RANDOM_MODULES):
                raise TapeUnsupportedError(f"{what} is random and not dropout")
            return
        if node.op not in ("call_function", "call_method"):
            return
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.target in ops.INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
            raise TapeUnsupportedError(f"{what} works in place")
        if isinstance(name, str) and name.endswith("_") and not name.endswith("__"):
            raise TapeUnsupportedError(f"{what} works in place")
        if "out" in node.kwargs:
            raise TapeUnsupportedError(f"{what} writes into out=")
        if node.op == "call_function":
            if node.target in ops.RANDOM_OTHER:
                raise TapeUnsupportedError(f"{what} is random and not dropout")
            if node.target in ops.DROPOUT_FUNCTIONS:
                stub = ops.sig_torch_dropout if node.target is torch.dropout else ops.sig_dropout
                args = ops.bind(stub, node)
                if args is None or args.get("inplace") is True:
                    raise TapeUnsupportedError(f"{what} works in place")
            elif inspect.isfunction(node.target):  # F.relu(x, True) and the like
                try:
                    bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
                except (TypeError, ValueError):
                    return
                if bound.arguments.get("inplace") is True:
                    raise TapeUnsupportedError(f"{what} works in place")

    def _has_no_tangent(self, node: fx.Node) -> bool:
        if node.op == "call_function":
            t = node.target
            if t in ops.RANDOM_SOURCES or t in ops.NO_TANGENT_FUNCTIONS:
                return True
            if t is getattr and len(node.args) == 2 and node.args[1] in ops.NO_TANGENT_ATTRS:
                return True
            return False
        if node.op == "call_method":
            if node.target == "type" and len(node.args) == 1 and not node.kwargs:
                return True  # x.type() is the type's name; x.type(dtype) converts, as x.to(dtype)
            return node.target in ops.NO_TANGENT_METHODS or node.target in ops.RANDOM_SOURCE_METHODS
        return False

    # ------------------------------------------------------------------ the record module

    def _record_module(
        self, gm: fx.GraphModule, nodes, meta_nodes, compiled: bool = False
    ) -> fx.GraphModule:
        """A copy of the traced graph that returns ``(logits, saved primals, metas)``: dropout
        nodes on the tangent's path become (output, mask) pairs; a shape/dtype probe follows each
        node that can carry a tangent (right after it, so no value outlives its last reader).

        ``compiled``: the graph torch.compile gets (:meth:`compile`). BatchNorm's saved statistics
        are then None (they live on an autograd node, which dynamo cannot read: a graph break at
        each BatchNorm made the pass 2.5x slower than eager; the tangent computes them again),
        and the saved primals are detached: autograd otherwise gives each output of a compiled
        graph a gradient in its backward, zeros for all of them (an eager pass's outputs without
        a gradient cost nothing), which made it slower than eager too."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        aux: dict = {}
        meta_of: dict[fx.Node, fx.Node] = {}
        wanted_meta = set(meta_nodes)
        for node in nodes:
            if node.op == "output":
                continue
            if node in self._dropouts:
                (x,) = self._dropouts[node]
                if node.op == "call_module":
                    module = graph.get_attr(node.target)
                    pair = graph.call_function(ops.record_dropout_module, (env[x], module))
                else:
                    stub = (
                        ops.sig_torch_dropout if node.target is torch.dropout else ops.sig_dropout
                    )
                    a = ops.bind(stub, node)
                    assert a is not None  # _function_rule bound it before adding it to _dropouts
                    p = fx.node.map_arg(a["p"], env.__getitem__)
                    training = fx.node.map_arg(a.get("training", a.get("train")), env.__getitem__)
                    kind = ops.DROPOUT_FUNCTIONS[node.target]
                    pair = graph.call_function(ops.dropout_pair, (env[x], p, training, kind))
                env[node] = graph.call_function(operator.getitem, (pair, 0))
                aux[("mask", node)] = graph.call_function(operator.getitem, (pair, 1))
            else:
                env[node] = graph.node_copy(node, env.__getitem__)
            if node in self._bn_stats:
                aux[("bn_stats", node)] = (
                    None if compiled else graph.call_function(ops.saved_bn_stats, (env[node],))
                )
            # packed as soon as the input exists: before the activation's output, so that the
            # packing's temporaries do not add to the activation's memory
            if node in self._signs:
                aux[("signs", node)] = graph.call_function(ops.PackedSigns, (env[node],))
            if node in wanted_meta:
                meta_of[node] = graph.call_function(ops.meta, (env[node],))
        saved = tuple(aux[k] if isinstance(k, tuple) else env[k] for k in self._saved_keys)
        if compiled:
            saved = tuple(
                v if v is None else graph.call_function(ops.detached, (v,)) for v in saved
            )
        metas = tuple(meta_of[n] for n in meta_nodes)
        graph.output((env[self._out], saved, metas))
        return fx.GraphModule(gm, graph)

    # ------------------------------------------------------------------ running

    def record(
        self,
        args: Tensor | tuple,
        kwargs: dict[str, Tensor] | None = None,
        *,
        buffers: dict[str, Tensor] | None = None,
    ) -> TapeRecord:
        """The student's forward (autograd as usual) on ``args`` (one tensor or a tuple of
        positional arguments) and ``kwargs``, keeping what :meth:`tangent` needs. ``buffers``: run
        on these instead of the modules' own (a side pass that must not touch the running
        statistics)."""
        args = args if isinstance(args, tuple) else (args,)
        kwargs = kwargs or {}
        if buffers is None:
            run = self._gm if self._compiled is None else self._compiled
            logits, saved, metas = run(*args, **kwargs)
        else:
            logits, saved, metas = restoring_functional_call(self._gm, buffers, args, kwargs)
        if self._check_keys:
            # A saved value that shares memory with a trainable parameter (a view of a weight)
            # would change under optimizer.step(): keep a copy of what this pass saw.
            ptrs = {p.untyped_storage().data_ptr() for p in self._trainable}
            saved = list(saved)
            for i in self._check_keys:
                v = saved[i]
                if isinstance(v, Tensor) and v.untyped_storage().data_ptr() in ptrs:
                    saved[i] = v.detach().clone()
            saved = tuple(saved)
        return TapeRecord(logits, saved, metas)

    def compile(self, mode: str = "default") -> None:
        """Run the record pass (the student's update pass: forward, and autograd's backward) as
        ``torch.compile`` code from now on, in ``mode``: the student of an exact step cannot be
        compiled itself (its compiled backward has neither forward-mode AD nor a second
        derivative), but the tape's pass needs neither. A side pass on other buffers
        (``record(buffers=...)``: the first use's comparisons) stays eager: a compiled one would
        recompile for each new set of buffers. The compiled pass differs from the eager one by
        rounding; its dropout draws eager PyTorch's random numbers."""
        # fallback_random: dropout draws eager PyTorch's random numbers (inductor's own stream
        # otherwise), so that the pass is the function forward AD replays and the first use's
        # comparison of J holds; options replace the mode (torch takes one or the other).
        options = {**torch._inductor.list_mode_options(mode), "fallback_random": True}
        self._compiled = torch.compile(self._build_compilable(), dynamic=False, options=options)

    def uncompile(self) -> None:
        """Run the record pass eagerly again (a compiled one failed or differed)."""
        self._compiled = None

    @property
    def compiled(self) -> bool:
        """Whether :meth:`record` runs compiled code (:meth:`compile`)."""
        return self._compiled is not None

    def buffer_names(self) -> list[str]:
        """The names of the buffers the traced graph uses (the student's names for them)."""
        return [n for n, _ in self._gm.named_buffers()]

    def buffer_copies(self) -> dict[str, Tensor]:
        """Copies of the buffers the traced graph uses (for :meth:`record`'s ``buffers``)."""
        return {n: b.detach().clone() for n, b in self._gm.named_buffers()}

    def tangent(
        self,
        record: TapeRecord,
        theta: dict[int, Tensor],
        tangents: dict[int, Tensor],
        *,
        release: bool = False,
    ) -> Tensor | None:
        """d logits along the parameter tangent, at the recorded pass.

        ``theta`` and ``tangents`` map ``id(parameter)`` to the parameter's value at the record
        (theta_t) and to its tangent; a parameter without a tangent contributes nothing, one not in
        ``theta`` is read as it is now. Run it under ``torch.no_grad()`` (J is a constant) and the
        record pass's autocast. ``release``: take the saved primals out of ``record`` so that each
        is freed after its last reader (the record cannot be used again). Returns None when the
        logits do not depend on the tangent."""
        val = dict(zip(self._saved_keys, record.saved))
        if release:
            record.saved = ()
        tan: dict = {}
        for node, p in self._attr_params:
            val[node] = theta.get(id(p), p.detach())
            t = tangents.get(id(p))
            if t is not None:
                tan[node] = t
        for node, fetch in self._attr_values:
            val[node] = fetch()
        metas = record.metas
        rng = RngState(_device_of(record.logits)) if self._has_generic else None
        with dual_level() if self._has_generic else _nullcontext():
            for step in self._steps:
                t = step.rule(val, tan, theta, tangents)
                if isinstance(t, Tensor):
                    meta = metas[step.meta]
                    if meta is not None:
                        shape, dtype = meta
                        if t.dtype != dtype:
                            t = t.to(dtype)
                        if t.shape != shape:
                            t = t.expand(shape)
                if t is not None:
                    tan[step.node] = t
                for k in step.free:
                    val.pop(k, None)
                    tan.pop(k, None)
        if rng is not None and not _same_rng(rng, RngState(rng.device)):
            rng.restore()  # as if the pass had drawn nothing
            # The pass only shows that the random stream moved, not which operation moved it:
            # every operation without a rule is named, as a candidate.
            raise TapeUnsupportedError(
                "an operation without a tangent rule draws random numbers (one of: "
                + ", ".join(self.generic_ops)
                + ")"
            )
        return tan.get(self._out)

    def describe(self) -> dict:
        """What the tape does: nodes, hand-written rules, generic (forward-AD) nodes."""
        generic = sum(s.generic for s in self._steps)
        return {
            "nodes": self.num_nodes,
            "tangent_nodes": len(self._steps),
            "rules": len(self._steps) - generic,
            "generic": generic,
            "generic_ops": list(self.generic_ops),
            "saved": len(self._saved_keys),
        }


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def _device_of(t: Tensor) -> torch.device:
    return t.device


def _same_rng(a: RngState, b: RngState) -> bool:
    if not torch.equal(a.cpu, b.cpu):
        return False
    if a.cuda is None:
        return True
    assert b.cuda is not None  # both snapshots are of one device
    return torch.equal(a.cuda, b.cuda)


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    return f"{node.op} {node.target}"


def relative_error(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    den = float(b.norm())
    num = float((a - b).norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def tolerance(dtype: torch.dtype, tf32: bool) -> float:
    """How far two computations of one derivative may be apart (relative) before the step calls
    them different: the tape's first record, backward and J against the module's forward, backward
    and forward AD, and the two sides of the student's adjoint check. Both compute the same
    function in another order. Measured on CPU (WRN-28-2, EfficientNet-B0, digits CNN): the logits
    agree bit for bit; J agrees to ~1e-15 in float64, ~1e-6 in float32, and only to 0.6-3.3e-2
    under bf16 autocast, where each is 6-120% away from float64 J anyway. A graph that computes
    something else is off by O(1), which the loose low-precision bar still catches."""
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32 and not tf32:
        return 1e-3
    return 0.25


__all__: Sequence[str] = (
    "JVP_MODES",
    "TangentTape",
    "TapeRecord",
    "TapeUnsupportedError",
    "CompiledGraphRefused",
    "module_signature",
    "relative_error",
    "tolerance",
)
