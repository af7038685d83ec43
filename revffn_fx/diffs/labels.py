"""Node labels for diffs: tensor shapes from an example run, and one-line code."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

Graphish = fx.GraphModule | fx.Graph


def graph_of(g: Graphish) -> fx.Graph:
    """The fx Graph of a GraphModule, or the Graph itself."""
    return g.graph if isinstance(g, fx.GraphModule) else g


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


def node_info(g: Graphish, example: Any, notes: list[str]) -> dict[fx.Node, dict[str, str]]:
    """Per node: its shape (from ``example`` run through ``g`` when given, else from
    ``node.meta``) and, for a call_module, the module's type; what stopped the example run
    is appended to ``notes``."""
    info: dict[fx.Node, dict[str, str]] = {}
    graph = graph_of(g)
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


def fn_name(t: Any) -> str:
    """A call target as code: ``F.silu``, ``torch.cat``, a plain name or the string."""
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
        rhs = f"{fn_name(t)}({_call(node)})"
    line = f"{node.name} = {rhs}"
    return line if len(line) <= width else line[:width - 3] + "..."
