"""``diff(before, after)``: two fx graphs (or models) compared into a :class:`GraphDiff`,
the changes with their text and HTML renderings."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..frontend.ir import TracedModel
from ..model import RevModel
from .changes import GraphChanges
from .html_page import render_html
from .labels import Graphish, graph_of, node_info
from .matching import live_nodes, match_nodes, rewired_and_changed
from .sample_inputs import sample_inputs
from .text_listing import render_text


class GraphDiff(GraphChanges):
    """The difference between two fx graphs (:class:`GraphChanges`), printable as a text
    listing (``str(d)``, :meth:`to_text`) or as an HTML page (:meth:`to_html`)."""

    def __str__(self) -> str:
        """The text listing (:meth:`to_text`)."""
        return self.to_text()

    def to_text(self, context: int | None = 3) -> str:
        """A unified-diff-style listing: ``-`` removed, ``+`` added, ``~`` rewired or
        changed (with what it was), ``context`` unchanged lines around them (None: all)."""
        return render_text(self, context)

    def to_html(self, title: str | None = None) -> str:
        """One self-contained HTML page (inline SVG and CSS, no external references)."""
        return render_html([self], title or f"{self.titles[0]} -> {self.titles[1]}")


def _model_graph(obj: Any, layer: int | None) -> tuple[Graphish, str, Any] | None:
    """A TracedModel's or RevModel's graph: (graph, title, the TracedModel), else None."""
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
            model_in, layer_in = sample_inputs(_Holder(traced))
            example_inputs = model_in if layer is None else layer_in.get(layer)
        before, after = sides[0][0], sides[1][0]
        titles = titles or (sides[0][1], sides[1][1])
    gb, ga = graph_of(before), graph_of(after)
    match, replaces = match_nodes(gb, ga)
    matched_before = set(match.values())
    live = live_nodes(gb)
    gone = [b for b in gb.nodes if b not in matched_before]
    rewired, changed = rewired_and_changed(ga, match)
    out = GraphDiff(gb, ga, match, [a for a in ga.nodes if a not in match],
                    [b for b in gone if b in live], [b for b in gone if b not in live],
                    rewired, changed, replaces,
                    titles=titles or (_title(before, "before"), _title(after, "after")))
    for g in (before, after):
        out.info.update(node_info(g, example_inputs, out.notes))
    return out


class _Holder:
    """What :func:`sample_inputs` reads off a model: its config and TracedModel."""

    def __init__(self, traced: Any) -> None:
        self.traced, self.config = traced, traced.config


def _title(g: Graphish, default: str) -> str:
    return type(g).__name__ if isinstance(g, fx.GraphModule) else default


