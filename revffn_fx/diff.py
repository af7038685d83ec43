"""Graph diffs: what a pass (or the whole transform) changed in a torch.fx graph.

``diff(before, after)`` matches the nodes of two graphs, first by the provenance passes
record (``node.meta["from_node"]``: a node name, a list of names for a node that replaces
several, or torch.fx's list of ``NodeSource``), then by structure (same op and target,
inputs already matched), and sorts the rest into added, removed, rewired (same node, other
inputs) and changed (same node, other op, target or constants). ``GraphDiff.to_text()`` is a
unified-diff-style listing, ``GraphDiff.to_html()`` one self-contained HTML page drawing both
graphs side by side. ``revffn diff`` (:data:`diff_command`) shows them for a model directory.
"""

from __future__ import annotations

import html
import inspect
import operator
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import click
import torch
import torch.fx as fx

from .errors import RevFFNError

Graphish = fx.GraphModule | fx.Graph


class Pair(NamedTuple):
    """A node of ``before`` and its counterpart in ``after``."""

    before: fx.Node
    after: fx.Node


@dataclass
class GraphDiff:
    """The difference between two fx graphs; nodes are those of the graphs compared.

    ``added``: nodes of ``after`` with no counterpart; ``removed``: live nodes of ``before``
    with none; ``dead``: nodes of ``before`` that did not reach the output and were dropped
    (dead-code elimination, listed apart); ``rewired``: matched nodes whose inputs differ;
    ``changed``: matched nodes whose op, target or constant arguments differ; ``replaces``:
    an added node -> the removed nodes its provenance says it replaces (e.g. a fused stack).
    """

    before: fx.Graph
    after: fx.Graph
    matched: dict[fx.Node, fx.Node]  # after node -> before node
    added: list[fx.Node]
    removed: list[fx.Node]
    dead: list[fx.Node]
    rewired: list[Pair]
    changed: list[Pair]
    replaces: dict[fx.Node, list[fx.Node]]
    info: dict[fx.Node, dict[str, str]] = field(default_factory=dict)  # module, shape
    titles: tuple[str, str] = ("before", "after")
    notes: list[str] = field(default_factory=list)

    @property
    def unchanged(self) -> int:
        touched = {p.after for p in self.rewired} | {p.after for p in self.changed}
        return sum(1 for a in self.matched if a not in touched)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.dead or self.rewired or self.changed)

    def summary(self) -> str:
        parts = [f"{len(self.added)} added", f"{len(self.removed)} removed",
                 f"{len(self.rewired)} rewired", f"{len(self.changed)} changed"]
        if self.dead:
            parts.append(f"{len(self.dead)} unused dropped")
        return ", ".join(parts) + f", {self.unchanged} unchanged"

    def status(self, node: fx.Node) -> str:
        """``added``, ``removed``, ``dead``, ``rewired``, ``changed`` or ``same``."""
        if node.graph is self.after:
            if node not in self.matched:
                return "added"
            node = self.matched[node]
        elif node not in self._b2a:
            return "dead" if node in self.dead else "removed"
        if node in self._touched["changed"]:
            return "changed"
        return "rewired" if node in self._touched["rewired"] else "same"

    @cached_property
    def _b2a(self) -> dict[fx.Node, fx.Node]:
        return {b: a for a, b in self.matched.items()}

    @cached_property
    def _touched(self) -> dict[str, set[fx.Node]]:
        return {"changed": {p.before for p in self.changed},
                "rewired": {p.before for p in self.rewired}}

    def to_text(self, context: int | None = 3) -> str:
        """A unified-diff-style listing: ``-`` removed, ``+`` added, ``~`` rewired or
        changed (with what it was), ``context`` unchanged lines around them (None: all)."""
        return _text(self, context)

    def to_html(self, title: str | None = None) -> str:
        """One self-contained HTML page (inline SVG and CSS, no external references)."""
        return render_html([self], title or f"{self.titles[0]} -> {self.titles[1]}")


# ------------------------------------------------------------------------------- matching

def _graph(g: Graphish) -> fx.Graph:
    return g.graph if isinstance(g, fx.GraphModule) else g


def _sources(node: fx.Node) -> list[list[tuple[str, bool]]]:
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


