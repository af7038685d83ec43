"""The rich tables ``revffn inspect`` and ``revffn plan`` print: the model's facts, the
decoder layers the analysis found, the memory plan (narrow or --wide) with its notes, and
the longest sequence per method (--longest)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from revffn_fx.output import human_bytes


def human_count(n: int | float) -> str:
    """``476736`` -> ``476,736 (0.48M)``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n:,} ({n / size:.2f}{unit})"
    return f"{n:,}"


# -------------------------------------------------------------------------------------- inspect

_FACTS = (("model_type", "model type"), ("class", "class"), ("hidden_size", "hidden size"),
          ("num_layers", "layers"), ("num_experts", "experts"), ("parameters", "parameters"),
          ("dtype", "dtype"))


def facts_table(model: dict[str, Any]) -> Table:
    """The model-level facts from ``plan.model``, known keys first, in a two-column grid."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    labels = dict(_FACTS)
    for key in [k for k, _ in _FACTS if k in model] + [k for k in model if k not in labels]:
        value = model[key]
        shown = human_count(value) if key == "parameters" and isinstance(value, int) else str(value)
        grid.add_row(labels.get(key, key.replace("_", " ")), Text(shown))
    return grid


def layers_table(plan: Any) -> Table:
    """One row per decoder layer: its sublayers, their residual forms, convertible or why not."""
    table = Table(title="decoder layers", title_justify="left", show_lines=True)
    table.add_column("layer", justify="right", no_wrap=True)
    table.add_column("sublayers (kind: modules)")
    table.add_column("residual form", no_wrap=True)
    table.add_column("convertible")
    for lp in plan.layers:
        subs = Text("\n").join(Text(f"{s.kind}: {', '.join(s.modules) or '-'}")
                               for s in lp.sublayers) or Text("(no residual branch)")
        forms = Text("\n").join(
            Text(s.residual_form + (f" (scale {s.scale:g})" if s.scale is not None else ""))
            for s in lp.sublayers) or Text("-")
        verdict = (Text("yes", style="green") if lp.convertible
                   else Text(f"no: {lp.reason}", style="red"))
        if lp.convertible and getattr(lp, "pairing", ""):  # how the updates share the streams
            verdict = Text.assemble(verdict, f"\n{lp.pairing}")
        table.add_row(str(lp.index), subs, forms, verdict)
    return table


# ----------------------------------------------------------------------------------------- plan

_SHORT = {"plain fine-tuning": "plain", "gradient checkpointing": "checkpointing",
          "reversible (revffn)": "reversible", "reversible + lean loss head":
          "reversible + lean head"}
PLAN_NOTE = ("model state: parameters + gradients + optimizer states; activations\n"
              "include the loss head; --wide: one column per category; - : none held\n"
              "at that method's peak (e.g. no gradients yet while the loss is computed)")


def short_method(method: str) -> str:
    """A method's name as the narrow plan table shows it."""
    return _SHORT.get(method, method.replace("lean loss head", "lean head"))


def stack_notes(rows: Any) -> list[str]:
    """One line per coupling (streams and stored bits, inside its activations) and for the
    offloading row (what it keeps on the host), from the fused rows."""
    lines = []
    for r in rows:
        if not r.fused:
            continue
        if r.streams:
            bits = f", stored bits {human_bytes(r.stored_bits)}" if r.stored_bits else ""
            lines.append(f"  {short_method(r.method)}: streams {human_bytes(r.streams)}{bits}")
        if r.host:
            lines.append(f"  {short_method(r.method)}: {human_bytes(r.host)} on the host")
    return (["of the activations (fused rows):"] + lines) if lines else []


def plan_table(rows: Any, title: str, budget: int, wide: bool = False) -> Table:
    """The `revffn plan` table: each figure in its own unit (never 0.00). Narrow (80
    columns): method, optimizer, model state, activations, total, fits (within ``budget``
    bytes: say which in ``title``); ``wide``: every category in its own column."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  show_edge=False, collapse_padding=True)
    heads = ["method", "optimizer"] + (
        ["params", "grads", "optim. states", "activations", "streams", "stored bits",
         "loss head"] if wide else ["model state", "activations"]) + ["total", "fits"]
    for h in heads:
        table.add_column(h, justify="left" if h in ("method", "optimizer") else "right",
                         no_wrap=True)
    for r in rows:
        figures = ([r.parameters, r.gradients, r.optimizer, r.activations, r.streams,
                    r.stored_bits, r.loss_head] if wide
                   else [r.parameters + r.gradients + r.optimizer,
                         r.activations + r.loss_head])
        table.add_row(r.method if wide else short_method(r.method),
                      "fused" if r.fused else "ordinary",
                      *(human_bytes(v) if v else "-" for v in figures + [r.total]),
                      "yes" if r.total <= budget else "no")
    return table


def longest_table(found: Any, title: str, batch: int) -> Table:
    """``revffn plan --longest``: per method, the longest sequence that fits, its tokens
    per step and the planned peak there."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, show_edge=False, collapse_padding=True)
    for h in ("method", "optimizer", "longest seq", "tokens/step", "peak there"):
        table.add_column(h, justify="left" if h in ("method", "optimizer") else "right",
                         no_wrap=True)
    for f in found:
        table.add_row(short_method(f.method), "fused" if f.fused else "ordinary",
                      f"{f.seq:,}" if f.seq else "none fits",
                      f"{f.seq * batch:,}" if f.seq else "-",
                      human_bytes(f.row.total) if f.row else "-")
    return table
