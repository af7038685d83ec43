"""The diffs of a RevModel's compilation, per transform or per pass."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx

from ..errors import RevFFNError
from .graph_diff import GraphDiff, diff

Graphish = fx.GraphModule | fx.Graph


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