def _origin_key(node: fx.Node) -> str | tuple[str, ...] | None:
    """Our plain provenance as a key: a name, or a tuple of names for a fused node."""
    src = node.meta.get("from_node")
    if isinstance(src, str):
        return src
    if isinstance(src, (list, tuple)) and src and all(isinstance(x, str) for x in src):
        return tuple(src)
    return None


def _target_key(node: fx.Node) -> Any:
    t = node.target
    return t if isinstance(t, str) else (getattr(t, "__module__", None),
                                         getattr(t, "__qualname__", repr(t)))


def _norm(value: Any, fmap: Any) -> Any:
    """An argument structure made comparable: nodes through ``fmap``, containers as tuples."""
    if isinstance(value, fx.Node):
        return ("%", fmap(value))
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v, fmap) for v in value)
    if isinstance(value, dict):
        return ("{}", tuple(sorted((str(k), _norm(v, fmap)) for k, v in value.items())))
    if isinstance(value, slice):
        return ("slice", _norm(value.start, fmap), _norm(value.stop, fmap),
                _norm(value.step, fmap))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    return repr(value)


def _input_nodes(node: fx.Node) -> list[fx.Node]:
    """Node inputs in argument order (kwargs by key), repeats kept."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, sorted(node.kwargs.items())), out.append)
    return out


def _same_tag(a: fx.Node, b: fx.Node) -> bool:
    """A node tagged as added by a pass only matches a node with the same tag."""
    tag = a.meta.get("revffn")
    return tag is None or b.meta.get("revffn") == tag


def _live(graph: fx.Graph) -> set[fx.Node]:
    out = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    seen: set[fx.Node] = set()
    todo = [out] if out is not None else []
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _match(before: fx.Graph, after: fx.Graph
           ) -> tuple[dict[fx.Node, fx.Node], dict[fx.Node, list[fx.Node]]]:
    by_name = {n.name: n for n in before.nodes}
    by_origin: dict[str, list[fx.Node]] = defaultdict(list)
    for b in before.nodes:
        for level in _sources(b)[:1]:
            for name, _ in level:
                by_origin[name].append(b)
    by_key: dict[Any, list[fx.Node]] = defaultdict(list)
    for b in before.nodes:
        if _origin_key(b) is not None:
            by_key[_origin_key(b)].append(b)
    match: dict[fx.Node, fx.Node] = {}
    used: dict[fx.Node, fx.Node] = {}  # before -> after
    replaces: dict[fx.Node, list[fx.Node]] = {}

    def take(a: fx.Node, b: fx.Node) -> None:
        match[a] = b
        used[b] = a

    # placeholders by target, the output with the output
    ph = {n.target: n for n in before.nodes if n.op in ("placeholder", "output")}
    for a in after.nodes:
        b = ph.get(a.target) if a.op in ("placeholder", "output") else None
        if b is not None and b.op == a.op and b not in used:
            take(a, b)
    # provenance
    for a in after.nodes:
        if a in match:
            continue
        key = _origin_key(a)
        same = next((b for b in by_key.get(key, []) if b not in used), None)
        if same is not None:  # the same provenance on both sides: the same node
            take(a, same)
            continue
        levels = _sources(a)
        if levels and (isinstance(key, tuple) or len({n for n, _ in levels[0]}) > 1):
            gone = [by_name[n] for n in dict.fromkeys(n for n, _ in levels[0]) if n in by_name]
            if gone:  # one node replacing several (a fused stack)
                replaces[a] = gone
                continue
        for level in levels:
            found = None
            for name, is_source in level:
                cands = [by_name[name]] if name in by_name else []
                origin = by_origin.get(name, [])
                cands = cands + origin if is_source else origin + cands
                # a plain name is an explicit claim; a NodeSource name may be of another
                # graph, so it must also agree on the tag of nodes the passes added
                found = next((b for b in cands if b not in used
                              and (not is_source or _same_tag(a, b))), None)
                if found is not None:
                    break
            if found is not None:
                take(a, found)
                break
    # structure: same op and target, inputs already matched
    pool: dict[tuple[str, Any], list[fx.Node]] = defaultdict(list)
    for b in before.nodes:
        if b not in used:
            pool[(b.op, _target_key(b))].append(b)
    for a in after.nodes:
        if a in match or a in replaces:
            continue
        ins = _input_nodes(a)
        best, best_score = None, 0.0
        for b in pool.get((a.op, _target_key(a)), []):
            if b in used or not _same_tag(a, b):
                continue
            b_ins = [used.get(x) for x in _input_nodes(b)]
            hits = sum(1 for x, y in zip(ins, b_ins) if x is y)
            score = hits + (0.5 if a.name == b.name else 0.0)
            if (hits == len(ins) == len(b_ins)) and not ins:
                score += 0.25  # no inputs at all (get_attr): same target is enough
            if score > best_score:
                best, best_score = b, score
        if best is not None:
            take(a, best)
    # a node edited in place (new target, maybe a tag): same name and op, same inputs
    for a in after.nodes:
        b = by_name.get(a.name)
        if (a not in match and a not in replaces and b is not None and b not in used
                and a.op == b.op and (ins := _input_nodes(a))
                and [used.get(x) for x in _input_nodes(b)] == ins):
            take(a, b)
    return match, replaces


def diff(before: Graphish, after: Graphish, example_inputs: Any = None, *,
         titles: tuple[str, str] | None = None) -> GraphDiff:
    """Compare two fx graphs (GraphModules or Graphs) into a :class:`GraphDiff`.

    ``example_inputs``: a small input (a tuple of positional values, or a mapping from
    placeholder name to value) run through both GraphModules to label nodes with tensor
    shapes; without it, shapes already in ``node.meta`` (``tensor_meta``, ``val``) are used.
    """
    gb, ga = _graph(before), _graph(after)
    match, replaces = _match(gb, ga)
    b2a = {b: a for a, b in match.items()}
    live = _live(gb)
    gone = [b for b in gb.nodes if b not in b2a]
    rewired, changed = [], []
    for a in ga.nodes:
        b = match.get(a)
        if b is None:
            continue
        if [b2a.get(x) for x in _input_nodes(b)] != _input_nodes(a):
            rewired.append(Pair(b, a))
        if (a.op, _target_key(a)) != (b.op, _target_key(b)) or (
                _norm((a.args, a.kwargs), lambda n: None)
                != _norm((b.args, b.kwargs), lambda n: None)):
            changed.append(Pair(b, a))
    out = GraphDiff(gb, ga, match, [a for a in ga.nodes if a not in match],
                    [b for b in gone if b in live], [b for b in gone if b not in live],
                    rewired, changed, replaces,
                    titles=titles or (_title(before, "before"), _title(after, "after")))
    for g in (before, after):
        out.info.update(_node_info(g, example_inputs, out.notes))
    return out


def _title(g: Graphish, default: str) -> str:
    return type(g).__name__ if isinstance(g, fx.GraphModule) else default


# ----------------------------------------------------------------------------- shapes, labels

_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64",
           "int64": "i64", "int32": "i32"}


def _describe(value: Any, depth: int = 0) -> str:
    """``[1, 8, 64] f32`` for a tensor (or fake tensor, or ShapeProp's TensorMetadata)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        dt = str(value.dtype).replace("torch.", "")
        return f"[{', '.join(str(s) for s in value.shape)}] {_DTYPES.get(dt, dt)}"
    if isinstance(value, (list, tuple)) and value and depth < 1:
        parts = [p for p in (_describe(v, depth + 1) for v in value[:3]) if p]
        more = ", ..." if len(value) > 3 else ""
        return f"({', '.join(parts)}{more})" if parts else ""
    return ""


class _ShapeRecorder(fx.Interpreter):
    """Runs a GraphModule, keeping a short shape description of every node's value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.shapes: dict[fx.Node, str] = {}
        self.at: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.at = n
        value = super().run_node(n)
        self.shapes[n] = _describe(value)
        return value


def _positional(gm: fx.GraphModule, example: Any) -> list[Any]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not isinstance(example, Mapping):
        example = dict(zip((p.target for p in placeholders), example))
    return [example.get(p.target, p.args[0] if p.args else None) for p in placeholders]


def _node_info(g: Graphish, example: Any, notes: list[str]) -> dict[fx.Node, dict[str, str]]:
    info: dict[fx.Node, dict[str, str]] = {}
    graph = _graph(g)
    for n in graph.nodes:
        meta = n.meta.get("tensor_meta", n.meta.get("val"))
        info[n] = {"shape": _describe(meta) if meta is not None else ""}
        if isinstance(g, fx.GraphModule) and n.op == "call_module":
            try:
                mod = g.get_submodule(n.target)
            except AttributeError:
                continue
            info[n]["module"] = type(mod).__name__
    if example is None or not isinstance(g, fx.GraphModule):
        return info
    rec = _ShapeRecorder(g)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            rec.run(*_positional(g, example))
    except Exception as exc:  # shapes are a courtesy: report and keep what was found
        where = f" at {rec.at.name}" if rec.at is not None else ""
        notes.append(f"shape propagation stopped{where}: {type(exc).__name__}: "
                     f"{str(exc).splitlines()[0] if str(exc) else ''}")
    for n, s in rec.shapes.items():
        if s:
            info[n]["shape"] = s
    return info


_OPS = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
        operator.matmul: "@", operator.floordiv: "//"}


def _fn_name(t: Any) -> str:
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", repr(t))
    mod = getattr(t, "__module__", "") or ""
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod.startswith("torch") or getattr(torch, name, None) is t:
        return f"torch.{name}"
    return name


def _arg(v: Any, limit: int = 40) -> str:
    if isinstance(v, fx.Node):
        return v.name
    if isinstance(v, tuple):
        inner = ", ".join(_arg(x) for x in v)
        return f"({inner}{',' if len(v) == 1 else ''})"
    if isinstance(v, list):
        return "[" + ", ".join(_arg(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k!r}: {_arg(x)}" for k, x in v.items()) + "}"
    if isinstance(v, slice):
        parts = ["" if x is None else _arg(x) for x in (v.start, v.stop, v.step)]
        return ":".join(parts[:2] if v.step is None else parts)
    s = repr(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _call(node: fx.Node) -> str:
    args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    return ", ".join(args)


def code(node: fx.Node, width: int = 100) -> str:
    """One node as a line of Python-like code: ``add = hidden_states + getitem``."""
    op, t, a = node.op, node.target, node.args
    if op == "placeholder":
        rhs = "<input>"
    elif op == "output":
        return f"return {_arg(a[0]) if a else ''}"
    elif op == "get_attr":
        rhs = f"self.{t}"
    elif op == "call_function" and t in _OPS and len(a) == 2 and not node.kwargs:
        rhs = f"{_arg(a[0])} {_OPS[t]} {_arg(a[1])}"  # type: ignore[index]
    elif op == "call_function" and t is operator.getitem and len(a) == 2:
        rhs = f"{_arg(a[0])}[{_arg(a[1])}]"
    elif op == "call_method":
        rhs = f"{_arg(a[0]) if a else '?'}.{t}({_call(node)[len(_arg(a[0])) + 2:] if a else ''})"
    else:
        rhs = f"{_fn_name(t)}({_call(node)})"
    line = f"{node.name} = {rhs}"
    return line if len(line) <= width else line[:width - 3] + "..."


# ----------------------------------------------------------------------------------- text

def _notes(d: GraphDiff, node: fx.Node) -> str:
    i = d.info.get(node, {})
    bits = [i.get("module", ""), i.get("shape", "")]
    tag = node.meta.get("revffn")
    if tag:
        bits.append(f"({tag})")
    if node in d.replaces:
        bits.append("replaces " + ", ".join(n.name for n in d.replaces[node]))
    return "  ".join(b for b in bits if b)


def _rows(d: GraphDiff) -> list[tuple[str, str, str]]:
    """(marker, code, notes) in the after graph's order, removed nodes where they were."""
    b2a = d._b2a
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
        note = _notes(d, b)
        if b in fused_into:
            note = f"{note}  -> {fused_into[b].name}".strip()
        if b in d.dead:
            note = f"{note}  unused, dropped".strip()
        return ("-", code(b), note)

    for a in d.after.nodes:
        rows.extend(gone(b) for b in before_of.get(a, []))
        if a not in d.matched:
            rows.append(("+", code(a), _notes(d, a)))
        elif a in rewired or a in changed:
            was = code(rewired.get(a) or changed[a]).split(" = ", 1)[-1]
            rows.append(("~", code(a), f"{_notes(d, a)}  was: {was}".strip()))
        else:
            rows.append((" ", code(a), _notes(d, a)))
    rows.extend(gone(b) for b in pending)
    return rows


def _text(d: GraphDiff, context: int | None) -> str:
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


# ----------------------------------------------------------------------------------- html

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


def _labels(d: GraphDiff, n: fx.Node) -> list[str]:
    """Three lines: the node's name, what it computes, its module type and shape."""
    i = d.info.get(n, {})
    what = n.op if n.op in ("placeholder", "output") else code(n, 400).split(" = ", 1)[-1]
    extra = "  ".join(x for x in (i.get("module", ""), i.get("shape", "")) if x)
    return [_clip(n.name, 40), _clip(what, 40)] + ([_clip(extra, 44)] if extra else [])


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n - 3] + "..."


