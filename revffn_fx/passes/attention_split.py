"""Split a traced attention graph into its query path and its key/value path, and
rebuild it with two inputs (steps 2 and 3 of :mod:`.cross_branch`).

- **Split by data flow** (:func:`split_roles`). The *score* computations are the attention
  ops (``scaled_dot_product_attention``: operands q, k, v) and the first products of two
  hidden-dependent operands (``matmul``/``bmm``: q @ k^T); a product of a score
  descendant with another hidden-dependent operand is the value product. The query
  path is every hidden-dependent ancestor of a query operand, the key/value path every
  hidden-dependent ancestor of a key or value operand; in-place writes (DeepSeek's
  ``new_empty`` + ``copy_`` of key halves) count as data flow into the written tensor.
- **Rebuild** (:func:`build_cross_graph`). Query-path nodes are copied reading ``query``,
  key/value-path nodes reading the hidden input; a node on both (the input itself, a
  fused qkv projection) is computed once per side, and the query copy feeds the query
  slices. Nodes after the scores read the side they depend on; a later read of a node on
  both sides takes the query side, because the attention output is indexed by query
  tokens.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..errors import ConversionError

_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math"}
_PRODUCT = {"matmul": (0, 1), "bmm": (0, 1), "mm": (0, 1), "baddbmm": (1, 2)}
# output values (or shapes) depend on the data: a real-tensor trace would bake them in
_DATA_DEPENDENT = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "unique",
                   "_unique", "_unique2", "unique_consecutive", "unique_dim", "masked_select",
                   "repeat_interleave", "bincount", "histc", "tolist"}


class CrossBranchError(ConversionError):
    """An attention module cannot be split into a query path and a key/value path."""


def _op(node: fx.Node) -> str:
    """``aten.matmul.default`` -> ``matmul``; '' for anything that is not an aten op."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return ""
    return node.target._schema.name.split("::")[-1]


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is operator.getitem:
        return True  # an element of split/chunk: a view of its input
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    rets = node.target._schema.returns
    return bool(rets) and rets[0].alias_info is not None and not rets[0].alias_info.is_write


