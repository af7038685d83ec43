"""Why a layer does not convert, in words: where its residual stream stops being a chain
of sums ``x <- x + f(x)``, and the residual form it has instead (:data:`.FORMS`)."""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch.fx as fx

from ..frontend.ir import LayerGraph
from ..frontend.plan import Sublayer
from .residual_chain import LayerFlow, Step, is_add, residual_step, sum_terms
from .residual_forms import FORMS, residual_stack, stream_form
from .sublayers import odd_residual

_CONVERTS = "; a layer converts"
_NO_RESIDUAL = "no residual"


def refusal(layer: LayerGraph, flow: LayerFlow, steps: list[Step], v: Any,
            memo: dict[fx.Node, Step | None], sublayers: list[Sublayer],
            overrides: dict[str, str] | None, routers: set[int] | None) -> str:
    """The reason a layer whose chain of sums stops at ``v`` (not its input) is refused.

    Anything on the stream other than the sums (a scale, a norm, an activation) is named
    where it sits, with the layer's residual form when it has one; sums whose residual
    side is a function of the stream are appended to ``sublayers`` for the report, and
    take that form.
    """
    two_points = _reads_stream_twice(flow, v, memo)
    reason = _where_it_breaks(flow, steps, v, two_points, sublayers, overrides, routers)
    if not reason.startswith(_NO_RESIDUAL):
        reason += (f"{_CONVERTS} when it is a sequence of residual updates "
                   "x <- x + f(x) on its input")
    return _with_form(layer, flow, reason, two_points, sublayers)


def _reads_stream_twice(flow: LayerFlow, v: Any, memo: dict[fx.Node, Step | None]) -> bool:
    """A sum with a residual sum among its terms, whose other terms also read the input
    some other way: a branch that reads the residual stream before and after an update."""
    return (isinstance(v, fx.Node) and v in flow.g and is_add(v) and any(
        isinstance(t, fx.Node) and residual_step(t, flow.g, flow.idom, memo) is not None
        for t in sum_terms(v, flow.g)[0]))


def _where_it_breaks(flow: LayerFlow, steps: list[Step], v: Any, two_points: bool,
                     sublayers: list[Sublayer], overrides: dict[str, str] | None,
                     routers: set[int] | None) -> str:
    """Where the chain of sums stops, and what stops it."""
    g = flow.g
    upstream = (isinstance(v, fx.Node) and v in g
                and any(a in flow.trunk_adds for a in nx.ancestors(g, v)))
    if two_points or (steps and isinstance(v, fx.Node) and v in g and is_add(v)):
        terms = [t.name for t in sum_terms(v, g)[0] if isinstance(t, fx.Node) and t in g]
        return (f"the sum {v} ({' + '.join(terms)}) is not a residual update: none of its "
                "terms is the stream that the others read the input through (a branch "
                "reads the residual stream at two points)")
    if not steps and not upstream:
        return _no_residual(flow, v, sublayers, overrides, routers)
    if not steps:
        return f"computation on the residual stream after the last branch ({flow.result})"
    if upstream:
        prev = max((a for a in flow.trunk_adds if a in nx.ancestors(g, v)),
                   key=flow.order.index)
        return f"computation on the residual stream between the branches ({prev} -> {v})"
    return f"computation on the residual stream before the first branch ({v})"


def _no_residual(flow: LayerFlow, v: Any, sublayers: list[Sublayer],
                 overrides: dict[str, str] | None, routers: set[int] | None) -> str:
    """No sum of the stream with a branch: the residual may be taken after an operation
    on the stream (every such sum is listed in ``sublayers``), or there is none."""
    odd = odd_residual(flow, v, overrides, routers)
    if odd is None:
        return f"{_NO_RESIDUAL} connection: the layer output is not of the form x + f(x)"
    for n in sorted(flow.trunk, key=flow.order.index):
        sub = odd_residual(flow, n, overrides, routers)
        if sub is not None:
            sublayers.append(sub)
    return (f"the residual is taken after {odd.residual_node}, which is on the "
            "residual stream itself: the layer is not of the form x + f(x)")


def _with_form(layer: LayerGraph, flow: LayerFlow, reason: str, two_points: bool,
               sublayers: list[Sublayer]) -> str:
    """``reason`` with the layer's residual form named, when it has one (:data:`FORMS`)."""
    stack = residual_stack(layer)
    streams = getattr(layer, "streams", 1)
    where = reason.split(_CONVERTS)[0]
    if streams > 1:
        return (f"{where}; residual form hyper-connection "
                f"(its hidden state holds {streams} residual streams side by side: "
                f"{FORMS['hyper-connection']}), not x + f(x)")
    if stack and reason.startswith(_NO_RESIDUAL):
        return (f"{reason}; residual form hyper-connection at {stack} (it reads {stack}, "
                f"a stack of residual states: {FORMS['hyper-connection']}), not x + f(x)")
    if two_points or reason.startswith(_NO_RESIDUAL):
        return reason
    form = stream_form(flow)
    if form is None:
        return reason
    if form[0] in ("scaled", "gated", "affine", "hyper-connection"):
        for sub in sublayers:  # the sums listed for the report
            if sub.residual_form == "norm_residual":
                sub.residual_form = form[0].replace("-", "_")
    return (f"{where}; residual form "
            f"{form[0]} at {form[1]} ({FORMS[form[0]]}), not x + f(x)")


def kept_whole_note(layer: LayerGraph, flow: LayerFlow, reason: str) -> str:
    """For a refused layer: a module on the residual stream that was kept whole because
    torch.fx cannot trace it, and what to do about it ("" when there is none)."""
    auto = {n.removeprefix(layer.qualname + ".") for n in getattr(layer, "auto_leaves", ())}
    on_stream = [n.target for n in flow.trunk if n.op == "call_module" and n.target in auto]
    if not (reason and on_stream):
        return ""
    return (f" ({on_stream[0]} was kept whole because torch.fx cannot trace it, and it "
            "sits on the residual stream; make its forward traceable, or pass "
            "leaf_modules naming the modules inside it that are not)")