def _svg(d: GraphDiff, graph: fx.Graph, keys: dict[fx.Node, str], side: str) -> str:
    labels = {n: _labels(d, n) for n in graph.nodes}
    box, width, height = _layout(graph, labels)
    other = d._b2a if side == "before" else d.matched
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
        tip = [f"{n.name} ({status})", f"op: {n.op}", f"target: {_fn_name(n.target)}",
               code(n, 400)] + [f"{k}: {v}" for k, v in d.info.get(n, {}).items() if v]
        if n.meta.get("revffn"):
            tip.append(f"added by revffn as: {n.meta['revffn']}")
        src = _sources(n)
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


def _section(d: GraphDiff, index: int) -> str:
    keys = {}
    for k, (a, b) in enumerate(d.matched.items()):
        keys[a] = keys[b] = f"{index}-{k}"
    legend = "".join(f'<span style="background:{f};border-color:{s}">{name}</span>'
                     for name, (f, s) in _COLOURS.items() if name != "same")
    legend += ('<span style="border-color:#1a7f37">green edge: new input</span>'
               '<span style="border-color:#cf222e">dashed red edge: input dropped</span>')
    marks = {"+": "add", "-": "del", "~": "mod"}
    text = "\n".join(f'<span class="{marks.get(line[:1], "")}">{html.escape(line)}</span>'
                     for line in _text(d, None).splitlines())
    cols = "".join(f'<div class="col"><h3>{side}: {html.escape(t)}</h3>'
                   f'{_svg(d, g, keys, side)}</div>'
                   for side, t, g in (("before", d.titles[0], d.before),
                                      ("after", d.titles[1], d.after)))
    return (f'<section><h2>{html.escape(d.titles[0])} &rarr; {html.escape(d.titles[1])}</h2>'
            f'<p class="sum">{html.escape(d.summary())}. Hover a node for details; its '
            f'counterpart in the other graph is highlighted.</p><p class="legend">{legend}</p>'
            f'<div class="row">{cols}</div><details><summary>text diff</summary>'
            f'<pre>{text}</pre></details></section>')


