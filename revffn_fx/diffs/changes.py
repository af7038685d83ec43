"""What a diff found: the nodes of two fx graphs sorted into matched, added, removed,
dead, rewired and changed (:class:`GraphChanges`), without any rendering."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch.fx as fx


class Pair(NamedTuple):
    """A node of ``before`` and its counterpart in ``after``."""

    before: fx.Node
    after: fx.Node


@dataclass(repr=False)
class GraphChanges:
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
        return f"{type(self).__name__}({self.titles[0]} -> {self.titles[1]}: {self.summary()})"

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
        elif node not in self.before_to_after:
            return "dead" if node in self.dead else "removed"
        if node in self._touched["changed"]:
            return "changed"
        return "rewired" if node in self._touched["rewired"] else "same"

    @cached_property
    def before_to_after(self) -> dict[fx.Node, fx.Node]:
        """``matched`` the other way round: before node -> after node."""
        return {b: a for a, b in self.matched.items()}

    @cached_property
    def _touched(self) -> dict[str, set[fx.Node]]:
        return {"changed": {p.before for p in self.changed},
                "rewired": {p.before for p in self.rewired}}
