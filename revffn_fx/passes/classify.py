"""What a module inside a residual branch is, from its structure and how it is called."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..frontend.tracer import is_norm

KINDS = ("attention", "moe", "mlp", "norm", "other")


def _has_experts(module: nn.Module) -> bool:
    """Several parallel experts: a ModuleList of >= 2 identical parameterised blocks, or
    fused expert weights (a parameter with a leading expert dimension, 3-D)."""
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList) and len(sub) >= 2:
            kinds = {type(c) for c in sub}
            if len(kinds) == 1 and all(any(True for _ in c.parameters()) for c in sub):
                return True
        if any(p.dim() == 3 for p in sub.parameters(recurse=False)):
            return True
    return False


def _has_dense(module: nn.Module) -> bool:
    return any(p.dim() == 2 for p in module.parameters())


def module_kind(module: nn.Module, node: fx.Node, hidden: fx.Node,
                overrides: dict[str, str] | None = None,
                routers: set[int] | None = None) -> str:
    """Classify one call_module leaf of a layer graph.

    - "attention": the call consumes layer inputs other than the hidden state (attention
      mask, positions, rotary embeddings): only token-mixing modules need those;
    - "moe": it holds a router (``routers``: ids of the modules the model records router
      logits from) or parallel experts (a router is implied: something must pick);
    - "mlp": other dense parameters; "norm": a normalisation; "other" otherwise.
    ``overrides`` maps the module's attribute name to a kind (see the registry).
    """
    name = str(node.target).rsplit(".", 1)[-1]
    if overrides and name in overrides:
        return overrides[name]
    if is_norm(module):
        return "norm"
    placeholders = {n for n in node.all_input_nodes if n.op == "placeholder" and n is not hidden}
    if placeholders:
        return "attention"
    if routers and any(id(m) in routers for m in module.modules()):
        return "moe"
    if _has_experts(module):
        return "moe"
    if _has_dense(module):
        return "mlp"
    return "other"


def branch_kind(kinds: list[str]) -> str:
    """The kind of a residual branch from the kinds of the modules it calls."""
    for k in ("attention", "moe", "mlp"):
        if k in kinds:
            return k
    return "other"