def render_html(diffs: Sequence[GraphDiff], title: str = "revffn diff") -> str:
    """One self-contained HTML page with a section per diff."""
    body = "".join(_section(d, i) for i, d in enumerate(diffs))
    svg_defs = ('<svg width="0" height="0" style="position:absolute"><defs><marker id="arrow" '
                'viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
                'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#8c959f"/>'
                '</marker></defs></svg>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>'
            f'{html.escape(title)}</title><style>{_CSS}</style></head><body>{svg_defs}'
            f'<h1>{html.escape(title)}</h1>{body}<script>{_JS}</script></body></html>\n')


# ------------------------------------------------------------------------ transform diffs

def sample_inputs(rev: Any, seq: int = 8
                  ) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """A small model input and, captured while running it, each layer's inputs by name."""
    vocab = int(getattr(rev.config, "vocab_size", 0) or 32)
    ids = (torch.arange(seq) % vocab).unsqueeze(0)
    model_in = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    layer_in: dict[int, dict[str, Any]] = {}
    hooks = []
    for lg in rev.traced.layers:
        sig = inspect.signature(lg.module.forward)

        def grab(_m: Any, args: Any, kwargs: Any, _i: int = lg.index, _s: Any = sig) -> None:
            layer_in.setdefault(_i, dict(_s.bind_partial(*args, **kwargs).arguments))

        hooks.append(lg.module.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            rev.traced.graph_module(**model_in)
    except Exception:  # shapes are optional; the diff itself does not need them
        pass
    finally:
        for h in hooks:
            h.remove()
    return model_in, layer_in


def transform_diffs(rev: Any, layer: int | None = None, per_pass: bool = False,
                    shapes: bool = True) -> list[GraphDiff]:
    """The diffs of a RevModel's compilation: the model graph, then one converted layer
    (default: the first); with ``per_pass`` one diff per recorded pass instead."""
    if layer is None:
        layer = rev.converted[0]
    n = len(rev.traced.layers)
    if not 0 <= layer < n:
        raise RevFFNError(f"layer {layer} out of range: the model has {n} layers (0-{n - 1})")
    if layer not in rev.converted:
        lp = rev.plan.layers[layer]
        why = lp.reason if not lp.convertible else "not selected"
        raise RevFFNError(f"layer {layer} is not converted ({why}); converted layers: "
                          f"{', '.join(map(str, rev.converted))}")
    rev.specs()
    rev.graph()
    model_in, layer_in = sample_inputs(rev) if shapes else (None, {})
    lg = rev.traced.layers[layer]
    out: list[GraphDiff] = []
    for key, ex, name in (("model", model_in, type(rev.model).__name__),
                          (f"layer{layer}", layer_in.get(layer),
                           f"layer {layer} ({lg.qualname}, {type(lg.module).__name__})")):
        records = rev.pass_records[key]
        if per_pass:
            for k, r in enumerate(records):
                out.append(diff(r.before, r.after, ex, titles=(
                    f"{name}" if k == 0 else f"{name} after {records[k - 1].name}",
                    f"{name} after {r.name}")))
        else:
            passes = ", ".join(r.name for r in records)
            out.append(diff(records[0].before, records[-1].after, ex,
                            titles=(name, f"{name} after {passes}")))
    return out


# ------------------------------------------------------------------------------------ cli

class _BadInput(click.ClickException):
    exit_code = 2


def _print_text(text: str) -> None:
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    styles = {"+": "green", "-": "red", "~": "yellow", "@": "cyan"}
    for line in text.splitlines():
        console.print(Text(line, style=styles.get(line[:1], "")))


@click.command("diff", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("--coupling", default="revffn", show_default=True,
              help="The coupling to transform with (revffn or revnet).")
@click.option("--layer", type=int, default=None,
              help="The decoder layer to show (default: the first convertible one).")
@click.option("--format", "fmt", type=click.Choice(["text", "html"]), default="text",
              show_default=True, help="A terminal listing or one self-contained HTML page.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write to this file instead of stdout.")
@click.option("--per-pass", is_flag=True, help="One diff per recorded pass, in order.")
@click.option("--context", type=int, default=3, show_default=True,
              help="Unchanged nodes shown around each change in text (-1: all).")
def diff_command(model_dir: str, coupling: str, layer: int | None, fmt: str,
                 output: str | None, per_pass: bool, context: int) -> None:
    """Show what the transform changes in MODEL_DIR: the model-level graph and one layer.

    Loads the local model directory, transforms it as ``revffn transform`` would (nothing
    is written), and prints the before/after diff of the model graph (decoder layers fused
    into reversible stacks) and of a decoder layer (residual adds replaced by the coupling).
    Shapes come from running a small example input (1 x 8 tokens).

    \b
    Examples:
      revffn diff examples/tiny-mixtral
      revffn diff examples/tiny-mixtral --format html -o diff.html
      revffn diff examples/tiny-mixtral --per-pass --layer 1
    """
    from .loading import load_model
    from .model import transform

    try:
        rev = transform(load_model(model_dir), coupling=coupling)
        diffs = transform_diffs(rev, layer, per_pass)
    except RevFFNError as exc:
        raise _BadInput(" ".join(str(exc).split())) from exc
    if fmt == "html":
        page = render_html(diffs, f"revffn diff: {model_dir} ({coupling})")
    else:
        page = "\n\n".join(d.to_text(None if context < 0 else context) for d in diffs)
    if output is not None:
        with open(output, "w", encoding="utf-8") as f:
            f.write(page if page.endswith("\n") else page + "\n")
        click.echo(f"wrote {output}", err=True)
    elif fmt == "text":
        _print_text(page)
    else:
        click.echo(page, nl=False)


__all__ = ["GraphDiff", "Pair", "code", "diff", "diff_command", "render_html",
           "sample_inputs", "transform_diffs"]
