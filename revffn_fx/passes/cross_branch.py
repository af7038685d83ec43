"""Cross-branch attention: queries from one stream, keys and values from another.

The paper's RevFFN block updates X1 with ``Attn(Q from X1, K/V from X2)``. A pretrained
attention module takes one hidden input, so :class:`CrossAttention` rebuilds it as
``(query, *same args) -> same outputs`` generically, from its traced computation:

1. **Trace.** ``make_fx(pre_dispatch=True)`` over ``torch.func.functional_call`` records
   the module as an aten graph whose inputs are the parameters, the hidden state and the
   other tensor arguments (so parameters stay real inputs and get gradients). torch.fx's
   symbolic tracer cannot run HF attention (``(*input_shape, -1, head_dim)`` unpacks a
   proxy); ``make_fx`` runs the code on real tensors instead. Pre-dispatch keeps
   ``aten.linear`` / ``aten.scaled_dot_product_attention`` whole and sits above autograd
   and autocast, so one graph serves with or without grad. Shapes and Python constants
   are specialised, hence one graph per (shapes, dtypes, constant arguments, mode),
   cached. Data-dependent ops (``.item()``, ``nonzero``) would bake one input's values
   in: such attentions are refused.
2. **Split by data flow.** The *score* computations are the attention ops
   (``scaled_dot_product_attention``: operands q, k, v) and the first products of two
   hidden-dependent operands (``matmul``/``bmm``: q @ k^T); a product of a score
   descendant with another hidden-dependent operand is the value product. The query
   path is every hidden-dependent ancestor of a query operand, the key/value path every
   hidden-dependent ancestor of a key or value operand; in-place writes (DeepSeek's
   ``new_empty`` + ``copy_`` of key halves) count as data flow into the written tensor.
3. **Rebuild.** Query-path nodes are copied reading ``query``, key/value-path nodes
   reading the hidden input; a node on both (the input itself, a fused qkv projection)
   is computed once per side, and the query copy feeds the query slices. Nodes after
   the scores read the side they depend on; a later read of a node on both sides takes
   the query side, because the attention output is indexed by query tokens.

``cross(x, x)`` equals ``attention(x)``; :meth:`CrossAttention.check` verifies that on an
example call before a layer is converted (else the layer keeps the closed form).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from ..errors import ConversionError

_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math"}
_PRODUCT = {"matmul": (0, 1), "bmm": (0, 1), "mm": (0, 1), "baddbmm": (1, 2)}
# output values (or shapes) depend on the data: a real-tensor trace would bake them in
_DATA_DEPENDENT = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "unique",
                   "_unique", "_unique2", "unique_consecutive", "unique_dim", "masked_select",
                   "repeat_interleave", "bincount", "histc", "tolist"}
_CACHE_SIZE = 32


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
    dependent = {hidden}
    for n in order:
        if any(d in dependent for d in deps[n]):
            dependent.add(n)
    bad = sorted({_op(n) for n in dependent if _op(n) in _DATA_DEPENDENT})
    if bad:
        raise CrossBranchError(f"data-dependent op(s) {bad} on the hidden state: a traced "
                               "graph would only be valid for one input")
    heads_q: set[fx.Node] = set()
    heads_kv: set[fx.Node] = set()

    def operand(core: fx.Node, o: fx.Node) -> set[fx.Node]:
        """``o`` and the in-place writes into it that ``core`` sees."""
        root = _alias_root(o)
        return {o} | {w for w in deps[core] if any(_alias_root(t) is root for t in _written(w))}

    scored: set[fx.Node] = set()  # score nodes and everything computed from them
    cores: list[str] = []
    for n in order:
        op = _op(n)
        if n in dependent and op in _SDPA:
            q, k, v = n.args[:3]
            if not all(isinstance(t, fx.Node) and t in dependent for t in (q, k, v)):
                raise CrossBranchError(f"{n.name}: an attention operand does not depend on "
                                       "the hidden state")
            heads_q |= operand(n, q)
            heads_kv |= operand(n, k) | operand(n, v)
            scored.add(n)
            cores.append(f"{op}({q.name}, {k.name}, {v.name})")
        elif n in dependent and op in _PRODUCT:
            a, b = (n.args[i] for i in _PRODUCT[op])
            if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in dependent \
                    and b in dependent:
                if a not in scored and b not in scored:  # q @ k^T
                    heads_q |= operand(n, a)
                    heads_kv |= operand(n, b)
                    scored.add(n)
                    cores.append(f"scores {n.name} = {a.name} @ {b.name}")
                elif (a in scored) != (b in scored):  # probs @ v
                    v = b if a in scored else a
                    heads_kv |= operand(n, v)
                    cores.append(f"values {n.name} reads {v.name}")
        if any(d in scored for d in deps[n]):
            scored.add(n)
    if not cores:
        raise CrossBranchError("no attention score computation (scaled_dot_product_attention "
                               "or a product of two hidden-dependent tensors) found")
    if not any(c.startswith(("values", *_SDPA)) for c in cores):
        raise CrossBranchError("attention scores found but no product with values")

    def closure(heads: set[fx.Node]) -> set[fx.Node]:
        seen, todo = set(heads), list(heads)
        while todo:
            for d in deps[todo.pop()]:
                if d in dependent and d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    query, key_value = closure(heads_q), closure(heads_kv)
    for n in order:
        for w in _written(n):
            root = _alias_root(w)
            if n in dependent and root not in dependent:
                raise CrossBranchError(f"{n.name} writes hidden-dependent values into a tensor "
                                       "shared by both sides")
            if n not in query | key_value and root in query | key_value:
                raise CrossBranchError(f"{n.name} writes into the query or key/value path "
                                       "after the scores")
    return Split(query, key_value, dependent, cores)


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


@dataclass
class _Compiled:
    graph: fx.GraphModule
    out_spec: Any
    cores: list[str]


class CrossAttention(nn.Module):
    """``(query, *args, **kwargs)``: ``attention(*args, **kwargs)`` with its queries
    computed from ``query`` and its keys/values from the hidden input (``args[hidden_at]``
    or ``kwargs[hidden_at]``). Holds the attention module, so its parameters are this
    module's and receive gradients."""

    def __init__(self, attention: nn.Module, hidden_at: int | str) -> None:
        super().__init__()
        self.attention = attention
        self.hidden_at = hidden_at
        self.__dict__["_cache"] = {}
        self.cores: list[str] = []

    def _named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [*self.attention.named_parameters(), *self.attention.named_buffers()]

    def _without_hidden(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                        ) -> tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]:
        if isinstance(self.hidden_at, int):
            i = self.hidden_at
            return args[i], args[:i] + args[i + 1:], kwargs
        kw = dict(kwargs)
        return kw.pop(self.hidden_at), args, kw

    def _with_hidden(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if isinstance(self.hidden_at, int):
            i = self.hidden_at
            return args[:i] + (x,) + args[i:], kwargs
        return args, {**kwargs, self.hidden_at: x}

    def _compile(self, key: Any, example: torch.Tensor, leaves: list[Any], spec: Any,
                 tensors: list[torch.Tensor]) -> _Compiled:
        named = self._named_tensors()
        names = [n for n, _ in named]
        where = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        box: dict[str, Any] = {}

        def original(*flat: torch.Tensor) -> list[torch.Tensor]:
            params = dict(zip(names, flat[:len(names)]))
            x = flat[len(names)]
            rest = list(leaves)
            for i, t in zip(where, flat[len(names) + 1:]):
                rest[i] = t
            args, kwargs = pytree.tree_unflatten(rest, spec)
            args, kwargs = self._with_hidden(x, args, kwargs)
            out = torch.func.functional_call(self.attention, params, args, kwargs)
            flat_out, box["spec"] = pytree.tree_flatten(out)
            return flat_out

        # fake tensors: nothing runs (no RNG use), and Python reading a tensor's values
        # either fails (data-dependent sizes) or shows as an op (item) that split_roles
        # refuses, instead of being baked in silently as in a real-tensor trace
        with torch.no_grad():
            traced = make_fx(original, pre_dispatch=True, tracing_mode="fake")(
                *(t for _, t in named), example, *tensors)
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        hidden = placeholders[len(names)]
        split = split_roles(traced.graph, hidden)
        graph = build_cross_graph(traced.graph, hidden, split)
        gm = fx.GraphModule(traced, graph, class_name="CrossAttentionGraph")
        compiled = _Compiled(gm, box["spec"], split.cores)
        cache = self._cache
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = compiled
        self.cores = split.cores
        return compiled

    def compiled(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> _Compiled:
        """The cross graph for this call's shapes and constants (traced on first use)."""
        return self._prepare(query, args, kwargs)[0]

    def _prepare(self, query: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[_Compiled, torch.Tensor, list[torch.Tensor]]:
        x, rest_args, rest_kwargs = self._without_hidden(args, kwargs)
        leaves, spec = pytree.tree_flatten((rest_args, rest_kwargs))
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        consts = tuple(v if isinstance(v, (bool, int, float, str, type(None))) else
                       (type(v).__name__, id(v)) for v in leaves if not isinstance(v, torch.Tensor))
        p = next(iter(self.attention.parameters()), x)

        def meta(t: torch.Tensor) -> tuple[Any, ...]:
            return (tuple(t.shape), t.dtype, t.device)

        key = (meta(query), meta(x), tuple(meta(t) for t in tensors), consts, str(spec),
               self.attention.training, p.dtype, p.device,
               torch.is_autocast_enabled(x.device.type))
        if tuple(query.shape) != tuple(x.shape):
            raise ValueError(f"query {tuple(query.shape)} and hidden {tuple(x.shape)} differ "
                             "in shape")
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self._compile(key, x, leaves, spec, tensors)
        return compiled, x, tensors

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        compiled, x, tensors = self._prepare(query, args, kwargs)
        flat = compiled.graph(*(t for _, t in self._named_tensors()), query, x, *tensors)
        return pytree.tree_unflatten(list(flat), compiled.out_spec)

    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise :class:`CrossBranchError` unless the split works on this example call and
        ``cross(x, x)`` reproduces ``attention(x)``."""
        x = self._without_hidden(args, kwargs)[0]
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same dropout masks for both
            ref = pytree.tree_leaves(self.attention(*args, **kwargs))
            torch.manual_seed(0)
            got = pytree.tree_leaves(self(x, *args, **kwargs))
        tol = 1e-5 if x.dtype in (torch.float32, torch.float64) else 1e-2
        def same(a: Any, b: Any) -> bool:
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol)
            return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b

        if len(ref) != len(got) or not all(same(a, b) for a, b in zip(ref, got)):
            raise CrossBranchError("the rebuilt attention does not reproduce the original "
                                   "one on an example input")


def hidden_argument(node: fx.Node, reads_hidden: Callable[[Any], bool]) -> int | str:
    """Where a call_module node passes the hidden state: a position or a keyword."""
    found: list[int | str] = [i for i, a in enumerate(node.args) if reads_hidden(a)]
    found += [k for k, a in node.kwargs.items() if reads_hidden(a)]
    if len(found) != 1:
        raise CrossBranchError(f"{node.target} reads the hidden state through {len(found)} "
                               "arguments; expected one")
    return found[0]


def capture_calls(run: Callable[[], Any], modules: list[nn.Module]
                  ) -> dict[int, tuple[tuple[Any, ...], dict[str, Any]]]:
    """The first (args, kwargs) each module is called with while ``run()`` runs (no grad,
    the RNG state left as it was)."""
    seen: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.setdefault(id(mod), (args, dict(kwargs)))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            run()
    finally:
        for h in handles:
            h.remove()
    return seen


def _like(call: Any, p: torch.Tensor | None) -> Any:
    """The example call on the device (and floating dtype) the model has now: it may have
    been moved since the example was taken."""
    if p is None:
        return call

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(p.device, p.dtype if t.is_floating_point() else t.dtype)

    return pytree.tree_map(move, call)


def _attention_target(plan: Any) -> str:
    atts = [t for t, k in plan.sublayers[0].module_kinds.items() if k == "attention"]
    if len(atts) != 1:
        raise CrossBranchError(f"{len(atts)} attention modules in the first branch; "
                               "expected one")
    return atts[0]


def attention_calls(traced: Any, plans: dict[int, Any]
                    ) -> dict[int, tuple[tuple[Any, ...], dict[str, Any]]]:
    """An example call of the first-branch attention of every layer in ``plans`` (index ->
    LayerPlan), from one tiny forward of the model through its layer graphs, so the
    attention is called exactly as in the layer graphs. Run it at transform time: a
    forward inside a later (lazy) compilation would fire the user's hooks."""
    modules: dict[int, nn.Module] = {}
    for i, plan in plans.items():
        try:
            modules[i] = traced.layers[i].module.get_submodule(_attention_target(plan))
        except (CrossBranchError, AttributeError):
            continue
    if not modules:
        return {}
    emb = traced.model.get_input_embeddings() if hasattr(
        traced.model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", 4)
    device = next(traced.model.parameters()).device
    ids = (torch.arange(4, device=device) % vocab)[None]
    with traced.layer_graphs():
        calls = capture_calls(lambda: traced(ids), list(modules.values()))
    return {i: calls[id(m)] for i, m in modules.items() if id(m) in calls}


def cross_attentions(traced: Any, plans: dict[int, Any], cache: dict[int, Any],
                     training: bool, calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]]
                     ) -> tuple[dict[int, dict[str, CrossAttention]], dict[int, str]]:
    """Build the cross-attention of every layer in ``plans`` (index -> LayerPlan).

    Returns ``{index: {attention target: CrossAttention}}`` for the layers that can be
    split and ``{index: status}`` for all: "cross" or "closed form: <reason>".
    ``cache`` (index -> CrossAttention or reason) keeps the result across modes;
    ``calls`` are the example calls of :func:`attention_calls`.
    """
    for i, plan in plans.items():
        if i in cache:
            continue
        try:
            target = _attention_target(plan)
            gm = traced.layers[i].trace(training)
            first = plan.sublayers[0]
            nodes = {n.name: n for n in gm.graph.nodes}
            branch = {nodes[n] for n in first.nodes} | {nodes[first.residual_node]}
            node = next(n for n in gm.graph.nodes
                        if n.op == "call_module" and n.target == target)
            at = hidden_argument(node, lambda a, _b=branch: isinstance(a, fx.Node) and a in _b)
            if i not in calls:
                raise CrossBranchError("the attention was not called on an example input")
            module = gm.get_submodule(target)
            cross = CrossAttention(module, at)
            cross.check(*_like(calls[i], next(iter(module.parameters()), None)))
            cache[i] = cross
        except CrossBranchError as e:
            cache[i] = str(e)
        except Exception as e:  # noqa: BLE001 - a failed trace means: keep the closed form
            cache[i] = f"tracing the attention failed: {type(e).__name__}: {e}"
    chosen: dict[int, dict[str, CrossAttention]] = {}
    status: dict[int, str] = {}
    for i, plan in plans.items():
        got = cache[i]
        if isinstance(got, CrossAttention):
            chosen[i] = {_attention_target(plan): got}
            status[i] = "cross"
        else:
            status[i] = f"closed form: {got}"
    return chosen, status
