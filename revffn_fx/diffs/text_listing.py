"""A diff as a unified-diff-style text listing (``GraphDiff.to_text``, ``revffn diff``)."""

from __future__ import annotations

from collections import defaultdict

import torch.fx as fx

from .changes import GraphChanges
from .labels import code


def node_notes(d: GraphChanges, node: fx.Node) -> str:
    i = d.info.get(node, {})
    bits = [i.get("module", ""), i.get("shape", "")]
    tag = node.meta.get("revffn")
    if tag:
        bits.append(f"({tag})")
    if node in d.replaces:
        bits.append("replaces " + ", ".join(n.name for n in d.replaces[node]))
    return "  ".join(b for b in bits if b)


def _rows(d: GraphChanges) -> list[tuple[str, str, str]]:
    """(marker, code, notes) in the after graph's order, removed nodes where they were."""
    b2a = d.before_to_after
    rewired = {p.after: p.before for p in d.rewired}
    changed = {p.after: p.before for p in d.changed}
    fused_into = {b: a for a, bs in d.replaces.items() for b in bs}
    pending: list[fx.Node] = []
    before_of: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for b in d.before.nodes:
        if b in b2a:
            before_of[b2a[b]].extend(pending)
            pending = []
        else:
            pending.append(b)
    rows = []

    def gone(b: fx.Node) -> tuple[str, str, str]:
        note = node_notes(d, b)
        if b in fused_into:
            note = f"{note}  -> {fused_into[b].name}".strip()
        if b in d.dead:
            note = f"{note}  unused, dropped".strip()
        return ("-", code(b), note)

    for a in d.after.nodes:
        rows.extend(gone(b) for b in before_of.get(a, []))
        if a not in d.matched:
            rows.append(("+", code(a), node_notes(d, a)))
        elif a in rewired or a in changed:
            was = code(rewired.get(a) or changed[a]).split(" = ", 1)[-1]
            rows.append(("~", code(a), f"{node_notes(d, a)}  was: {was}".strip()))
        else:
            rows.append((" ", code(a), node_notes(d, a)))
    rows.extend(gone(b) for b in pending)
    return rows


def render_text(d: GraphChanges, context: int | None) -> str:
    """``-`` removed, ``+`` added, ``~`` rewired or changed (with what it was), ``context``
    unchanged lines around them (None: all)."""
    rows = _rows(d)
    keep = [True] * len(rows)
    if context is not None:
        hot = [i for i, r in enumerate(rows) if r[0] != " "]
        keep = [any(abs(i - j) <= context for j in hot) for i in range(len(rows))]
    width = min(max((len(c) for _, c, _ in rows), default=0), 72)
    lines = [f"--- {d.titles[0]}", f"+++ {d.titles[1]}", f"@@ {d.summary()} @@"]
    skipped = 0
    for (mark, text, note), k in zip(rows, keep):
        if not k:
            skipped += 1
            continue
        if skipped:
            lines.append(f"  ... {skipped} unchanged node{'s' * (skipped > 1)}")
            skipped = 0
        lines.append(f"{mark} {text.ljust(width)}  # {note}".rstrip(" #") if note
                     else f"{mark} {text}")
    if skipped:
        lines.append(f"  ... {skipped} unchanged node{'s' * (skipped > 1)}")
    lines.extend(f"note: {n}" for n in d.notes)
    return "\n".join(lines)
