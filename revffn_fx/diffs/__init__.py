"""Graph diffs: what a pass (or the whole transform) changed in a torch.fx graph.

``diff(before, after)`` matches the nodes of two graphs, first by the provenance passes
record (``node.meta["from_node"]``: a node name, a list of names for a node that replaces
several, or torch.fx's list of ``NodeSource``), then by structure (same op and target,
inputs already matched), and sorts the rest into added, removed, rewired (same node, other
inputs) and changed (same node, other op, target or constants). ``GraphDiff.to_text()`` is a
unified-diff-style listing, ``GraphDiff.to_html()`` one self-contained HTML page drawing both
graphs side by side. ``revffn diff`` shows them for a model directory.
"""

from .changes import Pair
from .graph_diff import GraphDiff, diff
from .html_page import render_html
from .labels import code
from .sample_inputs import sample_inputs
from .transform import transform_diffs

__all__ = ["GraphDiff", "Pair", "code", "diff", "render_html", "sample_inputs",
           "transform_diffs"]
