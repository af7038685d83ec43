"""Small helpers the rewrite passes share to copy nodes of a layer graph into a coupling
graph: tagging added nodes, keeping the modules copied nodes call, reading residual adds."""

from __future__ import annotations

from typing import Any

import torch.fx as fx


def tag(node: fx.Node, kind: str) -> fx.Node:
    """Mark a node the rewrite added (``node.meta["revffn"]``: split, adapter, coupling,
    coupling_scale, merge, ...): diffs, verification and the inverse generator read it."""
    node.meta["revffn"] = kind
    return node


def node_of_branch_out(add: fx.Node, r: fx.Node) -> fx.Node:
    """The operand of a residual ``add`` that is not the residual ``r``."""
    a, b = add.args[:2]
    return b if a is r else a


def reads_any(node: fx.Node, nodes: set[fx.Node]) -> bool:
    """Whether ``node`` takes any of ``nodes`` as an input."""
    return any(n in nodes for n in node.all_input_nodes)


def keep_target(node: fx.Node, gm: fx.GraphModule, root: dict[str, Any]) -> None:
    """Record in ``root`` the module or attribute a copied ``node`` calls or reads."""
    if node.op in ("call_module", "get_attr"):
        root[node.target] = fetch(gm, node.target)


def fetch(gm: fx.GraphModule, target: str) -> Any:
    """``gm``'s submodule or attribute at the dotted ``target``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
