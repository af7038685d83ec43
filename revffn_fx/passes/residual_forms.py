"""The residual form of a layer that is not a chain of updates ``x + f(x)``, as refusals
name it (:data:`FORMS`): the first operation applied to the residual stream itself, or
what the layer's last sum does to its residual side."""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from ..frontend.ir import LayerGraph
from .classify import is_norm_call
from .residual_chain import LayerFlow, branch_nodes, is_add, sum_terms

# the residual forms that are not x + f(x), as refusals name them
FORMS = {
    "scaled": "the stream itself is multiplied by a constant or a scalar: a*x + b*f(x)",
    "gated": "the stream is multiplied by a gate computed from the input: (1-g)*x + g*f(x)",
    "affine": "the stream is multiplied by or added to learned parameters: w*x + c + f(x)",
    "hyper-connection": "the streams are mixed by a learned matrix: H x + f(x)",
    "post-norm": "a norm is applied to the stream after the update: norm(x + f(x))",
    "norm-residual": "the residual is taken after a norm: a*norm(x) + b*f(norm(x))",
    "other": "an operation is applied to the stream itself: h(x) + f(x)",
}
_PASSIVE = {"getitem", "to", "contiguous", "view", "reshape", "float", "type_as", "clone",
            "detach", "squeeze", "unsqueeze", "flatten", "expand", "dropout", "type"}
_MATMUL = {"einsum", "matmul", "bmm", "mm", "linear", "tensordot", "__matmul__"}


def _op_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _form_of(node: fx.Node, g: nx.DiGraph, modules: dict[str, Any], hidden: fx.Node,
             stream: fx.Node) -> str | None:
    """The residual form ``node`` (an operation applied to the residual stream value
    ``stream``) gives the layer, or None for a passive op (view, cast)."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        if is_norm_call(modules, node):
            return "norm-residual" if stream is hidden else "post-norm"
        if isinstance(mod, torch.nn.Linear):
            return "hyper-connection"
        return "other"
    name = _op_name(node).lstrip("_").rstrip("_")
    if name in _PASSIVE or node.op not in ("call_function", "call_method"):
        return None
    others = [a for a in [*node.args, *node.kwargs.values()] if a is not stream]
    if name in _MATMUL:
        return "hyper-connection"
    if name in ("mul", "imul", "truediv", "div", "add", "iadd", "sub", "rsub"):
        tensors = [a for a in others if isinstance(a, fx.Node)]
        if not tensors:
            return "scaled" if name not in ("add", "iadd", "sub", "rsub") else "affine"
        if any(a in g for a in tensors):
            return "gated"  # the factor depends on the layer input
        params = [a for a in tensors if a.op == "get_attr"]
        if params and name in ("mul", "imul", "truediv", "div"):
            try:
                value = node.graph.owning_module.get_parameter(params[0].target)
            except AttributeError:
                try:
                    value = node.graph.owning_module.get_buffer(params[0].target)
                except AttributeError:
                    value = None
            if value is not None and value.numel() == 1:
                return "scaled"
        return "affine"
    return "other"


def residual_stack(layer: LayerGraph) -> str | None:
    """The name of a layer input that stacks several residual states (batch, seq, n,
    hidden): hyper-connections and depth-attention residuals read one."""
    example = getattr(layer, "example", None) or {}
    hidden = example.get(layer.call.hidden_name)
    if not isinstance(hidden, torch.Tensor):
        return None
    for name, value in example.items():
        if (name != layer.call.hidden_name and isinstance(value, torch.Tensor)
                and value.dim() == hidden.dim() + 1 and value.shape[-1] == hidden.shape[-1]
                and value.shape[:2] == hidden.shape[:2] and value.is_floating_point()):
            return name
    return None


def stream_form(flow: LayerFlow) -> tuple[str, str] | None:
    """The residual form of a layer that is not a chain of updates x + f(x), with the node
    where it shows: the first operation on the residual stream itself (the trunk) that is
    not an addition, or else what the last sum does to its residual side."""
    gm, modules, g, hidden, trunk = flow.gm, flow.modules, flow.g, flow.hidden, flow.trunk
    order = list(gm.graph.nodes)
    if not any(is_add(n) for n in trunk):
        return _side_form(gm, modules, g, hidden, flow.result)
    for node in sorted(trunk, key=order.index):
        if is_add(node):
            continue
        stream = next((a for a in node.all_input_nodes if a in g
                       and (a is hidden or a in trunk)), None)
        form = _form_of(node, g, modules, hidden, stream) if stream is not None else None
        if form is not None:
            return form, node.name
    return _side_form(gm, modules, g, hidden, flow.result)


def _side_form(gm: fx.GraphModule, modules: dict[str, Any], g: nx.DiGraph,
               hidden: fx.Node, result: Any) -> tuple[str, str] | None:
    """What the layer's last sum does to its residual side (the term nearest the input)."""
    # no trunk op: the sum's residual side is some function of the input
    v = result
    if not (isinstance(v, fx.Node) and v in g and is_add(v)):
        return None
    terms = [t for t in sum_terms(v, g)[0] if isinstance(t, fx.Node) and t in g]
    if len(terms) < 2:
        return None
    def length(t: fx.Node) -> int:
        return len(branch_nodes(g, hidden, t))

    side = min(terms, key=length)
    chain = []  # the stream's way from the input to the residual side, last op first
    node = side
    while node is not hidden and len(chain) < 64:
        chain.append(node)
        ins = [a for a in node.all_input_nodes if a in g]
        if not ins:
            break
        node = hidden if hidden in ins else min(ins, key=length)
    normed = False
    for node in reversed(chain):
        prev = [a for a in node.all_input_nodes if a is hidden or a in chain]
        form = _form_of(node, g, modules, hidden, prev[0] if prev else None)
        if form in ("post-norm", "norm-residual"):
            normed = True
            continue
        if form is not None:
            return ("norm-residual" if normed else form), node.name
    return ("norm-residual", chain[-1].name) if normed else None
