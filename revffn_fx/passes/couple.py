"""Rewrite pass: a convertible decoder layer graph becomes a reversible coupling graph.

    h -> split -> (x1, x2)
    y1 = x1 + down_F(F(up_F(x2)))      # F: the first residual branch, copied node by node
    y2 = x2 + down_G(G(up_G(y1)))      # G: the second residual branch
    out = merge(y1, y2)

For ``revffn`` the split takes halves and the adapters map d/2 <-> d; for ``revnet`` the
split copies h, there are no adapters and the merge is the mean. The residual additions of
the original graph are dropped; every node added is tagged in ``node.meta["revffn"]``
("split", "adapter", "coupling", "merge") and every copied branch node keeps its meta and
records where it came from in ``node.meta["from_node"]``, so diffs can match it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import ConversionError
from ..plan import LayerPlan
from ..runtime.streams import MERGES, SPLITS

COUPLINGS = {"revffn": "halves", "revnet": "copies"}


def make_adapters(hidden: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> nn.ModuleDict:
    """The revffn projection adapters of one layer, initialised to route, not to learn.

    ``up`` (d/2 -> d) copies the half-width stream into both halves of the full space, so
    the pretrained norm and branch see a full-width vector of the stream's own features.
    ``down`` (d -> d/2) takes the half of the branch output that the original residual
    would have added to that stream: the first half for F (it updates X1), the second
    half for G (it updates X2). All four are plain bias-free Linear layers.
    """
    if hidden % 2:
        raise ConversionError(
            f"revffn splits the hidden state in halves; hidden size {hidden} is odd")
    half = hidden // 2
    eye = torch.eye(half, dtype=dtype, device=device)
    zero = torch.zeros(half, half, dtype=dtype, device=device)
    mods = nn.ModuleDict()
    for name, w in (("F_up", torch.cat([eye, eye], 0)), ("F_down", torch.cat([eye, zero], 1)),
                    ("G_up", torch.cat([eye, eye], 0)), ("G_down", torch.cat([zero, eye], 1))):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            lin.weight.copy_(w)
        mods[name] = lin
    return mods


def _tag(node: fx.Node, tag: str) -> fx.Node:
    node.meta["revffn"] = tag
    return node


def couple_layer(gm: fx.GraphModule, plan: LayerPlan, coupling: str,
                 adapters: nn.ModuleDict | None = None) -> fx.GraphModule:
    """Return the coupling graph of one layer (the input graph is not modified)."""
    if not plan.convertible:
        raise ConversionError(f"layer {plan.qualname} is not convertible: {plan.reason}")
    if coupling not in COUPLINGS:
        raise ConversionError(f"unknown coupling {coupling!r}; choose from {sorted(COUPLINGS)}")
    if (coupling == "revffn") != (adapters is not None):
        raise ConversionError("revffn needs adapters; revnet has none")
    split_kind = COUPLINGS[coupling]
    first, second = plan.sublayers
    by_name = {n.name: n for n in gm.graph.nodes}
    branch = {by_name[n]: "F" for n in first.nodes}
    branch.update({by_name[n]: "G" for n in second.nodes})
    residual = {"F": by_name[first.residual_node], "G": by_name[second.residual_node]}
    adds = {by_name[first.add_node], by_name[second.add_node]}

    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    inputs: dict[str, Any] = {}
    streams: list[fx.Node] = []
    outputs: dict[str, fx.Node] = {}
    root: dict[str, Any] = {}
    dependent = set(branch) | adds | set(residual.values())

    def adapter(name: str, x: fx.Node) -> fx.Node:
        if adapters is None:
            return x
        root[f"adapters.{name}"] = adapters[name]
        return _tag(graph.call_module(f"adapters.{name}", (x,)), "adapter")

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
            if not streams and node is residual["F"]:
                pair = _tag(graph.call_function(SPLITS[split_kind], (env[node],)), "split")
                streams = [_tag(graph.call_function(operator.getitem, (pair, i)), "split")
                           for i in (0, 1)]
            continue
        if node.op == "output":
            y1, y2 = outputs["F"], outputs["G"]
            merged = _tag(graph.call_function(MERGES[split_kind], (y1, y2)), "merge")
            graph.output(merged)
            continue
        if node in adds:
            which = "F" if node.name == first.add_node else "G"
            stream = streams[0] if which == "F" else streams[1]
            upd = adapter(f"{which}_down", env[node_of_branch_out(node, residual[which])])
            y = _tag(graph.call_function(operator.add, (stream, upd)), "coupling")
            outputs[which] = y
            if which == "F":
                # the second branch reads the updated first stream
                inputs["G"] = adapter("G_up", y)
            env[node] = y
            continue
        which = branch.get(node)
        if which is None and not _reads(node, dependent):
            env[node] = graph.node_copy(node, lambda n: env[n])  # hidden-independent
            _keep_target(node, gm, root)
            continue
        if which is None:
            dependent.add(node)
            continue  # dead computation on the residual stream (an unused tuple element)
        if which == "F" and "F" not in inputs:
            inputs["F"] = adapter("F_up", streams[1])
        r = residual[which]

        def arg(n: fx.Node, _r: fx.Node = r, _w: str = which) -> Any:
            return inputs[_w] if n is _r else env[n]

        new = graph.node_copy(node, arg)
        new.meta["from_node"] = node.name
        new.meta["revffn_branch"] = which
        env[node] = new
        _keep_target(node, gm, root)
    out = fx.GraphModule(root, graph, class_name=f"{coupling.capitalize()}Coupling")
    out.graph.eliminate_dead_code()
    out.graph.lint()
    out.recompile()
    out.meta["revffn"] = {"coupling": coupling, "layer": plan.qualname, "split": split_kind}
    return out


def node_of_branch_out(add: fx.Node, r: fx.Node) -> fx.Node:
    """The operand of a residual ``add`` that is not the residual ``r``."""
    a, b = add.args[:2]
    return b if a is r else a


def _reads(node: fx.Node, hidden_dependent: set[fx.Node]) -> bool:
    return any(n in hidden_dependent for n in node.all_input_nodes)


def _keep_target(node: fx.Node, gm: fx.GraphModule, root: dict[str, Any]) -> None:
    if node.op in ("call_module", "get_attr"):
        root[node.target] = _fetch(gm, node.target)


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

