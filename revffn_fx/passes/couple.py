"""Rewrite pass: a convertible decoder layer graph becomes a reversible coupling graph.

    h -> split -> (x1, x2)
    y1 = x1 + down_F(F(up_F(x2)))      # F: the first residual branch, copied node by node
    y2 = x2 + down_G(G(up_G(y1)))      # G: the second residual branch
    y1' = y1 + down_H(H(up_H(y2)))     # H, ...: further residual updates, alternating
    out = merge(y1', y2)

The j-th residual update of the layer writes stream ``(start + j) % 2`` reading the other
one (``start`` carries the alternation across layer boundaries); updates of a parallel
residual are coupled in sequence, each branch (with its own copy of a shared norm) reading
the stream the update before wrote.

For ``revffn`` the split takes halves and the adapters map d/2 <-> d; for ``revnet`` the
split copies h, there are no adapters and the merge is the mean. The residual additions of
the original graph are dropped; every node added is tagged in ``node.meta["revffn"]``
("split", "adapter", "coupling", "merge") and every copied branch node keeps its meta and
records where it came from in ``node.meta["from_node"]``, so diffs can match it.

With ``cross`` (attention target -> cross-attention module, see ``cross_branch``), F's
attention takes its queries from the X1 stream: the pre-attention path (F_up adapter,
the same norm) is copied once more from x1 (nodes tagged "cross_query") and the call is
replaced by ``cross(query, *same args)`` (tagged "cross_attention"). F then reads x1, so
the inverse generator gives that update a fixed-point inverse.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import couplings
from ..errors import ConversionError
from ..frontend.plan import LayerPlan
from ..runtime.streams import MERGES, SPLITS
from .analyze import update_targets
from .graph_copy import keep_target, tag

#: coupling -> its stream split, for every coupling that converts layers (the registry's)
COUPLINGS = {c.name: c.split for c in couplings.REGISTRY.values() if c.converts}
#: this module's own rewrite (revffn, revnet): the registry names it for them
REWRITE = f"{__name__}:couple_layer"


# adapter name prefixes of a layer's residual updates, in order (two: F, G as in RevNet)
UPDATE_NAMES = ("F", "G", "H", "K", "L", "M", "N", "P")


def make_adapters(hidden: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                  targets: Sequence[int] = (0, 1)) -> nn.ModuleDict:
    """The revffn projection adapters of one layer, initialised to route, not to learn.

    One ``up``/``down`` pair per residual update (``F``, ``G``, ``H``, ...); ``targets``:
    the stream each update writes (0: X1, 1: X2; default: F writes X1, G writes X2).
    ``up`` (d/2 -> d) places the half-width stream in the first d/2 features of the full
    space and zeros in the rest (``[I; 0]``). ``down`` (d -> d/2) takes the half of the
    branch output that the original residual would have added to that stream: the first
    half for an update of X1, the second half for an update of X2. All are bias-free
    Linear layers. Fine-tuning the pretrained example model (docs/quality.md) reached a
    lower eval loss from this init than from copying the stream into both halves
    (``[I; I]``) or from placing X2 at its own (second-half) positions. Data-fitted
    adapters: :func:`revffn_fx.calibrate`.
    """
    if hidden % 2:
        raise ConversionError(
            f"revffn splits the hidden state in halves; hidden size {hidden} is odd")
    if len(targets) > len(UPDATE_NAMES):
        raise ConversionError(f"{len(targets)} residual updates in one layer; at most "
                              f"{len(UPDATE_NAMES)} are supported")
    half = hidden // 2
    eye = torch.eye(half, dtype=dtype, device=device)
    zero = torch.zeros(half, half, dtype=dtype, device=device)
    mods = nn.ModuleDict()
    for name, t in zip(UPDATE_NAMES, targets):
        down = torch.cat([eye, zero] if t == 0 else [zero, eye], 1)
        for suffix, w in (("up", torch.cat([eye, zero], 0)), ("down", down)):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype, device=device)
            with torch.no_grad():
                lin.weight.copy_(w)
            mods[f"{name}_{suffix}"] = lin
    return mods


def couple_layer(gm: fx.GraphModule, plan: LayerPlan, coupling: str,
                 adapters: nn.ModuleDict | None = None,
                 cross: dict[str, nn.Module] | None = None,
                 momentum: float | None = None, start: int = 0) -> fx.GraphModule:
    """Return the coupling graph of one layer (the input graph is not modified).

    The layer's residual updates alternate between the streams from ``start`` (0: the
    first update writes X1 reading X2, the next X2 reading X1, ...; see
    ``analyze.update_targets``); a parallel residual is coupled as its updates in sequence.

    ``cross``: attention targets of the first branch to replace by cross-branch attention
    modules called as ``(query, *args, **kwargs)``. ``momentum``: the fraction ``g`` of
    the overwritten stream the ``momentum`` and ``meft`` couplings keep (couple_momentum).
    """
    if not plan.convertible:
        raise ConversionError(f"layer {plan.qualname} is not convertible: {plan.reason}")
    spec = couplings.get(coupling)
    if not spec.converts:
        raise ConversionError(f"the {coupling} coupling rewrites no layer")
    if spec.rewrite != REWRITE:  # its own rewrite pass (registry: revffn_fx.couplings)
        if adapters is not None or cross:
            raise ConversionError(f"the {coupling} coupling has no adapters and no "
                                  "cross-branch attention")
        default = next(iter(spec.options.values()), (None, None))[0]
        return spec.rewrite_pass()(gm, plan, coupling,
                                   scale=default if momentum is None else momentum,
                                   start=start)
    if bool(spec.adapter_params) != (adapters is not None):
        raise ConversionError(f"the {coupling} coupling "
                              f"{'needs adapters' if spec.adapter_params else 'has none'}")
    split_kind = COUPLINGS[coupling]
    subs = plan.sublayers
    by_name = {n.name: n for n in gm.graph.nodes}
    targets = update_targets(plan, start)
    residuals = {by_name[s.residual_node] for s in subs}
    hidden = next(n for n in gm.graph.nodes if n.op == "placeholder")
    # nodes computed from the layer input (the residual stream and every branch): each
    # branch is copied reading its input stream; everything else on the stream is dropped
    dependent = {hidden}
    for node in gm.graph.nodes:
        if any(i in dependent for i in node.all_input_nodes):
            dependent.add(node)

    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    root: dict[str, Any] = {}

    def adapter(name: str, x: fx.Node) -> fx.Node:
        if adapters is None:
            return x
        root[f"adapters.{name}"] = adapters[name]
        return tag(graph.call_module(f"adapters.{name}", (x,)), "adapter")

    streams: list[fx.Node] = []
    for node in gm.graph.nodes:  # inputs, the split, then what does not read the stream
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node is hidden:
                pair = tag(graph.call_function(SPLITS[split_kind], (env[node],)), "split")
                streams = [tag(graph.call_function(operator.getitem, (pair, i)), "split")
                           for i in (0, 1)]
        elif node.op != "output" and node not in dependent:
            env[node] = graph.node_copy(node, lambda n: env[n])
            keep_target(node, gm, root)
    for j, (sub, t) in enumerate(zip(subs, targets)):
        name = UPDATE_NAMES[j]
        r = by_name[sub.residual_node]
        mine = [by_name[n] for n in sub.nodes]
        local: dict[fx.Node, Any] = {r: adapter(f"{name}_up", streams[1 - t])}

        def arg(n: fx.Node, _local: dict[fx.Node, Any] = local, _j: int = j) -> Any:
            if n in _local:
                return _local[n]
            if n in dependent:
                raise ConversionError(
                    f"layer {plan.qualname}: residual update {_j} ({subs[_j].kind}) reads the "
                    f"residual stream at {n.name} besides its input {subs[_j].residual_node}: "
                    "not a sequence of residual updates")
            return env[n]

        for node in mine:
            if node is r:
                continue
            if j == 0 and cross and node.op == "call_module" and node.target in cross:
                new = _cross_call(graph, node, cross[node.target], set(mine), r,
                                  adapter(f"{name}_up", streams[t]), arg, root)
            else:
                new = graph.node_copy(node, arg)
            new.meta["from_node"] = node.name
            new.meta["revffn_branch"] = name
            local[node] = new
            keep_target(node, gm, root)
        upd = adapter(f"{name}_down", local[mine[-1]])
        streams[t] = tag(graph.call_function(operator.add, (streams[t], upd)), "coupling")
    graph.output(tag(graph.call_function(MERGES[split_kind], tuple(streams)), "merge"))
    out = fx.GraphModule(root, graph, class_name=f"{coupling.capitalize()}Coupling")
    out.graph.eliminate_dead_code()
    out.graph.lint()
    out.recompile()
    out.meta["revffn"] = {"coupling": coupling, "layer": plan.qualname, "split": split_kind,
                          "targets": targets,
                          "parallel": len(residuals) < len(subs)}
    return out


def _cross_call(graph: fx.Graph, node: fx.Node, module: nn.Module,
                branch: set[fx.Node], r: fx.Node, query_in: fx.Node,
                arg: Any, root: dict[str, Any]) -> fx.Node:
    """``cross(query, *args, **kwargs)`` in place of the attention call ``node``, the
    query computed by a copy of the F-branch path from ``r`` to the attention input with
    ``r`` replaced by ``query_in`` (the X1 stream through F_up)."""
    tag(query_in, "cross_query")
    on_path = {r}
    for n in r.graph.nodes:  # graph order: the path from r, up to the attention call
        if n is node:
            break
        if n in branch and any(i in on_path for i in n.all_input_nodes):
            on_path.add(n)
    reads = [a for a in (*node.args, *node.kwargs.values())
             if isinstance(a, fx.Node) and a in on_path]
    if len(reads) != 1:
        raise ConversionError(f"attention {node.target} reads the stream through "
                              f"{len(reads)} arguments; cross-branch attention needs one")
    env: dict[fx.Node, Any] = {r: query_in}
    for n in r.graph.nodes:
        if n is node:
            break
        if n in on_path and n is not r:
            env[n] = tag(graph.node_copy(n, lambda a: env[a] if a in env else arg(a)),
                          "cross_query")
            env[n].meta["from_node"] = n.name
    target = f"{node.target}_cross".replace(".", "_")
    root[target] = module
    args = tuple(fx.map_arg(node.args, arg))
    kwargs = dict(fx.map_arg(node.kwargs, arg))
    return tag(graph.call_module(target, (env[reads[0]], *args), kwargs), "cross_attention")
