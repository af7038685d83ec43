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
from ..runtime.streams import MERGES, SPLITS
from .graph_copy import keep_target, node_of_branch_out, reads_any
from .graph_copy import tag as _tag

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
    subs = list(plan.sublayers)
    if coupling == "meft" and len(subs) % 2:
        raise ConversionError(
            f"layer {plan.qualname} has {len(subs)} residual sublayers; the meft coupling "
            "alternates two streams and needs an even number (use coupling='momentum')")
    split_kind = SCALED_COUPLINGS[coupling]
    by_name = {n.name: n for n in gm.graph.nodes}
    which: dict[fx.Node, int] = {}
    for k, s in enumerate(subs):
        which.update({by_name[n]: k for n in s.nodes})
    residual = {k: by_name[s.residual_node] for k, s in enumerate(subs)}
    adds = {by_name[s.add_node]: k for k, s in enumerate(subs)}
    dependent = set(which) | set(adds) | set(residual.values())

    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    cur: list[fx.Node] = []
    root: dict[str, Any] = {}

    def reads(k: int) -> int:
        # momentum: every sublayer reads X; meft: the stream sublayer k does not write
        return 0 if coupling == "momentum" else 1 - k % 2

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
            if not cur and node is residual[0]:
                pair = _tag(graph.call_function(SPLITS[split_kind], (env[node],)), "split")
                cur = [_tag(graph.call_function(operator.getitem, (pair, i)), "split")
                       for i in (0, 1)]
            continue
        if node.op == "output":
            merged = _tag(graph.call_function(MERGES[split_kind], tuple(cur)), "merge")
            graph.output(merged)
            continue
        if node in adds:
            k = adds[node]
            u = env[node_of_branch_out(node, residual[k])]
            if coupling == "momentum":
                kept = _tag(graph.call_function(operator.mul, (cur[1], g)), "coupling_scale")
                push = _tag(graph.call_function(operator.mul, (u, 1.0 - g)), coupling)
                cur[1] = _tag(graph.call_function(operator.add, (kept, push)), coupling)
                cur[0] = _tag(graph.call_function(operator.add, (cur[0], cur[1])), coupling)
                env[node] = cur[0]
            else:
                w, r = 1 - reads(k), reads(k)
                kept = _tag(graph.call_function(operator.mul, (cur[w], g)), "coupling_scale")
                skip = _tag(graph.call_function(operator.mul, (cur[r], 1.0 - g)), coupling)
                push = _tag(graph.call_function(operator.add, (skip, u)), coupling)
                cur[w] = _tag(graph.call_function(operator.add, (kept, push)), coupling)
                env[node] = cur[w]
            continue
        k = which.get(node)
        if k is None and not reads_any(node, dependent):
            env[node] = graph.node_copy(node, lambda n: env[n])  # hidden-independent
            keep_target(node, gm, root)
            continue
        if k is None:
            dependent.add(node)
            continue  # dead computation on the residual stream (an unused tuple element)
        def arg(n: fx.Node, _r: fx.Node = residual[k], _src: fx.Node = cur[reads(k)]) -> Any:
            return _src if n is _r else env[n]

        new = graph.node_copy(node, arg)
        new.meta["from_node"] = node.name
        new.meta["revffn_branch"] = "FG"[k] if k < 2 else f"B{k}"
        env[node] = new
        keep_target(node, gm, root)
    if not cur:
        raise ConversionError(f"layer {plan.qualname}: the first sublayer's residual is not "
                              "the layer's hidden-state input")
    out = fx.GraphModule(root, graph, class_name=f"{coupling.capitalize()}Coupling")
    out.graph.eliminate_dead_code()
    out.graph.lint()
    out.recompile()
    out.meta["revffn"] = {"coupling": coupling, "layer": plan.qualname, "split": split_kind,
                          "momentum": g}
    return out
