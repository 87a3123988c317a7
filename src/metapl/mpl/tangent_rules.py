"""The tangent rule of each operation of a traced student (:mod:`metapl.mpl.tangent`).

A rule maps the saved primals, the tangents of a node's inputs, theta_t and the parameters'
tangents to the node's tangent: ``rule(val, tan, theta, tw) -> tangent``. Hand-written rules cover
the common operations (conv, linear, BatchNorm, the ReLU family, SiLU, sigmoid, GELU, + - * /,
matmul, reductions, reshapes, pooling, cat, dropout; the math is in :mod:`metapl.mpl.tangent_ops`);
any other operation gets the generic rule, which differentiates that node alone by forward AD from
its saved inputs. :meth:`TangentRules.rule` also says which primals the rule reads, so that the
record pass saves exactly those.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from metapl.mpl import tangent_ops as ops
from metapl.mpl.inputs import restoring_functional_call

Rule = Callable[[dict, dict, dict, dict], object]


class TangentRules:
    """Builds the rules of one traced graph: ``modules`` are its modules by name, ``active`` the
    nodes that carry a tangent, ``trainable_ids`` the ids of the parameters that may carry one.
    After the rules are built, ``dropouts`` maps each dropout node on the tangent's path to its
    input (the record pass draws its mask as a separate output), and ``bn_stats`` holds the
    BatchNorm nodes whose batch statistics the record pass keeps, ``signs`` the inputs of ReLU-family
    nodes whose signs it keeps (:class:`~metapl.mpl.tangent_ops.PackedSigns`)."""

    def __init__(self, modules: dict, active: set[fx.Node], trainable_ids: set[int]):
        self._modules = modules  # name -> nn.Module (a dict: fx types node.target wider than str)
        self._active = active
        self._trainable_ids = trainable_ids
        self.dropouts: dict[fx.Node, tuple] = {}
        # BatchNorm modules' nodes whose statistics the record pass keeps (ops.saved_bn_stats)
        self.bn_stats: set[fx.Node] = set()
        # activations' inputs whose signs the record pass keeps, packed (one for all readers)
        self.signs: set[fx.Node] = set()
        # each ReLU-family rule: (node, input, slope, its needs: the one key it reads)
        self._sign_sources: list[tuple[fx.Node, fx.Node, float, list]] = []

    def rule(self, node: fx.Node) -> tuple[Rule, list, bool]:
        """(rule, primal keys it reads, whether it is the generic forward-AD rule)."""
        made = None
        if node.op == "call_module":
            made = self._module_rule(node, self._modules[node.target])
        elif node.op == "call_function":
            made = self._function_rule(node)
        elif node.op == "call_method":
            made = self._method_rule(node)
        if made is not None:
            return (*made, False)
        return self._generic_rule(node), [n for n in node.all_input_nodes if n is not None], True

    def _module_rule(self, node: fx.Node, m: nn.Module):
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        x = node.args[0]
        kind = type(m)
        x_active = x in self._active
        if kind in ops.DROPOUT_MODULES:
            return self._dropout_rule(node, x)
        if kind in ops.CONV_MODULES and m.padding_mode == "zeros":
            nd = ops.CONV_MODULES[kind]
            fn = ops.CONV_BY_DIM[nd]
            args = (m.stride, m.padding, m.dilation, m.groups)
            return self._param_affine_rule(node, m, x, fn, args, (-1,) + (1,) * nd)
        if kind is nn.Linear:
            return self._param_affine_rule(node, m, x, F.linear, (), (-1,))
        if kind in ops.BN_MODULES:
            w, b = m.weight, m.bias
            stats = ("bn_stats", node)  # what the record pass saved of its statistics
            self.bn_stats.add(node)

            def bn_rule(val, tan, theta, tw):
                batch_stats = m.training or (m.running_mean is None and m.running_var is None)
                gamma = None if w is None else theta.get(id(w), w)
                return ops.bn_tangent(
                    val[x], tan.get(x), gamma,
                    None if w is None else tw.get(id(w)),
                    None if b is None else tw.get(id(b)),
                    batch_stats, m.running_mean, m.running_var, m.eps, val.get(stats),
                )  # fmt: skip

            return bn_rule, [x, stats]
        if not x_active:
            return None
        if kind is nn.ReLU:
            return self._sign_rule(node, x, 0.0)
        if kind is nn.LeakyReLU:
            return self._sign_rule(node, x, cast(nn.LeakyReLU, m).negative_slope)
        if kind is nn.SiLU:
            return self._unary_rule(node, x, ops.silu_t, x=True)
        if kind is nn.Sigmoid:
            return self._unary_rule(node, x, ops.sigmoid_t, y=True)
        if kind is nn.GELU:
            return self._unary_rule(node, x, ops.gelu_t(cast(nn.GELU, m).approximate), x=True)
        if isinstance(m, ops.LINEAR_MODULES) and not any(True for _ in m.parameters()):

            def linear_module_rule(val, tan, theta, tw):
                dx = tan.get(x)
                return None if dx is None else m(dx)

            return linear_module_rule, []
        return None

    def _param_affine_rule(self, node, m, x, fn, args, bias_shape):
        w, b = m.weight, m.bias

        def rule(val, tan, theta, tw):
            return ops.affine_tangent(
                fn, lambda: val[x], tan.get(x), lambda: theta.get(id(w), w),
                tw.get(id(w)), None if b is None else tw.get(id(b)), args, bias_shape,
            )  # fmt: skip

        return rule, ([x] if id(w) in self._trainable_ids else [])

    def _function_rule(self, node: fx.Node):
        t = node.target
        if t in ops.DROPOUT_FUNCTIONS:
            stub = ops.sig_torch_dropout if t is torch.dropout else ops.sig_dropout
            a = ops.bind(stub, node)
            if a is None or not isinstance(a["input"], fx.Node):
                return None
            return self._dropout_rule(node, a["input"])
        if t in ops.CONV_FUNCTIONS:
            a = ops.bind(ops.sig_conv, node)
            if a is None:
                return None
            rest = [a[k] for k in ("stride", "padding", "dilation", "groups")]
            nd = ops.CONV_FUNCTIONS[t]
            return self._functional_affine_rule(a, t, rest, (-1,) + (1,) * nd)
        if t is F.linear:
            a = ops.bind(ops.sig_linear, node)
            return None if a is None else self._functional_affine_rule(a, F.linear, [], (-1,))
        if t is F.batch_norm:
            a = ops.bind(ops.sig_bn, node)
            if a is None or not isinstance(a["input"], fx.Node):
                return None
            return self._functional_bn_rule(a)
        if t in (F.relu, torch.relu):
            a = ops.bind(ops.sig_act if t is F.relu else ops.sig_unary, node)
            if a is None or a.get("inplace") is True or not isinstance(a["input"], fx.Node):
                return None
            return self._sign_rule(node, a["input"], 0.0)
        if t is F.leaky_relu:
            a = ops.bind(ops.sig_leaky, node)
            if (
                a is None
                or not isinstance(a["input"], fx.Node)
                or ops.nodes_in(a["negative_slope"])
            ):
                return None
            return self._sign_rule(node, a["input"], a["negative_slope"])
        if t is F.silu:
            return self._unary_bound(node, ops.bind(ops.sig_act, node), ops.silu_t, x=True)
        if t in (torch.sigmoid, F.sigmoid):
            return self._unary_bound(node, ops.bind(ops.sig_unary, node), ops.sigmoid_t, y=True)
        if t is F.gelu:
            a = ops.bind(ops.sig_gelu, node)
            if a is None or ops.nodes_in(a["approximate"]):
                return None
            return self._unary_bound(node, a, ops.gelu_t(a["approximate"]), x=True)
        if t in ops.ADD_FUNCTIONS:
            a = ops.bind(ops.sig_binary, node)
            return None if a is None else self._add_rule(a, ops.ADD_FUNCTIONS[t])
        if t in ops.MUL_FUNCTIONS:
            a = ops.bind(ops.sig_binary, node)
            return None if a is None or a["alpha"] != 1 else self._mul_rule(a)
        if t in ops.DIV_FUNCTIONS:
            a = ops.bind(ops.sig_div, node)
            return None if a is None or a["rounding_mode"] is not None else self._div_rule(a)
        if t in ops.NEG_FUNCTIONS:
            a = ops.bind(ops.sig_unary, node)
            return None if a is None else self._neg_rule(a)
        if t in ops.MATMUL_FUNCTIONS:
            a = ops.bind(ops.sig_binary, node)
            return (
                None if a is None or a["alpha"] != 1 else self._mul_rule(a, ops.MATMUL_FUNCTIONS[t])
            )
        if t in ops.CAT_FUNCTIONS:
            a = ops.bind(ops.sig_cat, node)
            if a is None or not isinstance(a["tensors"], (list, tuple)):
                return None
            return self._cat_rule(a, ops.CAT_FUNCTIONS[t])
        if t is F.pad:
            return self._linear_rule(
                node, lambda dx, rest, kw: F.pad(dx, *rest[:2], **_no_value(kw))
            )
        if t in ops.LINEAR_FUNCTIONS:
            return self._linear_rule(node, lambda dx, rest, kw: t(dx, *rest, **kw))
        return None

    def _method_rule(self, node: fx.Node):
        name = node.target
        if name == "relu":
            a = ops.bind(ops.sig_unary, node)
            if a is None or not isinstance(a["input"], fx.Node):
                return None
            return self._sign_rule(node, a["input"], 0.0)
        if name == "sigmoid":
            return self._unary_bound(node, ops.bind(ops.sig_unary, node), ops.sigmoid_t, y=True)
        if name in ops.ADD_METHODS:
            a = ops.bind(ops.sig_binary, node)
            return None if a is None else self._add_rule(a, ops.ADD_METHODS[name])
        if name == "mul":
            a = ops.bind(ops.sig_binary, node)
            return None if a is None or a["alpha"] != 1 else self._mul_rule(a)
        if name in ops.DIV_METHODS:
            a = ops.bind(ops.sig_div, node)
            return None if a is None or a["rounding_mode"] is not None else self._div_rule(a)
        if name == "neg":
            a = ops.bind(ops.sig_unary, node)
            return None if a is None else self._neg_rule(a)
        if name in ops.MATMUL_METHODS:
            a = ops.bind(ops.sig_binary, node)
            return (
                None
                if a is None or a["alpha"] != 1
                else self._mul_rule(a, ops.MATMUL_METHODS[name])
            )
        if name in ops.LINEAR_METHODS:
            return self._linear_rule(node, lambda dx, rest, kw: getattr(dx, name)(*rest, **kw))
        return None

    # ------------------------------------------------------------------ rules

    def _dropout_rule(self, node: fx.Node, x: fx.Node):
        if x not in self._active:
            return None  # keep the plain call: nothing to record
        self.dropouts[node] = (x,)
        key = ("mask", node)

        def dropout_rule(val, tan, theta, tw):
            dx, mask = tan.get(x), val[key]
            if dx is None or mask is None:
                return dx
            if mask.dtype != dx.dtype:
                return (dx.to(mask.dtype) * mask).to(dx.dtype)
            return dx * mask

        return dropout_rule, [key]

    def _functional_affine_rule(self, a: dict, fn, rest: list, bias_shape):
        x, w, b = a["input"], a["weight"], a["bias"]
        if ops.nodes_in(rest) or not isinstance(w, fx.Node):
            return None
        needs = []
        if x in self._active or b in self._active:
            needs.append(w)
        if w in self._active and isinstance(x, fx.Node):
            needs.append(x)
        x_get, w_get = ops.late(x), ops.late(w)

        def rule(val, tan, theta, tw):
            return ops.affine_tangent(
                fn, lambda: x_get(val), ops.tan(tan, x), lambda: w_get(val), ops.tan(tan, w),
                ops.tan(tan, b), rest, bias_shape,
            )  # fmt: skip

        return rule, needs

    def _functional_bn_rule(self, a: dict):
        x, w, b = a["input"], a["weight"], a["bias"]
        rm, rv, training, eps = a["running_mean"], a["running_var"], a["training"], a["eps"]
        if ops.nodes_in([training, eps]):
            return None
        needs = [x] + [k for k in (w, rm, rv) if isinstance(k, fx.Node)]
        getters = [ops.late(k) for k in (w, rm, rv)]
        # Eval mode without running statistics never reaches the rule: F.batch_norm raises
        # ("running_mean must be defined in evaluation mode") in the update pass itself.
        batch_stats = bool(training)

        def rule(val, tan, theta, tw):
            gamma, mean, var = (g(val) for g in getters)
            return ops.bn_tangent(
                val[x],
                tan.get(x),
                gamma,
                ops.tan(tan, w),
                ops.tan(tan, b),
                batch_stats,
                mean,
                var,
                eps,
            )

        return rule, needs

    def _unary_bound(self, node, a: dict | None, fn, *, x: bool = False, y: bool = False):
        if a is None or a.get("inplace") is True or not isinstance(a["input"], fx.Node):
            return None
        return self._unary_rule(node, a["input"], fn, x=x, y=y)

    def _unary_rule(self, node, x_node: fx.Node, fn, *, x: bool = False, y: bool = False):
        """Elementwise activation: its tangent is its backward's formula applied to dx (the
        Jacobian is diagonal), reading the input (``x``) or the output (``y``: cheaper to keep,
        the next layer keeps it anyway)."""

        def rule(val, tan, theta, tw):
            dx = tan.get(x_node)
            if dx is None:
                return None
            return fn(dx, val[x_node] if x else None, val[node] if y else None)

        return rule, ([x_node] if x else []) + ([node] if y else [])

    def _sign_rule(self, node: fx.Node, x: fx.Node, slope: float):
        """ReLU (``slope`` 0) and leaky ReLU: their tangent needs only where the input is > 0.
        What the rule reads is chosen once every rule is built (:meth:`choose_sign_sources`);
        until then it needs the input's packed signs."""
        source = [("signs", x)]  # the rule's needs: the one key it reads, chosen later

        def sign_rule(val, tan, theta, tw):
            dx = tan.get(x)
            if dx is None:
                return None
            return ops.sign_t(dx, slope, val[source[0]], source[0] is node)

        self._sign_sources.append((node, x, slope, source))
        return sign_rule, source

    def choose_sign_sources(self, all_needs: list[list]) -> None:
        """Given every rule's needs (``all_needs``), for each ReLU-family rule: its output where another rule keeps that (and the slope is
        not negative: then the output has the input's sign), else its input where another rule
        keeps that, else the input's signs, packed 8 to a byte
        (:class:`~metapl.mpl.tangent_ops.PackedSigns`); fills :attr:`signs`.

        Why not the input or the output anyway: the tape keeps what it reads through the update
        pass's backward, where the exact step's memory peaks, and autograd frees an activation's
        input once the activation's backward has run. Reading the input everywhere kept both it
        and the output through the tangent pass (330 MiB over the first-order peak at Table 3's
        batch on the H200); reading WRN's last activation (before the pooling, which keeps
        nothing) put the peak 14 MiB above the first-order step's."""
        readers = {id(source) for _, _, _, source in self._sign_sources}
        kept = {k for needs in all_needs if id(needs) not in readers for k in needs}
        for node, x, slope, source in self._sign_sources:
            if slope >= 0 and node in kept:
                source[0] = node
            elif x in kept:
                source[0] = x
            else:
                self.signs.add(x)

    def _add_rule(self, a: dict, sign: int):
        x, other, alpha = a["input"], a["other"], a["alpha"]
        if ops.nodes_in(alpha):
            return None
        factor = sign * alpha

        def add_rule(val, tan, theta, tw):
            dx, do = ops.tan(tan, x), ops.tan(tan, other)
            if do is None:
                return dx
            if factor == 1:
                return do if dx is None else dx + do
            if dx is None:
                return do * factor
            return torch.add(dx, do, alpha=factor)

        return add_rule, []

    def _mul_rule(self, a: dict, fn=operator.mul):
        x, other = a["input"], a["other"]
        needs = []
        if x in self._active and isinstance(other, fx.Node):
            needs.append(other)
        if other in self._active and isinstance(x, fx.Node):
            needs.append(x)
        x_get, o_get = ops.late(x), ops.late(other)

        def mul_rule(val, tan, theta, tw):
            dx, do = ops.tan(tan, x), ops.tan(tan, other)
            out = None if dx is None else fn(dx, o_get(val))
            if do is not None:
                out = ops.plus(out, fn(x_get(val), do))
            return out

        return mul_rule, needs

    def _div_rule(self, a: dict):
        x, other = a["input"], a["other"]
        needs = [n for n in (other,) if isinstance(n, fx.Node)]
        if other in self._active and isinstance(x, fx.Node):
            needs.append(x)
        x_get, o_get = ops.late(x), ops.late(other)

        def div_rule(val, tan, theta, tw):
            dx, do = ops.tan(tan, x), ops.tan(tan, other)
            if dx is None and do is None:
                return None
            o = o_get(val)
            out = None if dx is None else dx / o
            if do is not None:  # d(x / o) = -(x / o) * do / o
                out = ops.plus(out, -(x_get(val) / o) * do / o)
            return out

        return div_rule, needs

    def _neg_rule(self, a: dict):
        x = a["input"]

        def neg_rule(val, tan, theta, tw):
            dx = ops.tan(tan, x)
            return None if dx is None else -dx

        return neg_rule, []

    def _cat_rule(self, a: dict, fn):
        parts, dim = a["tensors"], a["dim"]
        if ops.nodes_in(dim) or not all(isinstance(p, fx.Node) for p in parts):
            return None
        needs = [p for p in parts if p not in self._active]

        def cat_rule(val, tan, theta, tw):
            ts = [tan.get(p) for p in parts]
            if all(t is None for t in ts):
                return None
            ts = [torch.zeros_like(val[p]) if t is None else t for p, t in zip(parts, ts)]
            return fn(ts, dim)

        return cat_rule, needs

    def _linear_rule(self, node: fx.Node, apply):
        """Operations linear in their first argument (reshapes, reductions, pooling, indexing):
        the same call with the tangent in its place; the other arguments are primals."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        x, rest, kwargs = node.args[0], node.args[1:], node.kwargs
        others = ops.nodes_in([rest, kwargs])
        if any(n in self._active for n in others):
            return None
        rest_get, kw_get = ops.late(tuple(rest)), ops.late(dict(kwargs))

        def linear_rule(val, tan, theta, tw):
            dx = tan.get(x)
            if dx is None:
                return None
            return apply(dx, rest_get(val), kw_get(val))

        return linear_rule, others

    def _generic_rule(self, node: fx.Node) -> Rule:
        """Forward AD of this one operation from its saved inputs: exact for any differentiable op,
        at the price of recomputing its primal."""
        op, target = node.op, node.target
        module = self._modules[target] if op == "call_module" else None
        params = list(module.named_parameters()) if module is not None else []
        has_buffers = module is not None and any(True for _ in module.buffers())

        def generic_rule(val, tan, theta, tw):
            param_tangents = [tw.get(id(p)) for _, p in params]
            if all(n not in tan for n in node.all_input_nodes) and all(
                t is None for t in param_tangents
            ):
                return None

            def dual(n):
                return ops.make_dual(val[n], tan.get(n))

            args = fx.node.map_arg(node.args, dual)
            kwargs = fx.node.map_arg(node.kwargs, dual)
            if op == "call_function":
                out = target(*args, **kwargs)
            elif op == "call_method":
                out = getattr(args[0], target)(*args[1:], **kwargs)
            else:
                state = {}
                if has_buffers:  # copies: a module in train mode may update them
                    state.update({n: b.detach().clone() for n, b in module.named_buffers()})
                for (name, p), t in zip(params, param_tangents):
                    state[name] = ops.make_dual(theta.get(id(p), p.detach()), t)
                out = restoring_functional_call(module, state, tuple(args), dict(kwargs))
            return ops.unpack_tangent(out)

        return generic_rule


def _no_value(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "value"}
