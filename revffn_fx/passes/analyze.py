"""Analysis pass: find the residual sublayers of each decoder layer graph.

A residual addition is an ``add`` on the layer's trunk (it dominates the output: every
path from the input to the output passes through it) whose immediate dominator is one of
its own operands: ``out = r + b`` where ``b`` depends on the input only through ``r``.
The branch is every node between ``r`` and ``b``. Nothing here depends on class names.
"""

from __future__ import annotations

import operator
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from ..ir import LayerGraph, TracedModel
from ..plan import LayerPlan, Plan, Sublayer
from ..registry import facts_for
from ..runtime.router import find_routers
from .classify import branch_kind, module_kind

_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def _scale_of(node: fx.Node) -> tuple[fx.Node, float] | None:
    """``node = y * c`` (or ``c * y``) with a Python constant ``c``: (y, c)."""
    is_mul = (node.op == "call_function" and node.target in _MUL) or (
        node.op == "call_method" and node.target in ("mul", "mul_"))
    if not is_mul or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, (int, float)):
        return a, float(b)
    if isinstance(b, fx.Node) and isinstance(a, (int, float)):
        return b, float(a)
    return None


def hidden_node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name)


def dataflow(gm: fx.GraphModule, source: fx.Node) -> tuple[nx.DiGraph, dict[fx.Node, fx.Node]]:
    """The subgraph of nodes reachable from ``source`` and their immediate dominators."""
    g = nx.DiGraph()
    g.add_node(source)
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    reach = nx.descendants(g, source) | {source}
    sub = g.subgraph(reach)
    idom = nx.immediate_dominators(sub, source)
    idom.pop(source, None)
    return sub, idom


def _dominates(idom: dict[fx.Node, fx.Node], a: fx.Node, b: fx.Node) -> bool:
    while b in idom:
        if b is a:
            return True
        b = idom[b]
    return b is a


def _branch_nodes(g: nx.DiGraph, r: fx.Node, b: fx.Node) -> list[fx.Node]:
    """Nodes that depend on ``r`` and feed ``b`` (``b`` included), in graph order."""
    between = (nx.descendants(g, r) & (nx.ancestors(g, b) | {b}))
    return sorted(between, key=lambda n: list(n.graph.nodes).index(n))


def analyze_layer(layer: LayerGraph, overrides: dict[str, str] | None = None,
                  training: bool | None = None, routers: set[int] | None = None) -> LayerPlan:
    """Find the residual sublayers of one layer and decide if it can be coupled."""
    gm = layer.trace(training)
    modules = dict(gm.named_modules())
    hidden = hidden_node(gm, layer.call.hidden_name)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    g, idom = dataflow(gm, hidden)
    result = out.args[0]
    if isinstance(result, (tuple, list)):
        result = result[0]
    trunk = [n for n in g.nodes if n is not hidden and _dominates(idom, n, out)]
    trunk.sort(key=lambda n: list(gm.graph.nodes).index(n))
    sublayers: list[Sublayer] = []
    odd = None
    for add in (n for n in trunk if is_add(n)):
        ops = [a for a in add.args[:2] if isinstance(a, fx.Node) and a in g]
        if len(ops) != 2:
            continue
        d = idom[add]
        if d in ops:
            r = d
            b = ops[1] if ops[0] is d else ops[0]
            sub = _sublayer(gm, modules, g, hidden, r, b, add, overrides, routers)
            sublayers.append(sub)
        else:
            odd = _norm_residual(gm, modules, g, hidden, d, ops, add, overrides, routers)
            sublayers.append(odd)
    reason = ""
    if not sublayers:
        reason = "no residual connection: the layer output is not of the form x + f(x)"
    elif odd is not None:
        reason = (f"the residual is taken after {odd.residual_node}, which is on the "
                  "residual stream itself: the layer is not of the form x + f(x)")
    elif len(sublayers) != 2:
        reason = (f"{len(sublayers)} residual branch(es); a coupling needs exactly two "
                  "consecutive ones (token mixing, then feed-forward)")
    else:
        first, second = sublayers
        names = {n.name: n for n in gm.graph.nodes}
        if names[first.residual_node] is not hidden:
            reason = ("computation on the residual stream before the first branch "
                      f"({first.residual_node})")
        elif names[second.residual_node] is not names[first.add_node]:
            reason = (f"computation on the residual stream between the branches "
                      f"({first.add_node} -> {second.residual_node})")
        elif names[second.add_node] is not result:
            reason = f"computation on the residual stream after the last branch ({result})"
    return LayerPlan(layer.index, layer.qualname, sublayers, convertible=not reason, reason=reason)


