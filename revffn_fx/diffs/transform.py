"""The diffs of a RevModel's compilation, per transform or per pass."""

from __future__ import annotations

from typing import Any

from ..errors import RevFFNError
from .graph_diff import GraphDiff, diff
from .sample_inputs import sample_inputs


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
