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
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import couplings
from ..couplings.base import Coupling
from ..errors import ConversionError
from ..frontend.plan import LayerPlan
from .analyze import update_targets
from .coupling_graph import finish, merge_streams, split_streams
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
        return _own_rewrite(spec, gm, plan, coupling, adapters, cross, momentum, start)
    if bool(spec.adapter_params) != (adapters is not None):
        raise ConversionError(f"the {coupling} coupling "
                              f"{'needs adapters' if spec.adapter_params else 'has none'}")
    split_kind = COUPLINGS[coupling]
    targets = update_targets(plan, start)
    rewrite = _Rewrite(gm, plan, adapters)
    rewrite.copy_inputs(split_kind)
    for j, t in enumerate(targets):
        rewrite.copy_update(j, t, cross if j == 0 else None)
    rewrite.graph.output(merge_streams(rewrite.graph, split_kind, rewrite.streams))
    return finish(rewrite.root, rewrite.graph, f"{coupling.capitalize()}Coupling",
                  {"coupling": coupling, "layer": plan.qualname, "split": split_kind,
                   "targets": targets, "parallel": rewrite.parallel})


def _own_rewrite(spec: Coupling, gm: fx.GraphModule, plan: LayerPlan, coupling: str,
                 adapters: nn.ModuleDict | None, cross: dict[str, nn.Module] | None,
                 momentum: float | None, start: int) -> fx.GraphModule:
    """A coupling with its own rewrite pass, called with its option (default or given)."""
    if adapters is not None or cross:
        raise ConversionError(f"the {coupling} coupling has no adapters and no "
                              "cross-branch attention")
    default = next(iter(spec.options.values()), (None, None))[0]
    return spec.rewrite_pass()(gm, plan, coupling,
                               scale=default if momentum is None else momentum,
                               start=start)


class _Rewrite:
    """The coupling graph of one layer, built update by update from its layer graph
    ``gm``: ``streams`` are the current X1, X2; ``root`` the modules the graph calls."""

    def __init__(self, gm: fx.GraphModule, plan: LayerPlan,
                 adapters: nn.ModuleDict | None) -> None:
        self.gm, self.plan, self.adapters = gm, plan, adapters
        self.by_name = {n.name: n for n in gm.graph.nodes}
        residuals = {self.by_name[s.residual_node] for s in plan.sublayers}
        self.parallel = len(residuals) < len(plan.sublayers)
        self.hidden = next(n for n in gm.graph.nodes if n.op == "placeholder")
        # nodes computed from the layer input (the residual stream and every branch): each
        # branch is copied reading its input stream; everything else on the stream is dropped
        self.dependent = {self.hidden}
        for node in gm.graph.nodes:
            if any(i in self.dependent for i in node.all_input_nodes):
                self.dependent.add(node)
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.root: dict[str, Any] = {}
        self.streams: list[fx.Node] = []

    def adapter(self, name: str, x: fx.Node) -> fx.Node:
        """``x`` through the adapter ``name`` (revffn), or ``x`` itself (no adapters)."""
        if self.adapters is None:
            return x
        self.root[f"adapters.{name}"] = self.adapters[name]
        return tag(self.graph.call_module(f"adapters.{name}", (x,)), "adapter")

    def copy_inputs(self, split_kind: str) -> None:
        """The inputs, the split, then what does not read the stream."""
        graph, env = self.graph, self.env
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = graph.node_copy(node, lambda n: env[n])
                if node is self.hidden:
                    self.streams = split_streams(graph, split_kind, env[node])
            elif node.op != "output" and node not in self.dependent:
                env[node] = graph.node_copy(node, lambda n: env[n])
                keep_target(node, self.gm, self.root)

    def copy_update(self, j: int, t: int, cross: dict[str, nn.Module] | None) -> None:
        """Residual update ``j``: its branch copied reading stream ``1 - t`` (through the
        up adapter), added to stream ``t`` (through the down adapter)."""
        sub, name = self.plan.sublayers[j], UPDATE_NAMES[j]
        r = self.by_name[sub.residual_node]
        mine = [self.by_name[n] for n in sub.nodes]
        local: dict[fx.Node, Any] = {r: self.adapter(f"{name}_up", self.streams[1 - t])}
        arg = self._reader(local, j)
        for node in mine:
            if node is r:
                continue
            if cross and node.op == "call_module" and node.target in cross:
                new = _cross_call(self.graph, node, cross[node.target], set(mine), r,
                                  self.adapter(f"{name}_up", self.streams[t]), arg, self.root)
            else:
                new = self.graph.node_copy(node, arg)
            new.meta["from_node"] = node.name
            new.meta["revffn_branch"] = name
            local[node] = new
            keep_target(node, self.gm, self.root)
        upd = self.adapter(f"{name}_down", local[mine[-1]])
        self.streams[t] = tag(self.graph.call_function(operator.add, (self.streams[t], upd)),
                              "coupling")

    def _reader(self, local: dict[fx.Node, Any], j: int) -> Callable[[fx.Node], Any]:
        """How the copies of update ``j`` read a node: its own copies, else the nodes that
        do not read the stream; a read of the stream elsewhere is refused."""
        sub = self.plan.sublayers[j]

        def arg(n: fx.Node) -> Any:
            if n in local:
                return local[n]
            if n in self.dependent:
                raise ConversionError(
                    f"layer {self.plan.qualname}: residual update {j} ({sub.kind}) reads the "
                    f"residual stream at {n.name} besides its input {sub.residual_node}: "
                    "not a sequence of residual updates")
            return self.env[n]

        return arg


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
