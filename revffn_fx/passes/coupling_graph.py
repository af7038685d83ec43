"""The pieces every coupling graph has, emitted the same way by each rewrite pass: the
split of the hidden state into two streams, their merge, and the finished GraphModule."""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from ..runtime.streams import MERGES, SPLITS
from .graph_copy import tag


def split_streams(graph: fx.Graph, kind: str, hidden: fx.Node) -> list[fx.Node]:
    """``hidden`` split into two streams by the ``kind`` split (nodes tagged "split")."""
    pair = tag(graph.call_function(SPLITS[kind], (hidden,)), "split")
    return [tag(graph.call_function(operator.getitem, (pair, i)), "split") for i in (0, 1)]


def merge_streams(graph: fx.Graph, kind: str, streams: list[fx.Node]) -> fx.Node:
    """The two streams merged back by the ``kind`` merge (tagged "merge")."""
    return tag(graph.call_function(MERGES[kind], tuple(streams)), "merge")


def finish(root: dict[str, Any], graph: fx.Graph, class_name: str,
           meta: dict[str, Any]) -> fx.GraphModule:
    """The coupling GraphModule: dead code dropped, linted, compiled, ``meta["revffn"]``
    set to ``meta`` (the coupling, the layer, the split and what each pass records)."""
    out = fx.GraphModule(root, graph, class_name=class_name)
    out.graph.eliminate_dead_code()
    out.graph.lint()
    out.recompile()
    out.meta["revffn"] = meta
    return out