def _norm_kind(modules: dict[str, Any], node: Any) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and module_kind(modules[node.target], node, node) == "norm")


def _sublayer(gm: fx.GraphModule, modules: dict[str, Any], g: nx.DiGraph, hidden: fx.Node,
              r: fx.Node, b: fx.Node, add: fx.Node,
              overrides: dict[str, str] | None, routers: set[int] | None = None) -> Sublayer:
    nodes = _branch_nodes(g, r, b)
    scale = None
    core = b
    scaled = _scale_of(b)
    if scaled is not None:
        core, scale = scaled
    norm_before = next((n.target for n in nodes if _norm_kind(modules, n)
                        and r in n.all_input_nodes), None)
    # post-norm: the branch output (after dtype casts, dropout) comes straight from a norm
    probe = core
    while (isinstance(probe, fx.Node) and probe.op in ("call_method", "call_function")
           and probe.all_input_nodes and not _norm_kind(modules, probe)):
        probe = probe.all_input_nodes[0]
        if probe is r:
            break
    norm_after = probe.target if _norm_kind(modules, probe) and probe is not norm_before else None
    if norm_after == norm_before:
        norm_after = None
    mods, kinds = [], {}
    for n in nodes:
        if n.op == "call_module":
            mods.append(n.target)
            kinds[n.target] = module_kind(modules[n.target], n, hidden, overrides, routers)
    kind = branch_kind([k for k in kinds.values() if k != "norm"])
    if scale is not None and scale != 1.0:
        form = "scaled"
    elif norm_before and norm_after:
        form = "sandwich"
    elif norm_before:
        form = "pre_norm"
    elif norm_after:
        form = "post_norm"
    else:
        form = "plain"
    return Sublayer(kind=kind, residual_form=form, scale=scale, norm_before=norm_before,
                    norm_after=norm_after, modules=mods, module_kinds=kinds,
                    nodes=[n.name for n in nodes], residual_node=r.name, add_node=add.name)


def _norm_residual(gm: fx.GraphModule, modules: dict[str, Any], g: nx.DiGraph,
                   hidden: fx.Node, d: fx.Node, ops: list[fx.Node], add: fx.Node,
                   overrides: dict[str, str] | None, routers: set[int] | None) -> Sublayer:
    """``out = a * d + c * f(d)``: the residual side is scaled (minimax)."""
    sides = sorted(ops, key=lambda n: len(_branch_nodes(g, d, n)))
    sub = _sublayer(gm, modules, g, hidden, d, sides[1], add, overrides, routers)
    sub.residual_form = "norm_residual"
    return sub


def router_ids(model: Any) -> set[int]:
    """Ids of the modules whose outputs the model records as router logits."""
    return {id(m) for m in find_routers(model)[0]}


def analyze(traced: TracedModel, training: bool | None = None) -> Plan:
    """Analyse every decoder layer of ``traced`` into a :class:`Plan`."""
    config = traced.config
    model_type = getattr(config, "model_type", None)
    overrides = facts_for(model_type).kind_overrides
    routers = router_ids(traced.model)
    layers = [analyze_layer(lg, overrides, training, routers) for lg in traced.layers]
    params = sum(p.numel() for p in traced.model.parameters())
    dtype = next(traced.model.parameters()).dtype
    experts = None
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        experts = experts or getattr(config, key, None)
    if experts is None and config is not None and hasattr(config, "ffn_config"):
        experts = getattr(config.ffn_config, "moe_num_experts", None)
    hidden = None
    if config is not None:
        hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    info = {"model_type": model_type, "class": type(traced.model).__name__,
            "hidden_size": hidden, "num_layers": len(layers), "num_experts": experts,
            "parameters": params, "dtype": str(dtype).replace("torch.", "")}
    return Plan(layers, info)
