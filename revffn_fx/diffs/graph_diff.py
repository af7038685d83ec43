"""Matching two fx graphs into a GraphDiff: provenance first, then structure."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from .labels import Graphish, _graph, _node_info


class Pair(NamedTuple):
    """A node of ``before`` and its counterpart in ``after``."""

    before: fx.Node
    after: fx.Node


@dataclass(repr=False)
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

    def __repr__(self) -> str:
        return f"GraphDiff({self.titles[0]} -> {self.titles[1]}: {self.summary()})"

    def __str__(self) -> str:
        """The text listing (:meth:`to_text`)."""
        return self.to_text()

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
        from .render import _text

        return _text(self, context)

    def to_html(self, title: str | None = None) -> str:
        """One self-contained HTML page (inline SVG and CSS, no external references)."""
        from .render import render_html

        return render_html([self], title or f"{self.titles[0]} -> {self.titles[1]}")


# ------------------------------------------------------------------------------- matching



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


def _model_graph(obj: Any, layer: int | None) -> tuple[Graphish, str, Any] | None:
    """A TracedModel's or RevModel's graph: (graph, title, the TracedModel), else None."""
    from ..frontend.ir import TracedModel
    from ..model import RevModel

    if isinstance(obj, TracedModel):
        traced, name = obj, f"traced {type(obj.model).__name__}"
    elif isinstance(obj, RevModel):
        traced, name = obj.traced, f"{type(obj.model).__name__} ({obj.coupling})"
    else:
        return None
    if layer is None:
        return obj.graph_module, name, traced
    n = len(traced.layers)
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} out of range: the model has {n} layers (0-{n - 1})")
    lg = traced.layers[layer]
    title = f"{name}, layer {layer} ({lg.qualname})"
    if isinstance(obj, RevModel) and layer in obj.converted:
        return obj.specs()[layer].forward, title, traced
    return lg.graph_module, title + (", not converted" if isinstance(obj, RevModel) else ""), \
        traced


def diff(before: Graphish | Any, after: Graphish | Any, example_inputs: Any = None, *,
         titles: tuple[str, str] | None = None, layer: int | None = None) -> GraphDiff:
    """Compare two graphs into a :class:`GraphDiff`.

    Either side is a torch.fx GraphModule or Graph, a :class:`~revffn_fx.TracedModel` or a
    :class:`~revffn_fx.RevModel`: for models, the model-level graph, or with ``layer=N``
    that decoder layer's graph (a RevModel's converted layer: its coupling graph), e.g.
    ``rf.diff(rf.trace(model), rf.transform(model))``.
    ``example_inputs``: a small input (a tuple of positional values, or a mapping from
    placeholder name to value) run through both GraphModules to label nodes with tensor
    shapes; without it, shapes already in ``node.meta`` (``tensor_meta``, ``val``) are used
    (for models, a sample input is made up).
    """
    sides, traced = [], None
    for obj, which in ((before, "before"), (after, "after")):
        got = _model_graph(obj, layer)
        if got is not None:
            sides.append((got[0], got[1]))
            traced = traced or got[2]
        elif isinstance(obj, (fx.GraphModule, fx.Graph)):
            sides.append((obj, _title(obj, which)))
        else:
            raise TypeError(f"rf.diff compares a TracedModel, a RevModel, a torch.fx "
                            f"GraphModule or Graph; {which} is of type {type(obj).__name__}")
    if traced is not None:
        if example_inputs is None:
            from .transform import sample_inputs

            model_in, layer_in = sample_inputs(_Holder(traced))
            example_inputs = model_in if layer is None else layer_in.get(layer)
        before, after = sides[0][0], sides[1][0]
        titles = titles or (sides[0][1], sides[1][1])
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


class _Holder:
    """What :func:`sample_inputs` reads off a model: its config and TracedModel."""

    def __init__(self, traced: Any) -> None:
        self.traced, self.config = traced, traced.config


def _title(g: Graphish, default: str) -> str:
    return type(g).__name__ if isinstance(g, fx.GraphModule) else default


