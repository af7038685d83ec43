"""A residual branch of a layer graph described as a :class:`Sublayer`: its nodes, the
modules it calls and their kinds, the norms around it and its residual form."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..frontend.plan import Sublayer
from .classify import branch_kind, is_norm_call, module_kind
from .residual_chain import LayerFlow, branch_nodes, is_add, scale_of


def describe_branch(flow: LayerFlow, r: fx.Node, b: fx.Node, add: fx.Node,
                    overrides: dict[str, str] | None, routers: set[int] | None = None,
                    mixes: dict[str, bool] | None = None) -> Sublayer:
    """The branch from the stream value ``r`` to ``b``, added back to the stream by
    ``add``. ``overrides``, ``routers``, ``mixes``: see :func:`.classify.module_kind`."""
    modules, hidden = flow.modules, flow.hidden
    nodes = branch_nodes(flow.g, r, b)
    scale = None
    core = b
    scaled = scale_of(b)
    if scaled is not None:
        core, scale = scaled
    norm_before = next((n.target for n in nodes if is_norm_call(modules, n)
                        and r in n.all_input_nodes), None)
    norm_after = _norm_after(modules, core, r, norm_before)
    mods, kinds = [], {}
    for n in nodes:
        if n.op == "call_module":
            mods.append(n.target)
            kinds[n.target] = module_kind(modules[n.target], n, hidden, overrides, routers,
                                          (mixes or {}).get(n.target))
    kind = branch_kind([k for k in kinds.values() if k != "norm"])
    return Sublayer(kind=kind, residual_form=_form(scale, norm_before, norm_after),
                    scale=scale, norm_before=norm_before,
                    norm_after=norm_after, modules=mods, module_kinds=kinds,
                    nodes=[n.name for n in nodes], residual_node=r.name, add_node=add.name)


def _norm_after(modules: dict[str, Any], core: Any, r: fx.Node, norm_before: Any) -> Any:
    """Post-norm: the norm the branch output (after dtype casts, dropout) comes straight
    from, if it is not the norm at the branch input."""
    probe = core
    while (isinstance(probe, fx.Node) and probe.op in ("call_method", "call_function")
           and probe.all_input_nodes and not is_norm_call(modules, probe)):
        probe = probe.all_input_nodes[0]
        if probe is r:
            break
    norm_after = (probe.target if is_norm_call(modules, probe) and probe is not norm_before
                  else None)
    return None if norm_after == norm_before else norm_after


def _form(scale: float | None, norm_before: Any, norm_after: Any) -> str:
    if scale is not None and scale != 1.0:
        return "scaled"
    if norm_before and norm_after:
        return "sandwich"
    if norm_before:
        return "pre_norm"
    if norm_after:
        return "post_norm"
    return "plain"


def odd_residual(flow: LayerFlow, v: Any, overrides: dict[str, str] | None,
                 routers: set[int] | None) -> Sublayer | None:
    """``out = a * d + c * f(d)`` (minimax): a sum whose residual side is not the stream
    itself but a function of it (scaled, normed); described for the report, refused."""
    g, idom = flow.g, flow.idom
    if not (isinstance(v, fx.Node) and v in g and is_add(v) and v in idom):
        return None
    d = idom[v]
    ops = [a for a in v.args[:2] if isinstance(a, fx.Node) and a in g]
    if len(ops) != 2 or d in ops:
        return None
    sides = sorted(ops, key=lambda n: len(branch_nodes(g, d, n)))
    sub = describe_branch(flow, d, sides[1], v, overrides, routers)
    sub.residual_form = "norm_residual"
    return sub
