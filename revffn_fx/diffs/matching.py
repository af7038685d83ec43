"""Pairing the nodes of two fx graphs: provenance first, then structure; and sorting the
pairs into rewired (other inputs) and changed (other op, target or constants)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx

from .changes import Pair
from .provenance import origin_key, sources


def target_key(node: fx.Node) -> Any:
    """A node's target, comparable across graphs (functions by module and name)."""
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


def input_nodes(node: fx.Node) -> list[fx.Node]:
    """Node inputs in argument order (kwargs by key), repeats kept."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, sorted(node.kwargs.items())), out.append)
    return out


def _same_tag(a: fx.Node, b: fx.Node) -> bool:
    """A node tagged as added by a pass only matches a node with the same tag."""
    tag = a.meta.get("revffn")
    return tag is None or b.meta.get("revffn") == tag


def live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes the output depends on."""
    out = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    seen: set[fx.Node] = set()
    todo = [out] if out is not None else []
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


class _Matching:
    """The pairs found so far (after -> before, before -> after), the fused nodes, and the
    ``before`` graph indexed by name and by provenance."""

    def __init__(self, before: fx.Graph) -> None:
        self.match: dict[fx.Node, fx.Node] = {}
        self.used: dict[fx.Node, fx.Node] = {}  # before -> after
        self.replaces: dict[fx.Node, list[fx.Node]] = {}
        self.by_name = {n.name: n for n in before.nodes}
        self.by_origin: dict[str, list[fx.Node]] = defaultdict(list)
        self.by_key: dict[Any, list[fx.Node]] = defaultdict(list)
        for b in before.nodes:
            for level in sources(b)[:1]:
                for name, _ in level:
                    self.by_origin[name].append(b)
            if origin_key(b) is not None:
                self.by_key[origin_key(b)].append(b)

    def take(self, a: fx.Node, b: fx.Node) -> None:
        self.match[a] = b
        self.used[b] = a

    def done(self, a: fx.Node) -> bool:
        return a in self.match or a in self.replaces


def match_nodes(before: fx.Graph, after: fx.Graph
                ) -> tuple[dict[fx.Node, fx.Node], dict[fx.Node, list[fx.Node]]]:
    """(after node -> before node, fused after node -> the before nodes it replaces)."""
    m = _Matching(before)
    _match_ends(before, after, m)
    for a in after.nodes:
        if a not in m.match:
            _match_by_provenance(a, m)
    _match_by_structure(before, after, m)
    _match_in_place(after, m)
    return m.match, m.replaces


def _match_ends(before: fx.Graph, after: fx.Graph, m: _Matching) -> None:
    """Placeholders by target, the output with the output."""
    ph = {n.target: n for n in before.nodes if n.op in ("placeholder", "output")}
    for a in after.nodes:
        b = ph.get(a.target) if a.op in ("placeholder", "output") else None
        if b is not None and b.op == a.op and b not in m.used:
            m.take(a, b)


def _match_by_provenance(a: fx.Node, m: _Matching) -> None:
    key = origin_key(a)
    same = next((b for b in m.by_key.get(key, []) if b not in m.used), None)
    if same is not None:  # the same provenance on both sides: the same node
        m.take(a, same)
        return
    levels = sources(a)
    if levels and (isinstance(key, tuple) or len({n for n, _ in levels[0]}) > 1):
        gone = [m.by_name[n] for n in dict.fromkeys(n for n, _ in levels[0]) if n in m.by_name]
        if gone:  # one node replacing several (a fused stack)
            m.replaces[a] = gone
            return
    for level in levels:
        found = _claimed(a, level, m)
        if found is not None:
            m.take(a, found)
            return


def _claimed(a: fx.Node, level: list[tuple[str, bool]], m: _Matching) -> fx.Node | None:
    """The first free node of ``before`` that one provenance level of ``a`` names."""
    for name, is_source in level:
        cands = [m.by_name[name]] if name in m.by_name else []
        origin = m.by_origin.get(name, [])
        cands = cands + origin if is_source else origin + cands
        # a plain name is an explicit claim; a NodeSource name may be of another
        # graph, so it must also agree on the tag of nodes the passes added
        found = next((b for b in cands if b not in m.used
                      and (not is_source or _same_tag(a, b))), None)
        if found is not None:
            return found
    return None


def _match_by_structure(before: fx.Graph, after: fx.Graph, m: _Matching) -> None:
    """Same op and target, inputs already matched: the best-scoring free node."""
    pool: dict[tuple[str, Any], list[fx.Node]] = defaultdict(list)
    for b in before.nodes:
        if b not in m.used:
            pool[(b.op, target_key(b))].append(b)
    for a in after.nodes:
        if m.done(a):
            continue
        ins = input_nodes(a)
        best, best_score = None, 0.0
        for b in pool.get((a.op, target_key(a)), []):
            if b in m.used or not _same_tag(a, b):
                continue
            b_ins = [m.used.get(x) for x in input_nodes(b)]
            hits = sum(1 for x, y in zip(ins, b_ins) if x is y)
            score = hits + (0.5 if a.name == b.name else 0.0)
            if (hits == len(ins) == len(b_ins)) and not ins:
                score += 0.25  # no inputs at all (get_attr): same target is enough
            if score > best_score:
                best, best_score = b, score
        if best is not None:
            m.take(a, best)


def _match_in_place(after: fx.Graph, m: _Matching) -> None:
    """A node edited in place (new target, maybe a tag): same name and op, same inputs."""
    for a in after.nodes:
        b = m.by_name.get(a.name)
        if (not m.done(a) and b is not None and b not in m.used
                and a.op == b.op and (ins := input_nodes(a))
                and [m.used.get(x) for x in input_nodes(b)] == ins):
            m.take(a, b)


def rewired_and_changed(after: fx.Graph, match: dict[fx.Node, fx.Node]
                        ) -> tuple[list[Pair], list[Pair]]:
    """The matched pairs whose inputs differ, and those whose op, target or constant
    arguments differ."""
    b2a = {b: a for a, b in match.items()}
    rewired, changed = [], []
    for a in after.nodes:
        b = match.get(a)
        if b is None:
            continue
        if [b2a.get(x) for x in input_nodes(b)] != input_nodes(a):
            rewired.append(Pair(b, a))
        if (a.op, target_key(a)) != (b.op, target_key(b)) or (
                _norm((a.args, a.kwargs), lambda n: None)
                != _norm((b.args, b.kwargs), lambda n: None)):
            changed.append(Pair(b, a))
    return rewired, changed
