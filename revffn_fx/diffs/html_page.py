"""A diff as one self-contained HTML page: both graphs drawn side by side as inline SVG,
nodes coloured by status, the text listing below (``GraphDiff.to_html``, ``revffn diff
--format html``)."""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch.fx as fx

from .changes import GraphChanges
from .labels import code, fn_name
from .provenance import sources
from .text_listing import render_text

_COLOURS = {  # status: (fill, stroke)
    "added": ("#d4f7dc", "#1a7f37"), "removed": ("#ffe0de", "#cf222e"),
    "dead": ("#f0f0f0", "#8c959f"), "rewired": ("#fff3c4", "#bf8700"),
    "changed": ("#dbeafe", "#0969da"), "same": ("#ffffff", "#8c959f"),
}
_CHAR, _LINE, _GAP_X, _GAP_Y, _PAD, _BUS = 6.6, 14, 18, 34, 8, 60  # _BUS: long edges' lane


def _layout(graph: fx.Graph, labels: dict[fx.Node, list[str]]
            ) -> tuple[dict[fx.Node, tuple[float, float, float, float]], float, float]:
    """Layered layout: depth = longest path from an input; order by mean input position."""
    depth: dict[fx.Node, int] = {}
    for n in graph.nodes:
        depth[n] = 1 + max((depth[i] for i in n.all_input_nodes), default=-1)
    for n in graph.nodes:  # inputs and attributes sit just above their first user
        if not n.all_input_nodes and n.users:
            depth[n] = max(0, min(depth[u] for u in n.users) - 1)
    rows: dict[int, list[fx.Node]] = defaultdict(list)
    for n in graph.nodes:
        rows[depth[n]].append(n)
    box: dict[fx.Node, tuple[float, float, float, float]] = {}
    size = {n: (max(len(s) for s in labels[n]) * _CHAR + 2 * _PAD,
                len(labels[n]) * _LINE + _PAD) for n in graph.nodes}
    height = max((h for _, h in size.values()), default=0)
    left: dict[fx.Node, float] = {}
    for d in sorted(rows):  # pack left to right, each node under its inputs when room allows
        row = rows[d]
        bary = {n: _mean([left[i] + size[i][0] / 2 for i in _pulls(n)])
                for n in row if n.all_input_nodes}
        row.sort(key=lambda n: (n not in bary, bary.get(n, 0.0)))
        cursor = None
        for n in row:
            want = bary[n] - size[n][0] / 2 if n in bary else (cursor or 0.0)
            left[n] = want if cursor is None else max(want, cursor)
            cursor = left[n] + size[n][0] + _GAP_X
    lo = min(left.values(), default=0.0)
    total = max((left[n] - lo + size[n][0] for n in left), default=0.0)
    for n, x in left.items():
        w, h = size[n]
        box[n] = (x - lo + _BUS, depth[n] * (height + _GAP_Y) + 10, w, h)
    return box, total + _BUS + 10, (max(rows, default=0) + 1) * (height + _GAP_Y) + 10


def _pulls(n: fx.Node) -> list[fx.Node]:
    """The inputs a node is placed under: computed ones, else any (inputs sit beside)."""
    return [i for i in n.all_input_nodes if i.all_input_nodes] or n.all_input_nodes


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _labels(d: GraphChanges, n: fx.Node) -> list[str]:
    """Three lines: the node's name, what it computes, its module type and shape."""
    i = d.info.get(n, {})
    what = n.op if n.op in ("placeholder", "output") else code(n, 400).split(" = ", 1)[-1]
    extra = "  ".join(x for x in (i.get("module", ""), i.get("shape", "")) if x)
    return [_clip(n.name, 40), _clip(what, 40)] + ([_clip(extra, 44)] if extra else [])


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n - 3] + "..."


