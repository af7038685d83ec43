"""Rewrite pass: couplings that keep the pretrained function (approximately) at step 0.

revffn and revnet change what a pretrained layer computes before any training (the
branches read half-width or averaged streams). These couplings keep each residual
sublayer ``h <- h + f(h)`` reading the state the original model gave it, and make the
step invertible in closed form by keeping a fraction ``g`` of the stream they overwrite:

- ``momentum`` (Sander et al., "Momentum Residual Neural Networks", ICML 2021): streams
  (X, V), V starting at zero; per sublayer ``V <- g*V + (1-g)*f(X); X <- X + V``; the
  hidden state is X. As g -> 0 this is the original network; at g = 1/8 the pretrained
  example model's held-out loss moves by < 0.1% (docs/quality.md).
- ``meft`` (after MEFT, Liao et al., NeurIPS 2023: ``y1 = l*x1 + F(x2)``, the pretrained
  layer in F): two full-width copies of H; sublayer k overwrites one stream from the other,
  alternating, ``W <- g*W + (1-g)*R + f(R)``; the hidden state is the stream written last.
  With W = R this is exactly ``R + f(R)``: the first sublayer of a stack is exact, later
  ones are off by ``g`` times the previous sublayer's output.

Both are inverted by ``W = (W' - branch(...)) / g``, so the inverse multiplies rounding
errors by 1/g per sublayer: carry the streams in a wider dtype (``stream_dtype``) than the
branches compute in. The scale node ``W * g`` is tagged "coupling_scale", which is how
:func:`revffn_fx.passes.inverse.generate_inverse` reads the update off the graph; the other
added nodes are tagged with the coupling's name.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from .. import couplings
from ..couplings.momentum import DEFAULT_MOMENTUM
from ..errors import ConversionError
from ..frontend.plan import LayerPlan
from .coupling_graph import finish, merge_streams, split_streams
from .graph_copy import keep_target, node_of_branch_out, reads_any, tag

# coupling -> split kind (revffn_fx.runtime.streams), from the registry
SCALED_COUPLINGS = {c.name: c.split for c in couplings.REGISTRY.values()
                    if c.update == "scaled"}


def couple_scaled_layer(gm: fx.GraphModule, plan: LayerPlan, coupling: str,
                        scale: float = DEFAULT_MOMENTUM, start: int = 0) -> fx.GraphModule:
    """Return the ``momentum`` or ``meft`` coupling graph of one layer (``gm`` is not
    modified). Every residual sublayer of the plan becomes one scaled update (meft) or a
    velocity and a position update (momentum), in graph order. ``scale``: the momentum g;
    ``start`` is not used (these couplings start every layer on the same stream)."""
    del start
    g = _checked_momentum(plan, coupling, scale)
    split_kind = SCALED_COUPLINGS[coupling]
    rewrite = _ScaledRewrite(gm, plan, coupling, g)
    for node in gm.graph.nodes:
        rewrite.visit(node, split_kind)
    if not rewrite.cur:
        raise ConversionError(f"layer {plan.qualname}: the first sublayer's residual is not "
                              "the layer's hidden-state input")
    return finish(rewrite.root, rewrite.graph, f"{coupling.capitalize()}Coupling",
                  {"coupling": coupling, "layer": plan.qualname, "split": split_kind,
                   "momentum": g})


def _checked_momentum(plan: LayerPlan, coupling: str, scale: float) -> float:
    """The momentum g, checked, for a layer the coupling can rewrite (else a
    ConversionError saying why not)."""
    if not plan.convertible:
        raise ConversionError(f"layer {plan.qualname} is not convertible: {plan.reason}")
    if coupling not in SCALED_COUPLINGS:
        raise ConversionError(f"unknown scaled coupling {coupling!r}; choose from "
                              f"{sorted(SCALED_COUPLINGS)}")
    if len({sub.residual_node for sub in plan.sublayers}) < len(plan.sublayers):
        raise ConversionError(f"layer {plan.qualname} has a parallel residual; the "
                              f"{coupling} coupling takes sequential ones only (use "
                              "revffn or revnet)")
    g = couplings.get(coupling).options["momentum"][1](scale)
    if coupling == "meft" and len(plan.sublayers) % 2:
        raise ConversionError(
            f"layer {plan.qualname} has {len(plan.sublayers)} residual sublayers; the meft "
            "coupling alternates two streams and needs an even number (use "
            "coupling='momentum')")
    return g


class _ScaledRewrite:
    """The coupling graph of one layer, built node by node in graph order: ``cur`` are
    the two streams (momentum: X, V; meft: the two copies), ``root`` the modules the
    graph calls."""

    def __init__(self, gm: fx.GraphModule, plan: LayerPlan, coupling: str, g: float) -> None:
        self.gm, self.plan, self.coupling, self.g = gm, plan, coupling, g
        by_name = {n.name: n for n in gm.graph.nodes}
        subs = list(plan.sublayers)
        self.which: dict[fx.Node, int] = {}
        for k, s in enumerate(subs):
            self.which.update({by_name[n]: k for n in s.nodes})
        self.residual = {k: by_name[s.residual_node] for k, s in enumerate(subs)}
        self.adds = {by_name[s.add_node]: k for k, s in enumerate(subs)}
        self.dependent = set(self.which) | set(self.adds) | set(self.residual.values())
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.cur: list[fx.Node] = []
        self.root: dict[str, Any] = {}

    def reads(self, k: int) -> int:
        """The stream sublayer ``k`` reads: momentum: every sublayer reads X; meft: the
        stream sublayer k does not write."""
        return 0 if self.coupling == "momentum" else 1 - k % 2

    def visit(self, node: fx.Node, split_kind: str) -> None:
        """Copy ``node`` of the layer graph: an input (the first residual is split), the
        output (the merge), a residual add (the coupling update), a branch node (reading
        its stream), a node that does not read the stream; dead stream nodes are dropped."""
        graph, env = self.graph, self.env
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
            if not self.cur and node is self.residual[0]:
                self.cur = split_streams(graph, split_kind, env[node])
        elif node.op == "output":
            graph.output(merge_streams(graph, split_kind, self.cur))
        elif node in self.adds:
            self._update(node)
        elif self.which.get(node) is None and not reads_any(node, self.dependent):
            env[node] = graph.node_copy(node, lambda n: env[n])  # hidden-independent
            keep_target(node, self.gm, self.root)
        elif self.which.get(node) is None:  # dead computation on the residual stream
            self.dependent.add(node)  # (an unused tuple element)
        else:
            self._copy_branch_node(node, self.which[node])

    def _copy_branch_node(self, node: fx.Node, k: int) -> None:
        """A node of sublayer ``k``, its residual input replaced by the stream it reads."""
        r, src = self.residual[k], self.cur[self.reads(k)]
        new = self.graph.node_copy(node, lambda n: src if n is r else self.env[n])
        new.meta["from_node"] = node.name
        new.meta["revffn_branch"] = "FG"[k] if k < 2 else f"B{k}"
        self.env[node] = new
        keep_target(node, self.gm, self.root)

    def _update(self, add: fx.Node) -> None:
        """The residual ``add`` of sublayer k, as the coupling's update of the streams."""
        k = self.adds[add]
        u = self.env[node_of_branch_out(add, self.residual[k])]
        graph, cur, g, name = self.graph, self.cur, self.g, self.coupling
        if name == "momentum":  # V <- g*V + (1-g)*u; X <- X + V
            kept = tag(graph.call_function(operator.mul, (cur[1], g)), "coupling_scale")
            push = tag(graph.call_function(operator.mul, (u, 1.0 - g)), name)
            cur[1] = tag(graph.call_function(operator.add, (kept, push)), name)
            cur[0] = tag(graph.call_function(operator.add, (cur[0], cur[1])), name)
            self.env[add] = cur[0]
        else:  # meft: W <- g*W + ((1-g)*R + u)
            w, r = 1 - self.reads(k), self.reads(k)
            kept = tag(graph.call_function(operator.mul, (cur[w], g)), "coupling_scale")
            skip = tag(graph.call_function(operator.mul, (cur[r], 1.0 - g)), name)
            push = tag(graph.call_function(operator.add, (skip, u)), name)
            cur[w] = tag(graph.call_function(operator.add, (kept, push)), name)
            self.env[add] = cur[w]
