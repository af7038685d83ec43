"""Analysis pass: find the residual updates of each decoder layer graph.

Walking back from the output, the residual stream is a chain of sums
``v = r + b_1 + ... + b_k`` where ``r`` dominates every ``b_i`` (each branch depends on the
layer input only through ``r``), down to the input (:mod:`.residual_chain`): one branch is
a sequential sublayer, several a parallel residual. Each branch is every node between
``r`` and ``b_i`` (:mod:`.sublayers`). A layer that is such a chain converts; its updates
alternate between the two streams (:func:`update_targets`, :func:`describe_pairing`);
any other layer is refused with the reason in words (:mod:`.refusals`). Nothing here
depends on class names.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..frontend.ir import LayerGraph, TracedModel
from ..frontend.plan import LayerPlan, Plan
from ..frontend.registry import facts_for
from ..runtime.router import find_routers
from .classify import mixing_leaves
from .refusals import kept_whole_note, refusal
from .residual_chain import Step, branch_add, layer_flow, walk_back
from .sublayers import describe_branch


def analyze_layer(layer: LayerGraph, overrides: dict[str, str] | None = None,
                  training: bool | None = None, routers: set[int] | None = None) -> LayerPlan:
    """Find the residual updates of one layer and decide if it can be coupled.

    Walking back from the output, the residual stream is a chain of sums
    ``v = r + b_1 + ... + b_k`` whose branches ``b_i`` read the layer input only through
    ``r`` (several branches: a parallel residual, ``x + attn(n(x)) + moe(n(x))``), down to
    the input. A layer that is such a chain (one or more updates) converts; anything else
    on the stream (a scale, a norm, an activation) is refused, naming where it sits.
    """
    if getattr(layer, "handoff", ""):  # refused before tracing: its code may not trace
        return LayerPlan(layer.index, layer.qualname, [], convertible=False,
                         reason=f"state handed between layers: {layer.handoff}")
    gm = layer.trace(training)
    modules = dict(gm.named_modules())
    # which leaves mix tokens, probed on the layer's example call (eval graph)
    mixes = mixing_leaves(layer.trace(False), getattr(layer, "example", None))
    flow = layer_flow(gm, modules, layer.call.hidden_name)
    memo: dict[fx.Node, Step | None] = {}
    steps, v = walk_back(flow, memo)
    sublayers = [describe_branch(flow, c, b, branch_add(adds, b), overrides, routers, mixes)
                 for _, branches, adds in steps for c, b in branches]
    reason = ""
    if v is not flow.hidden:
        reason = refusal(layer, flow, steps, v, memo, sublayers, overrides, routers)
    reason += kept_whole_note(layer, flow, reason)
    plan = LayerPlan(layer.index, layer.qualname, sublayers, convertible=not reason,
                     reason=reason)
    if not reason:
        plan.pairing = describe_pairing(plan, 0)
    return plan


def update_targets(plan: LayerPlan, start: int = 0) -> list[int]:
    """The stream each residual update of a layer writes (0: X1, 1: X2), alternating from
    ``start``: the first reads X2 and updates X1, the next reads X1 and updates X2, ..."""
    return [(start + j) % 2 for j in range(len(plan.sublayers))]


def describe_pairing(plan: LayerPlan, start: int = 0) -> str:
    """How a layer's residual updates are split across the two streams, in words."""
    targets = update_targets(plan, start)
    parts = [f"{s.kind} -> X{t + 1} (reads X{2 - t})" for s, t in zip(plan.sublayers, targets)]
    text = ", ".join(parts)
    groups: dict[str, list[int]] = {}
    for j, s in enumerate(plan.sublayers):
        groups.setdefault(s.residual_node, []).append(j)
    kinds = plan.kinds
    for members in (m for m in groups.values() if len(m) > 1):
        run = [j for k, j in enumerate(members) if k == 0 or j == members[k - 1] + 1]
        if len(run) > 1:
            text += (f"; parallel residual ({' and '.join(kinds[j] for j in run)} read the "
                     "same input)")
        for k, j in enumerate(members[1:], 1):
            if j != members[k - 1] + 1:
                skipped = " and ".join(kinds[i] for i in range(members[0], j))
                text += (f"; a shortcut ({kinds[j]} reads the stream from before the "
                         f"{skipped} updates)")
        text += (": coupled as updates in sequence, each reading the stream the one before "
                 "updated (the function changes slightly, as every coupling changes it)")
    if len(targets) % 2:
        text += f"; odd number of updates: the next layer starts on X{2 - targets[-1]}"
    return text


def router_ids(model: Any) -> set[int]:
    """Ids of the modules whose outputs the model records as router logits."""
    return {id(m) for m in find_routers(model)[0]}


def analyze(traced: TracedModel, training: bool | None = None) -> Plan:
    """Analyse every decoder layer of ``traced`` into a :class:`Plan`."""
    config = traced.config
    model_type = getattr(config, "model_type", None)
    overrides = facts_for(model_type).kind_overrides
    routers = router_ids(traced.model)
    layers = [analyze_layer(lg, overrides, training, routers) for lg in traced.layers]
    start = 0  # updates alternate streams across layer boundaries too
    for lp in layers:
        if lp.convertible:
            lp.pairing = describe_pairing(lp, start)
            start = (start + len(lp.sublayers)) % 2
    params = sum(p.numel() for p in traced.model.parameters())
    dtype = next(traced.model.parameters()).dtype
    experts = None
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        experts = experts or getattr(config, key, None)
    if experts is None and config is not None and hasattr(config, "ffn_config"):
        experts = getattr(config.ffn_config, "moe_num_experts", None)
    hidden = None
    if config is not None:
        hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    info = {"model_type": model_type, "class": type(traced.model).__name__,
            "hidden_size": hidden, "num_layers": len(layers), "num_experts": experts,
            "parameters": params, "dtype": str(dtype).replace("torch.", "")}
    return Plan(layers, info)
