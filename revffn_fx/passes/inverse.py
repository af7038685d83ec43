"""Inverse generation: read a coupling graph's updates off its data flow and emit the inverse.

In a coupling graph the hidden state is split into streams; an ``add`` whose one operand
is the current value of a stream is an update ``stream[t] += u``, and the nodes that feed
``u`` form its branch. Which streams the branch reads decides the inverse:
- it does not read stream t: ``x_t = y_t - branch(...)`` (closed form);
- it reads stream t: ``x_t`` solves ``x = y_t - branch(..., x, ...)`` (fixed point).
An update may keep a fraction of the stream, ``stream[t] = c * stream[t] + u`` (the
coupling pass tags the ``* c`` node "coupling_scale"); its inverse divides by ``c``.
The result is the list of runtime updates: their ``invert`` (and the fixed-point solver)
is the one inverse there is, what the backward runs and what ``rf.verify`` checks.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from ..errors import ConversionError
from ..runtime.layers import RevLayer, Update
from ..runtime.sampled import SampledUpdate
from ..runtime.streams import MERGES, SPLITS


@dataclass
class ReversibleSpec:
    """A coupling ready for the runtime: its updates and its forward graph."""

    split: str
    updates: list[Update]
    forward: fx.GraphModule

    def layer(self, name: str) -> RevLayer:
        """The runtime layer (one per spec, shared by every graph of this mode)."""
        if getattr(self, "_layer", None) is None:
            self._layer = RevLayer(list(self.updates), name)
        return self._layer


def extract(gm: fx.GraphModule, inputs: list[fx.Node], output: fx.Node,
            name: str) -> tuple[fx.GraphModule, list[str]]:
    """The subgraph computing ``output`` from ``inputs`` and the graph's other placeholders.

    Returns the GraphModule (placeholders: one per input, then the context placeholders
    it uses, by their original names) and those context names.
    """
    stop = set(inputs)
    # what the output needs, not looking past the inputs (the split, the hidden input and
    # earlier branches are upstream of them; context inputs those also read are kept)
    needed = _ancestors_until(output, stop)
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for k, i in enumerate(inputs):
        env[i] = graph.placeholder(f"s{k}")
    order = [n for n in gm.graph.nodes if n in needed and n not in stop]
    ctx_names = [n.name for n in order if n.op == "placeholder"]
    root: dict[str, Any] = {}
    for n in order:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n.op in ("call_module", "get_attr"):
            obj: Any = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            root[n.target] = obj
    graph.output(env[output])
    graph.lint()
    return fx.GraphModule(root, graph, class_name=name), ctx_names


def _ancestors_until(node: fx.Node, stops: set[fx.Node]) -> set[fx.Node]:
    """Ancestors of ``node`` (itself included), not looking past the ``stops``."""
    seen, todo = {node}, [node]
    while todo:
        n = todo.pop()
        if n in stops:
            continue
        for i in n.all_input_nodes:
            if i not in seen:
                seen.add(i)
                todo.append(i)
    return seen


def _scaled(node: Any, current: list[fx.Node]) -> bool:
    """``node`` is ``stream * c`` for a current stream and a number ``c`` that a coupling
    pass tagged "coupling_scale": the kept part of a scaled update (momentum, meft)."""
    return (isinstance(node, fx.Node) and node.meta.get("revffn") == "coupling_scale"
            and node.op == "call_function" and node.target is operator.mul
            and node.args[0] in current and isinstance(node.args[1], (int, float))
            and node.args[1] != 0)


def generate_inverse(coupling: fx.GraphModule) -> ReversibleSpec:
    """Analyse a coupling graph into the runtime's updates (each knows its inverse)."""
    graph = coupling.graph
    split_fns = {v: k for k, v in SPLITS.items()}
    split = next((n for n in graph.nodes
                  if n.op == "call_function" and n.target in split_fns), None)
    if split is None:
        raise ConversionError("coupling graph has no split of the hidden state")
    kind = split_fns[split.target]
    streams = sorted((u for u in split.users), key=lambda u: u.args[1])
    current: list[fx.Node] = list(streams)
    versions = set(streams)
    updates: list[Update] = []
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is operator.add):
            continue
        a, b = node.args[:2]
        scale = 1.0
        if a in current:
            t, u = current.index(a), b
        elif b in current:
            t, u = current.index(b), a
        elif _scaled(a, current):
            t, u, scale = current.index(a.args[0]), b, float(a.args[1])
        else:
            continue
        anc = _ancestors_until(u, set(current))
        stale = [v for v in versions if v in anc and v not in current]
        if stale:
            raise ConversionError(f"branch of {node.name} reads an overwritten stream value "
                                  f"({stale[0].name}): not reversible")
        reads = [i for i, v in enumerate(current) if v in anc]
        branch, ctx_names = extract(coupling, [current[i] for i in reads], u,
                                    f"Branch_{node.name}")
        if scale != 1.0 and a.meta.get("revffn_sampled"):  # bdia: sign drawn per sample
            updates.append(SampledUpdate(branch, t, reads, ctx_names, scale))
        else:
            updates.append(Update(branch, t, reads, ctx_names, scale))
        current[t] = node
        versions.add(node)
    merge = next((n for n in graph.nodes if n.op == "call_function"
                  and n.target in MERGES.values()), None)
    if merge is None or list(merge.args) != current:
        raise ConversionError("coupling graph does not merge the final streams")
    return ReversibleSpec(kind, updates, coupling)
