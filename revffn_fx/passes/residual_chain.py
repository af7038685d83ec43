"""The residual stream of a layer graph, read as a chain of sums.

Walking back from the output, the residual stream is a chain of sums
``v = r + b_1 + ... + b_k`` where ``r`` dominates every ``b_i`` (each branch depends on the
layer input only through ``r``), down to the input: one branch is a sequential sublayer,
several a parallel residual. Each branch is every node between ``r`` and ``b_i``
(:func:`branch_nodes`). :class:`LayerFlow` holds the data flow from the layer's hidden
input; :func:`walk_back` reads the chain off it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}

#: one sum of the chain: ``(r, [(c_i, b_i)], add nodes)`` (see :func:`residual_step`)
Step = tuple[fx.Node, list[tuple[fx.Node, fx.Node]], list[fx.Node]]


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def scale_of(node: fx.Node) -> tuple[fx.Node, float] | None:
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


def dominates(idom: dict[fx.Node, fx.Node], a: fx.Node, b: fx.Node) -> bool:
    while b in idom:
        if b is a:
            return True
        b = idom[b]
    return b is a


def branch_nodes(g: nx.DiGraph, r: fx.Node, b: fx.Node) -> list[fx.Node]:
    """Nodes that depend on ``r`` and feed ``b`` (``b`` included), in graph order."""
    between = (nx.descendants(g, r) & (nx.ancestors(g, b) | {b}))
    return sorted(between, key=lambda n: list(n.graph.nodes).index(n))


def sum_terms(node: fx.Node, g: nx.DiGraph) -> tuple[list[Any], list[fx.Node]]:
    """The terms of the sum computed by ``node`` (an add), expanding operand additions
    used only by this sum, and the add nodes of the sum."""
    terms: list[Any] = []
    adds = [node]
    for a in node.args[:2]:
        if isinstance(a, fx.Node) and is_add(a) and len(a.users) == 1 and a in g:
            sub_terms, sub_adds = sum_terms(a, g)
            terms += sub_terms
            adds += sub_adds
        else:
            terms.append(a)
    return terms, adds


def _chain(r: fx.Node, g: nx.DiGraph, idom: dict[fx.Node, fx.Node],
           memo: dict[fx.Node, Step | None]) -> list[fx.Node]:
    """The residual stream values from ``r`` back as far as it is a chain of sums."""
    out = [r]
    while True:
        step = residual_step(out[-1], g, idom, memo)
        if step is None:
            return out
        out.append(step[0])


def residual_step(v: fx.Node, g: nx.DiGraph, idom: dict[fx.Node, fx.Node],
                  memo: dict[fx.Node, Step | None] | None = None) -> Step | None:
    """``v = r + b_1 + ... + b_k``, each ``b_i`` reading the layer input only through one
    value ``c_i`` of the residual stream: ``r`` itself (``r`` dominates ``b_i``), or an
    earlier value of the chain that leads to ``r`` with no later value in between (a
    shortcut that skips updates). Returns ``(r, [(c_i, b_i)], add nodes)``, else None."""
    memo = {} if memo is None else memo
    if v in memo:
        return memo[v]
    memo[v] = None  # a cycle cannot be a chain
    if not is_add(v):
        return None
    terms, adds = sum_terms(v, g)
    dependent = [t for t in terms if isinstance(t, fx.Node) and t in g]
    order = list(v.graph.nodes)
    for r in sorted(dependent, key=order.index):
        others = [t for t in dependent if t is not r]
        if not others:
            continue
        branches = _branches_from(r, others, g, idom, memo)
        if branches is not None:
            memo[v] = (r, sorted(branches, key=lambda cb: order.index(cb[1])), adds)
            return memo[v]
    return None


def _branches_from(r: fx.Node, others: list[fx.Node], g: nx.DiGraph,
                   idom: dict[fx.Node, fx.Node], memo: dict[fx.Node, Step | None]
                   ) -> list[tuple[fx.Node, fx.Node]] | None:
    """With ``r`` as the residual term of a sum, the stream value ``c_i`` each of the
    ``others`` reads the input through, as ``[(c_i, b_i)]``; None if one reads it some
    other way."""
    branches: list[tuple[fx.Node, fx.Node]] = []
    chain: list[fx.Node] | None = None
    for t in others:
        if dominates(idom, r, t):
            branches.append((r, t))
            continue
        chain = chain if chain is not None else _chain(r, g, idom, memo)
        k = next((k for k in range(1, len(chain)) if dominates(idom, chain[k], t)), 0)
        # the branch reads that earlier value only: no later stream value feeds it
        if not k or nx.ancestors(g, t) & set(chain[:k]):
            return None
        branches.append((chain[k], t))
    return branches


def branch_add(adds: list[fx.Node], b: fx.Node) -> fx.Node:
    """The add node of a sum that takes ``b`` as an operand."""
    return next((a for a in adds if b in a.args[:2]), adds[0])


@dataclass
class LayerFlow:
    """A layer graph seen from its hidden-state input.

    ``g``: the nodes reachable from ``hidden``, ``idom`` their immediate dominators;
    ``result``: the hidden state the layer returns; ``order``: the graph's nodes in order;
    ``trunk``: the nodes every path from the input to the output passes (the residual
    stream itself); ``trunk_adds``: the sums on it with a term it dominates directly.
    """

    gm: fx.GraphModule
    modules: dict[str, Any]
    hidden: fx.Node
    g: nx.DiGraph
    idom: dict[fx.Node, fx.Node]
    result: Any
    order: list[fx.Node]
    trunk: list[fx.Node]
    trunk_adds: set[fx.Node]


def layer_flow(gm: fx.GraphModule, modules: dict[str, Any], hidden_name: str) -> LayerFlow:
    """The :class:`LayerFlow` of ``gm`` from its placeholder ``hidden_name``."""
    hidden = hidden_node(gm, hidden_name)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    g, idom = dataflow(gm, hidden)
    result = out.args[0]
    if isinstance(result, (tuple, list)):
        result = result[0]
    order = list(gm.graph.nodes)
    trunk = [n for n in g.nodes if n is not hidden and dominates(idom, n, out)]
    trunk_adds = {n for n in trunk if is_add(n)
                  and any(isinstance(a, fx.Node) and a in g and idom.get(n) is a
                          for a in n.args[:2])}
    return LayerFlow(gm, modules, hidden, g, idom, result, order, trunk, trunk_adds)


def walk_back(flow: LayerFlow, memo: dict[fx.Node, Step | None]) -> tuple[list[Step], Any]:
    """The sums of the chain from the layer output back, in graph order, and the value
    where the walk stopped (the hidden input when the whole layer is a chain)."""
    steps: list[Step] = []
    v = flow.result
    while isinstance(v, fx.Node) and v is not flow.hidden:
        step = residual_step(v, flow.g, flow.idom, memo) if v in flow.g else None
        if step is None:
            break
        steps.append(step)
        v = step[0]
    steps.reverse()
    return steps, v
