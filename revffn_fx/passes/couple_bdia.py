"""Rewrite pass: a decoder layer becomes one bdia update (the whole layer is the branch).

    h -> split -> (a, b)             # two copies: the states before and after a layer
    L = layer(r)                     # the original layer graph, reading r = the newer state
    w = gamma * w + L'               # w = the older state; L' = (1+gamma) L - 2 gamma r
    out = merge(a, b)                # the stream written last

The pass emits ``w * gamma + L`` with the scale node tagged "coupling_scale" and
``meta["revffn_sampled"] = gamma``: the inverse generator reads it as a
:class:`~revffn_fx.runtime.sampled.SampledUpdate`, which draws the sign of gamma per sample,
forms ``(1+gamma) L(r) - 2 gamma r`` from the branch output, and keeps the first update of a
stack plain (``w <- L(r)``). Which stream an update writes alternates from ``start``
(layer by layer, across layer boundaries).
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from ..errors import ConversionError
from ..frontend.plan import LayerPlan
from ..runtime.streams import read_stream
from .coupling_graph import finish, merge_streams, split_streams
from .graph_copy import fetch, tag


def couple_bdia_layer(gm: fx.GraphModule, plan: LayerPlan, coupling: str = "bdia",
                      scale: float = 0.5, start: int = 0) -> fx.GraphModule:
    """Return the bdia coupling graph of one layer (``gm`` is not modified); ``scale`` is
    |gamma|, ``start`` the stream this layer writes (0 or 1)."""
    if not plan.convertible:
        raise ConversionError(f"layer {plan.qualname} is not convertible: {plan.reason}")
    t = start % 2
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    root: dict[str, Any] = {}
    hidden = next(n for n in gm.graph.nodes if n.op == "placeholder")
    streams: list[fx.Node] = []
    result: Any = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node is hidden:
                streams = split_streams(graph, "bdia", env[node])
                # the layer reads the newer state, through an identity: its own residual
                # adds then read that node, not a stream (they are not stream updates)
                env[node] = tag(graph.call_function(read_stream, (streams[1 - t],)),
                                "stream_read")
            continue
        if node.op == "output":
            result = node.args[0]
            continue
        new = graph.node_copy(node, lambda n: env[n])
        new.meta["from_node"] = node.name
        new.meta["revffn_branch"] = "L"
        env[node] = new
        if node.op in ("call_module", "get_attr"):
            root[str(node.target)] = fetch(gm, str(node.target))
    if isinstance(result, (tuple, list)):
        result = result[0]
    if not isinstance(result, fx.Node):
        raise ConversionError(f"layer {plan.qualname}: its graph returns no hidden state")
    layer_out = env[result]
    kept = tag(graph.call_function(operator.mul, (streams[t], scale)), "coupling_scale")
    kept.meta["revffn_sampled"] = scale
    streams[t] = tag(graph.call_function(operator.add, (kept, layer_out)), coupling)
    # the stream written last is this layer's output (merge_first: the first stream)
    graph.output(merge_streams(graph, "momentum" if t == 0 else "bdia", streams))
    return finish(root, graph, "BdiaCoupling", {"coupling": coupling, "layer": plan.qualname,
                                                "split": "bdia", "targets": [t],
                                                "gamma": scale})