def _svg(d: GraphChanges, graph: fx.Graph, keys: dict[fx.Node, str], side: str) -> str:
    labels = {n: _labels(d, n) for n in graph.nodes}
    box, width, height = _layout(graph, labels)
    other = d.before_to_after if side == "before" else d.matched
    other_edges = {(a, b) for a, b in _edges(d.after if side == "before" else d.before)}
    lanes = 0
    parts = [f'<svg width="{width:.0f}" '
             f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">']
    for u, v in _edges(graph):
        x1, y1, w1, h1 = box[u]
        x2, y2, w2, _ = box[v]
        ax, ay, bx, by = x1 + w1 / 2, y1 + h1, x2 + w2 / 2, y2
        kept = (other.get(u), other.get(v)) in other_edges
        cls = "edge" if kept else ("edge gone" if side == "before" else "edge new")
        between = [b[0] for b in box.values() if ay < b[1] < by - 1]
        if between:  # a long edge runs down a lane left of the rows it skips
            xr, lanes = min(between) - 10 - 6 * (lanes % 8), lanes + 1
            q = _GAP_Y / 2
            path = (f"M{ax:.1f},{ay:.1f} C{ax:.1f},{ay + q:.1f} {xr:.1f},{ay:.1f} "
                    f"{xr:.1f},{ay + q:.1f} L{xr:.1f},{by - q:.1f} C{xr:.1f},{by:.1f} "
                    f"{bx:.1f},{by - q:.1f} {bx:.1f},{by - 2:.1f}")
        else:
            mid = (ay + by) / 2
            path = (f"M{ax:.1f},{ay:.1f} C{ax:.1f},{mid:.1f} {bx:.1f},{mid:.1f} "
                    f"{bx:.1f},{by - 2:.1f}")
        parts.append(f'<path class="{cls}" d="{path}" marker-end="url(#arrow)"/>')
    for n in graph.nodes:
        x, y, w, h = box[n]
        status = d.status(n)
        fill, stroke = _COLOURS[status]
        tip = [f"{n.name} ({status})", f"op: {n.op}", f"target: {fn_name(n.target)}",
               code(n, 400)] + [f"{k}: {v}" for k, v in d.info.get(n, {}).items() if v]
        if n.meta.get("revffn"):
            tip.append(f"added by revffn as: {n.meta['revffn']}")
        src = sources(n)
        if src:
            tip.append("from: " + ", ".join(s for s, _ in src[0]))
        if n in other:
            tip.append(f"counterpart: {other[n].name}")
        dash = ' stroke-dasharray="4 3"' if status == "dead" else ""
        parts.append(f'<g class="node" data-k="{keys.get(n, "")}"><title>'
                     f'{html.escape(chr(10).join(tip))}</title>'
                     f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="5" '
                     f'fill="{fill}" stroke="{stroke}"{dash}/>')
        for k, line in enumerate(labels[n]):
            cls = "name" if k == 0 else ("shape" if k == 2 else "op")
            parts.append(f'<text class="{cls}" x="{x + _PAD:.1f}" '
                         f'y="{y + _PAD / 2 + _LINE * (k + 1) - 3:.1f}">{html.escape(line)}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def _edges(graph: fx.Graph) -> Iterable[tuple[fx.Node, fx.Node]]:
    for v in graph.nodes:
        for u in v.all_input_nodes:
            yield u, v


_CSS = """
body{font:14px system-ui,sans-serif;margin:16px;color:#1f2328;background:#fff}
h1{font-size:20px}h2{font-size:16px;margin:28px 0 4px}.sum{color:#57606a;margin:0 0 8px}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border:1px solid;
border-radius:4px;font-size:12px}.row{display:flex;gap:16px;align-items:flex-start}
.col{border:1px solid #d0d7de;border-radius:6px;padding:6px;overflow:auto;max-height:90vh}
.col h3{font-size:13px;margin:2px 4px 6px;color:#57606a}
text{font:11px ui-monospace,Menlo,Consolas,monospace;fill:#1f2328}text.name{font-weight:bold}
text.shape{fill:#6e7781}.edge{fill:none;stroke:#8c959f;stroke-width:1.2}
.edge.new{stroke:#1a7f37;stroke-width:2}.edge.gone{stroke:#cf222e;stroke-dasharray:5 3}
.node:hover rect,.node.hl rect{stroke-width:3;stroke:#8250df}
pre{background:#f6f8fa;padding:8px;border-radius:6px;overflow:auto;font-size:12px}
pre .add{color:#1a7f37}pre .del{color:#cf222e}pre .mod{color:#9a6700}
"""
_JS = """document.querySelectorAll('.node').forEach(g=>{const k=g.dataset.k;if(!k)return;
const s=g.closest('section');g.addEventListener('mouseenter',()=>s.querySelectorAll(
'[data-k="'+k+'"]').forEach(e=>e.classList.add('hl')));g.addEventListener('mouseleave',
()=>s.querySelectorAll('.hl').forEach(e=>e.classList.remove('hl')));});"""


def _section(d: GraphChanges, index: int) -> str:
    keys = {}
    for k, (a, b) in enumerate(d.matched.items()):
        keys[a] = keys[b] = f"{index}-{k}"
    legend = "".join(f'<span style="background:{f};border-color:{s}">{name}</span>'
                     for name, (f, s) in _COLOURS.items() if name != "same")
    legend += ('<span style="border-color:#1a7f37">green edge: new input</span>'
               '<span style="border-color:#cf222e">dashed red edge: input dropped</span>')
    marks = {"+": "add", "-": "del", "~": "mod"}
    text = "\n".join(f'<span class="{marks.get(line[:1], "")}">{html.escape(line)}</span>'
                     for line in render_text(d, None).splitlines())
    cols = "".join(f'<div class="col"><h3>{side}: {html.escape(t)}</h3>'
                   f'{_svg(d, g, keys, side)}</div>'
                   for side, t, g in (("before", d.titles[0], d.before),
                                      ("after", d.titles[1], d.after)))
    return (f'<section><h2>{html.escape(d.titles[0])} &rarr; {html.escape(d.titles[1])}</h2>'
            f'<p class="sum">{html.escape(d.summary())}. Hover a node for details; its '
            f'counterpart in the other graph is highlighted.</p><p class="legend">{legend}</p>'
            f'<div class="row">{cols}</div><details><summary>text diff</summary>'
            f'<pre>{text}</pre></details></section>')


def render_html(diffs: Sequence[GraphChanges], title: str = "revffn diff") -> str:
    """One self-contained HTML page with a section per diff."""
    body = "".join(_section(d, i) for i, d in enumerate(diffs))
    svg_defs = ('<svg width="0" height="0" style="position:absolute"><defs><marker id="arrow" '
                'viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
                'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#8c959f"/>'
                '</marker></defs></svg>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>'
            f'{html.escape(title)}</title><style>{_CSS}</style></head><body>{svg_defs}'
            f'<h1>{html.escape(title)}</h1>{body}<script>{_JS}</script></body></html>\n')
