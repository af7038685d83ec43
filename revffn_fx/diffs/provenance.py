"""The provenance passes record on nodes (``node.meta["from_node"]``), read for matching
and for the HTML page's tooltips."""

from __future__ import annotations

from typing import Any

import torch.fx as fx


def sources(node: fx.Node) -> list[list[tuple[str, bool]]]:
    """Provenance names by distance (direct sources first); each name comes with whether it
    is a torch.fx NodeSource (names a node of the graph the pass ran on) or a plain string
    (our convention: names the origin, kept through later node copies)."""
    levels: list[list[tuple[str, bool]]] = []
    layer: list[Any] = [node.meta.get("from_node")]
    while layer and len(levels) < 16:
        names: list[tuple[str, bool]] = []
        nxt: list[Any] = []
        for item in layer:
            for src in item if isinstance(item, (list, tuple)) else [item]:
                if isinstance(src, str):
                    names.append((src, False))
                elif src is not None and hasattr(src, "from_node"):  # torch.fx NodeSource
                    if getattr(src, "name", ""):
                        names.append((src.name, True))
                    nxt.append(src.from_node)
        if names:
            levels.append(names)
        layer = nxt
    return levels


def origin_key(node: fx.Node) -> str | tuple[str, ...] | None:
    """Our plain provenance as a key: a name, or a tuple of names for a fused node."""
    src = node.meta.get("from_node")
    if isinstance(src, str):
        return src
    if isinstance(src, (list, tuple)) and src and all(isinstance(x, str) for x in src):
        return tuple(src)
    return None