def _alias_root(node: fx.Node) -> fx.Node:
    while _is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _written(node: fx.Node) -> list[fx.Node]:
    """The arguments an in-place / out= op writes to."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return []
    out = []
    for i, a in enumerate(node.target._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            if isinstance(v, fx.Node):
                out.append(v)
    return out


@dataclass
class Split:
    """The roles of the hidden-dependent nodes of a traced attention graph."""

    query: set[fx.Node]
    key_value: set[fx.Node]
    dependent: set[fx.Node]
    cores: list[str]


def split_roles(graph: fx.Graph, hidden: fx.Node) -> Split:
    """Separate the query path from the key/value path by data flow from ``hidden``."""
    order = [n for n in graph.nodes]
    deps = _dependencies(order)
    dependent = _dependent_on(hidden, order, deps)
    heads_q, heads_kv, cores = _score_operands(order, deps, dependent)
    query = _closure(heads_q, deps, dependent)
    key_value = _closure(heads_kv, deps, dependent)
    _check_writes(order, dependent, query | key_value)
    return Split(query, key_value, dependent, cores)


def _dependencies(order: list[fx.Node]) -> dict[fx.Node, set[fx.Node]]:
    """What each node reads: its inputs, and every earlier in-place write to their base."""
    deps: dict[fx.Node, set[fx.Node]] = {}
    writes: dict[fx.Node, list[fx.Node]] = {}
    for n in order:
        d = set(n.all_input_nodes)
        for r in n.all_input_nodes:  # a read sees every earlier in-place write to its base
            d.update(writes.get(_alias_root(r), ()))
        deps[n] = d
        for w in _written(n):
            root = _alias_root(w)
            if root.op == "placeholder":
                raise CrossBranchError(f"{n.name} writes in place into an input of the attention")
            writes.setdefault(root, []).append(n)
    return deps


def _dependent_on(hidden: fx.Node, order: list[fx.Node],
                  deps: dict[fx.Node, set[fx.Node]]) -> set[fx.Node]:
    """The nodes computed from ``hidden``; none may depend on its values (``.item()``)."""
    dependent = {hidden}
    for n in order:
        if any(d in dependent for d in deps[n]):
            dependent.add(n)
    bad = sorted({_op(n) for n in dependent if _op(n) in _DATA_DEPENDENT})
    if bad:
        raise CrossBranchError(f"data-dependent op(s) {bad} on the hidden state: a traced "
                               "graph would only be valid for one input")
    return dependent


def _operand(deps: dict[fx.Node, set[fx.Node]], core: fx.Node, o: fx.Node) -> set[fx.Node]:
    """``o`` and the in-place writes into it that ``core`` sees."""
    root = _alias_root(o)
    return {o} | {w for w in deps[core] if any(_alias_root(t) is root for t in _written(w))}


def _score_operands(order: list[fx.Node], deps: dict[fx.Node, set[fx.Node]],
                    dependent: set[fx.Node]) -> tuple[set[fx.Node], set[fx.Node], list[str]]:
    """The operands of the score computations that are queries, and those that are keys
    or values, with the computations found, in words."""
    heads_q: set[fx.Node] = set()
    heads_kv: set[fx.Node] = set()
    scored: set[fx.Node] = set()  # score nodes and everything computed from them
    cores: list[str] = []
    for n in order:
        op = _op(n)
        if n in dependent and op in _SDPA:
            q, k, v = n.args[:3]
            if not all(isinstance(t, fx.Node) and t in dependent for t in (q, k, v)):
                raise CrossBranchError(f"{n.name}: an attention operand does not depend on "
                                       "the hidden state")
            heads_q |= _operand(deps, n, q)
            heads_kv |= _operand(deps, n, k) | _operand(deps, n, v)
            scored.add(n)
            cores.append(f"{op}({q.name}, {k.name}, {v.name})")
        elif n in dependent and op in _PRODUCT:
            _product(n, op, deps, dependent, scored, heads_q, heads_kv, cores)
        if any(d in scored for d in deps[n]):
            scored.add(n)
    if not cores:
        raise CrossBranchError("no attention score computation (scaled_dot_product_attention "
                               "or a product of two hidden-dependent tensors) found")
    if not any(c.startswith(("values", *_SDPA)) for c in cores):
        raise CrossBranchError("attention scores found but no product with values")
    return heads_q, heads_kv, cores


def _product(n: fx.Node, op: str, deps: dict[fx.Node, set[fx.Node]], dependent: set[fx.Node],
             scored: set[fx.Node], heads_q: set[fx.Node], heads_kv: set[fx.Node],
             cores: list[str]) -> None:
    """A product of two tensors: the scores q @ k^T when neither is a score yet (``n``
    joins ``scored``), the value product probs @ v when one is."""
    a, b = (n.args[i] for i in _PRODUCT[op])
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in dependent
            and b in dependent):
        return
    if a not in scored and b not in scored:  # q @ k^T
        heads_q |= _operand(deps, n, a)
        heads_kv |= _operand(deps, n, b)
        scored.add(n)
        cores.append(f"scores {n.name} = {a.name} @ {b.name}")
    elif (a in scored) != (b in scored):  # probs @ v
        v = b if a in scored else a
        heads_kv |= _operand(deps, n, v)
        cores.append(f"values {n.name} reads {v.name}")


def _closure(heads: set[fx.Node], deps: dict[fx.Node, set[fx.Node]],
             dependent: set[fx.Node]) -> set[fx.Node]:
    """``heads`` and every hidden-dependent node they are computed from."""
    seen, todo = set(heads), list(heads)
    while todo:
        for d in deps[todo.pop()]:
            if d in dependent and d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def _check_writes(order: list[fx.Node], dependent: set[fx.Node], paths: set[fx.Node]) -> None:
    """No in-place write mixes the two sides, or writes into them after the scores."""
    for n in order:
        for w in _written(n):
            root = _alias_root(w)
            if n in dependent and root not in dependent:
                raise CrossBranchError(f"{n.name} writes hidden-dependent values into a tensor "
                                       "shared by both sides")
            if n not in paths and root in paths:
                raise CrossBranchError(f"{n.name} writes into the query or key/value path "
                                       "after the scores")


def build_cross_graph(graph: fx.Graph, hidden: fx.Node, split: Split) -> fx.Graph:
    """Copy ``graph`` with ``hidden`` replaced by two inputs, ``query`` and ``hidden``."""
    new = fx.Graph()
    shared: dict[fx.Node, Any] = {}
    side_env: dict[str, dict[fx.Node, Any]] = {"q": {}, "kv": {}, "post": {}}

    def lookup(side: str) -> Callable[[fx.Node], Any]:
        def get(a: fx.Node) -> Any:
            if a not in split.dependent:
                return shared[a]
            if side == "post":
                if a in side_env["post"]:
                    return side_env["post"][a]
                return side_env["q"][a] if a in split.query else side_env["kv"][a]
            return side_env[side][a]
        return get

    for n in graph.nodes:
        if n is hidden:
            side_env["q"][n] = new.placeholder("query")
            side_env["kv"][n] = new.placeholder("hidden")
            side_env["q"][n].meta["revffn"] = "cross_query"
            continue
        if n.op == "output":
            new.output(fx.map_arg(n.args[0], lookup("post")))
            continue
        if n not in split.dependent:
            shared[n] = new.node_copy(n, lookup("shared"))
            continue
        sides = [s for s, part in (("q", split.query), ("kv", split.key_value)) if n in part]
        for side in sides or ["post"]:
            c = new.node_copy(n, lookup(side))
            c.meta["cross_side"] = side
            if side == "q":
                c.meta["revffn"] = "cross_query"
            side_env[side][n] = c
    new.lint()
    return new
