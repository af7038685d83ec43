"""Analysis pass: find the residual updates of each decoder layer graph.

Walking back from the output, the residual stream is a chain of sums
``v = r + b_1 + ... + b_k`` where ``r`` dominates every ``b_i`` (each branch depends on the
layer input only through ``r``), down to the input: one branch is a sequential sublayer,
several a parallel residual. Each branch is every node between ``r`` and ``b_i``. A layer
that is such a chain converts; its updates alternate between the two streams
(:func:`update_targets`, :func:`describe_pairing`). Nothing here depends on class names.
"""

from __future__ import annotations

import operator
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from ..frontend.ir import LayerGraph, TracedModel
from ..frontend.plan import LayerPlan, Plan, Sublayer
from ..frontend.registry import facts_for
from ..runtime.router import find_routers
from .classify import branch_kind, mixing_leaves, module_kind

_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def _scale_of(node: fx.Node) -> tuple[fx.Node, float] | None:
    """``node = y * c`` (or ``c * y``) with a Python constant ``c``: (y, c)."""
    is_mul = (node.op == "call_function" and node.target in _MUL) or (
        node.op == "call_method" and node.target in ("mul", "mul_"))
    if not is_mul or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, (int, float)):
        return a, float(b)
    if isinstance(b, fx.Node) and isinstance(a, (int, float)):
        return b, float(a)
    return None


def hidden_node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name)


def dataflow(gm: fx.GraphModule, source: fx.Node) -> tuple[nx.DiGraph, dict[fx.Node, fx.Node]]:
    """The subgraph of nodes reachable from ``source`` and their immediate dominators."""
    g = nx.DiGraph()
    g.add_node(source)
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    reach = nx.descendants(g, source) | {source}
    sub = g.subgraph(reach)
    idom = nx.immediate_dominators(sub, source)
    idom.pop(source, None)
    return sub, idom


def _dominates(idom: dict[fx.Node, fx.Node], a: fx.Node, b: fx.Node) -> bool:
    while b in idom:
        if b is a:
            return True
        b = idom[b]
    return b is a


def _branch_nodes(g: nx.DiGraph, r: fx.Node, b: fx.Node) -> list[fx.Node]:
    """Nodes that depend on ``r`` and feed ``b`` (``b`` included), in graph order."""
    between = (nx.descendants(g, r) & (nx.ancestors(g, b) | {b}))
    return sorted(between, key=lambda n: list(n.graph.nodes).index(n))


def _sum_terms(node: fx.Node, g: nx.DiGraph) -> tuple[list[Any], list[fx.Node]]:
    """The terms of the sum computed by ``node`` (an add), expanding operand additions
    used only by this sum, and the add nodes of the sum."""
    terms: list[Any] = []
    adds = [node]
    for a in node.args[:2]:
        if isinstance(a, fx.Node) and is_add(a) and len(a.users) == 1 and a in g:
            sub_terms, sub_adds = _sum_terms(a, g)
            terms += sub_terms
            adds += sub_adds
        else:
            terms.append(a)
    return terms, adds


Step = tuple[fx.Node, list[tuple[fx.Node, fx.Node]], list[fx.Node]]


def _chain(r: fx.Node, g: nx.DiGraph, idom: dict[fx.Node, fx.Node],
           memo: dict[fx.Node, Step | None]) -> list[fx.Node]:
    """The residual stream values from ``r`` back as far as it is a chain of sums."""
    out = [r]
    while True:
        step = _step(out[-1], g, idom, memo)
        if step is None:
            return out
        out.append(step[0])


def _step(v: fx.Node, g: nx.DiGraph, idom: dict[fx.Node, fx.Node],
          memo: dict[fx.Node, Step | None] | None = None) -> Step | None:
    """``v = r + b_1 + ... + b_k``, each ``b_i`` reading the layer input only through one
    value ``c_i`` of the residual stream: ``r`` itself (``r`` dominates ``b_i``), or an
    earlier value of the chain that leads to ``r`` with no later value in between (a
    shortcut that skips updates). Returns ``(r, [(c_i, b_i)], add nodes)``, else None."""
    memo = {} if memo is None else memo
    if v in memo:
        return memo[v]
    memo[v] = None  # a cycle cannot be a chain
    if not is_add(v):
        return None
    terms, adds = _sum_terms(v, g)
    dependent = [t for t in terms if isinstance(t, fx.Node) and t in g]
    order = list(v.graph.nodes)
    for r in sorted(dependent, key=order.index):
        others = [t for t in dependent if t is not r]
        if not others:
            continue
        branches: list[tuple[fx.Node, fx.Node]] = []
        chain: list[fx.Node] | None = None
        for t in others:
            if _dominates(idom, r, t):
                branches.append((r, t))
                continue
            chain = chain if chain is not None else _chain(r, g, idom, memo)
            k = next((k for k in range(1, len(chain)) if _dominates(idom, chain[k], t)), 0)
            # the branch reads that earlier value only: no later stream value feeds it
            if not k or nx.ancestors(g, t) & set(chain[:k]):
                break
            branches.append((chain[k], t))
        if len(branches) == len(others):
            memo[v] = (r, sorted(branches, key=lambda cb: order.index(cb[1])), adds)
            return memo[v]
    return None


def _updates_of(adds: list[fx.Node], g: nx.DiGraph, b: fx.Node) -> fx.Node:
    """The add node of a sum that takes ``b`` as an operand."""
    return next((a for a in adds if b in a.args[:2]), adds[0])


def analyze_layer(layer: LayerGraph, overrides: dict[str, str] | None = None,
                  training: bool | None = None, routers: set[int] | None = None) -> LayerPlan:
    """Find the residual updates of one layer and decide if it can be coupled.

    Walking back from the output, the residual stream is a chain of sums
    ``v = r + b_1 + ... + b_k`` whose branches ``b_i`` read the layer input only through
    ``r`` (several branches: a parallel residual, ``x + attn(n(x)) + moe(n(x))``), down to
    the input. A layer that is such a chain (one or more updates) converts; anything else
    on the stream (a scale, a norm, an activation) is refused, naming where it sits.
    """
    if getattr(layer, "handoff", ""):  # refused before tracing: its code may not trace
        return LayerPlan(layer.index, layer.qualname, [], convertible=False,
                         reason=f"state handed between layers: {layer.handoff}")
    gm = layer.trace(training)
    modules = dict(gm.named_modules())
    # which leaves mix tokens, probed on the layer's example call (eval graph)
    mixes = mixing_leaves(layer.trace(False), getattr(layer, "example", None))
    hidden = hidden_node(gm, layer.call.hidden_name)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    g, idom = dataflow(gm, hidden)
    result = out.args[0]
    if isinstance(result, (tuple, list)):
        result = result[0]
    order = list(gm.graph.nodes)
    trunk = [n for n in g.nodes if n is not hidden and _dominates(idom, n, out)]
    trunk_adds = {n for n in trunk if is_add(n)
                  and any(isinstance(a, fx.Node) and a in g and idom.get(n) is a
                          for a in n.args[:2])}
    steps: list[Step] = []
    memo: dict[fx.Node, Step | None] = {}
    v = result
    reason = ""
    while isinstance(v, fx.Node) and v is not hidden:
        step = _step(v, g, idom, memo) if v in g else None
        if step is None:
            break
        steps.append(step)
        v = step[0]
    steps.reverse()
    sublayers: list[Sublayer] = []
    for _, branches, adds in steps:
        for c, b in branches:
            sublayers.append(_sublayer(gm, modules, g, hidden, c, b, _updates_of(adds, g, b),
                                       overrides, routers, mixes))
    if v is not hidden:
        upstream = (isinstance(v, fx.Node) and v in g
                    and any(a in trunk_adds for a in nx.ancestors(g, v)))
        # a sum with a residual sum among its terms, whose other terms also read the input
        # some other way: a branch that reads the stream before and after an update
        two_points = (isinstance(v, fx.Node) and v in g and is_add(v) and any(
            isinstance(t, fx.Node) and _step(t, g, idom, memo) is not None
            for t in _sum_terms(v, g)[0]))
        if two_points or (steps and isinstance(v, fx.Node) and v in g and is_add(v)):
            terms = [t.name for t in _sum_terms(v, g)[0] if isinstance(t, fx.Node) and t in g]
            reason = (f"the sum {v} ({' + '.join(terms)}) is not a residual update: none of its "
                      "terms is the stream that the others read the input through (a branch "
                      "reads the residual stream at two points)")
        elif not steps and not upstream:
            odd = _odd_residual(gm, modules, g, hidden, idom, v, overrides, routers)
            if odd is not None:
                # list every such sum on the stream, for the report
                for n in sorted(trunk, key=order.index):
                    sub = _odd_residual(gm, modules, g, hidden, idom, n, overrides, routers)
                    if sub is not None:
                        sublayers.append(sub)
                reason = (f"the residual is taken after {odd.residual_node}, which is on the "
                          "residual stream itself: the layer is not of the form x + f(x)")
            else:
                reason = "no residual connection: the layer output is not of the form x + f(x)"
        elif not steps:
            reason = f"computation on the residual stream after the last branch ({result})"
        elif upstream:
            prev = max((a for a in trunk_adds if a in nx.ancestors(g, v)), key=order.index)
            reason = f"computation on the residual stream between the branches ({prev} -> {v})"
        else:
            reason = f"computation on the residual stream before the first branch ({v})"
        reason += ("; a layer converts when it is a sequence of residual updates "
                   "x <- x + f(x) on its input") if not reason.startswith("no residual") else ""
        stack = _residual_stack(layer)
        streams = getattr(layer, "streams", 1)
        if streams > 1:
            reason = (f"{reason.split('; a layer converts')[0]}; residual form hyper-connection "
                      f"(its hidden state holds {streams} residual streams side by side: "
                      f"{FORMS['hyper-connection']}), not x + f(x)")
        elif stack and reason.startswith("no residual"):
            reason = (f"{reason}; residual form hyper-connection at {stack} (it reads {stack}, "
                      f"a stack of residual states: {FORMS['hyper-connection']}), not x + f(x)")
        elif not two_points and not reason.startswith("no residual"):
            form = stream_form(gm, modules, g, idom, hidden, result, trunk)
            if form is not None:
                reason = (f"{reason.split('; a layer converts')[0]}; residual form "
                          f"{form[0]} at {form[1]} ({FORMS[form[0]]}), not x + f(x)")
                if form[0] in ("scaled", "gated", "affine", "hyper-connection"):
                    for sub in sublayers:  # the sums listed for the report
                        if sub.residual_form == "norm_residual":
                            sub.residual_form = form[0].replace("-", "_")
    auto = {n.removeprefix(layer.qualname + ".") for n in getattr(layer, "auto_leaves", ())}
    on_stream = [n.target for n in trunk if n.op == "call_module" and n.target in auto]
    if reason and on_stream:
        reason += (f" ({on_stream[0]} was kept whole because torch.fx cannot trace it, and it "
                   "sits on the residual stream; make its forward traceable, or pass "
                   "leaf_modules naming the modules inside it that are not)")
    plan = LayerPlan(layer.index, layer.qualname, sublayers, convertible=not reason,
                     reason=reason)
    if not reason:
        plan.pairing = describe_pairing(plan, 0)
    return plan


# the residual forms that are not x + f(x), as refusals name them
FORMS = {
    "scaled": "the stream itself is multiplied by a constant or a scalar: a*x + b*f(x)",
    "gated": "the stream is multiplied by a gate computed from the input: (1-g)*x + g*f(x)",
    "affine": "the stream is multiplied by or added to learned parameters: w*x + c + f(x)",
    "hyper-connection": "the streams are mixed by a learned matrix: H x + f(x)",
    "post-norm": "a norm is applied to the stream after the update: norm(x + f(x))",
    "norm-residual": "the residual is taken after a norm: a*norm(x) + b*f(norm(x))",
    "other": "an operation is applied to the stream itself: h(x) + f(x)",
}
_PASSIVE = {"getitem", "to", "contiguous", "view", "reshape", "float", "type_as", "clone",
            "detach", "squeeze", "unsqueeze", "flatten", "expand", "dropout", "type"}
_MATMUL = {"einsum", "matmul", "bmm", "mm", "linear", "tensordot", "__matmul__"}


def _op_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _form_of(node: fx.Node, g: nx.DiGraph, modules: dict[str, Any], hidden: fx.Node,
             stream: fx.Node) -> str | None:
    """The residual form ``node`` (an operation applied to the residual stream value
    ``stream``) gives the layer, or None for a passive op (view, cast)."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        if _norm_kind(modules, node):
            return "norm-residual" if stream is hidden else "post-norm"
        if isinstance(mod, torch.nn.Linear):
            return "hyper-connection"
        return "other"
    name = _op_name(node).lstrip("_").rstrip("_")
    if name in _PASSIVE or node.op not in ("call_function", "call_method"):
        return None
    others = [a for a in [*node.args, *node.kwargs.values()] if a is not stream]
    if name in _MATMUL:
        return "hyper-connection"
    if name in ("mul", "imul", "truediv", "div", "add", "iadd", "sub", "rsub"):
        tensors = [a for a in others if isinstance(a, fx.Node)]
        if not tensors:
            return "scaled" if name not in ("add", "iadd", "sub", "rsub") else "affine"
        if any(a in g for a in tensors):
            return "gated"  # the factor depends on the layer input
        params = [a for a in tensors if a.op == "get_attr"]
        if params and name in ("mul", "imul", "truediv", "div"):
            try:
                value = node.graph.owning_module.get_parameter(params[0].target)
            except AttributeError:
                try:
                    value = node.graph.owning_module.get_buffer(params[0].target)
                except AttributeError:
                    value = None
            if value is not None and value.numel() == 1:
                return "scaled"
        return "affine"
    return "other"


def _residual_stack(layer: LayerGraph) -> str | None:
    """The name of a layer input that stacks several residual states (batch, seq, n,
    hidden): hyper-connections and depth-attention residuals read one."""
    example = getattr(layer, "example", None) or {}
    hidden = example.get(layer.call.hidden_name)
    if not isinstance(hidden, torch.Tensor):
        return None
    for name, value in example.items():
        if (name != layer.call.hidden_name and isinstance(value, torch.Tensor)
                and value.dim() == hidden.dim() + 1 and value.shape[-1] == hidden.shape[-1]
                and value.shape[:2] == hidden.shape[:2] and value.is_floating_point()):
            return name
    return None


def stream_form(gm: fx.GraphModule, modules: dict[str, Any], g: nx.DiGraph,
                idom: dict[fx.Node, fx.Node], hidden: fx.Node, result: Any,
                trunk: list[fx.Node]) -> tuple[str, str] | None:
    """The residual form of a layer that is not a chain of updates x + f(x), with the node
    where it shows: the first operation on the residual stream itself (the trunk) that is
    not an addition, or else what the last sum does to its residual side."""
    order = list(gm.graph.nodes)
    if not any(is_add(n) for n in trunk):
        return _side_form(gm, modules, g, hidden, result)
    for node in sorted(trunk, key=order.index):
        if is_add(node):
            continue
        stream = next((a for a in node.all_input_nodes if a in g
                       and (a is hidden or a in trunk)), None)
        form = _form_of(node, g, modules, hidden, stream) if stream is not None else None
        if form is not None:
            return form, node.name
    return _side_form(gm, modules, g, hidden, result)


def _side_form(gm: fx.GraphModule, modules: dict[str, Any], g: nx.DiGraph,
               hidden: fx.Node, result: Any) -> tuple[str, str] | None:
    """What the layer's last sum does to its residual side (the term nearest the input)."""
    # no trunk op: the sum's residual side is some function of the input
    v = result
    if not (isinstance(v, fx.Node) and v in g and is_add(v)):
        return None
    terms = [t for t in _sum_terms(v, g)[0] if isinstance(t, fx.Node) and t in g]
    if len(terms) < 2:
        return None
    def length(t: fx.Node) -> int:
        return len(_branch_nodes(g, hidden, t))

    side = min(terms, key=length)
    chain = []  # the stream's way from the input to the residual side, last op first
    node = side
    while node is not hidden and len(chain) < 64:
        chain.append(node)
        ins = [a for a in node.all_input_nodes if a in g]
        if not ins:
            break
        node = hidden if hidden in ins else min(ins, key=length)
    normed = False
    for node in reversed(chain):
        prev = [a for a in node.all_input_nodes if a is hidden or a in chain]
        form = _form_of(node, g, modules, hidden, prev[0] if prev else None)
        if form in ("post-norm", "norm-residual"):
            normed = True
            continue
        if form is not None:
            return ("norm-residual" if normed else form), node.name
    return ("norm-residual", chain[-1].name) if normed else None


def update_targets(plan: LayerPlan, start: int = 0) -> list[int]:
    """The stream each residual update of a layer writes (0: X1, 1: X2), alternating from
    ``start``: the first reads X2 and updates X1, the next reads X1 and updates X2, ..."""
    return [(start + j) % 2 for j in range(len(plan.sublayers))]


def describe_pairing(plan: LayerPlan, start: int = 0) -> str:
    """How a layer's residual updates are split across the two streams, in words."""
    targets = update_targets(plan, start)
    parts = [f"{s.kind} -> X{t + 1} (reads X{2 - t})" for s, t in zip(plan.sublayers, targets)]
    text = ", ".join(parts)
    groups: dict[str, list[int]] = {}
    for j, s in enumerate(plan.sublayers):
        groups.setdefault(s.residual_node, []).append(j)
    kinds = plan.kinds
    for members in (m for m in groups.values() if len(m) > 1):
        run = [j for k, j in enumerate(members) if k == 0 or j == members[k - 1] + 1]
        if len(run) > 1:
            text += (f"; parallel residual ({' and '.join(kinds[j] for j in run)} read the "
                     "same input)")
        for k, j in enumerate(members[1:], 1):
            if j != members[k - 1] + 1:
                skipped = " and ".join(kinds[i] for i in range(members[0], j))
                text += (f"; a shortcut ({kinds[j]} reads the stream from before the "
                         f"{skipped} updates)")
        text += (": coupled as updates in sequence, each reading the stream the one before "
                 "updated (the function changes slightly, as every coupling changes it)")
    if len(targets) % 2:
        text += f"; odd number of updates: the next layer starts on X{2 - targets[-1]}"
    return text


def _norm_kind(modules: dict[str, Any], node: Any) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and module_kind(modules[node.target], node, node) == "norm")


def _sublayer(gm: fx.GraphModule, modules: dict[str, Any], g: nx.DiGraph, hidden: fx.Node,
              r: fx.Node, b: fx.Node, add: fx.Node,
              overrides: dict[str, str] | None, routers: set[int] | None = None,
              mixes: dict[str, bool] | None = None) -> Sublayer:
    nodes = _branch_nodes(g, r, b)
    scale = None
    core = b
    scaled = _scale_of(b)
    if scaled is not None:
        core, scale = scaled
    norm_before = next((n.target for n in nodes if _norm_kind(modules, n)
                        and r in n.all_input_nodes), None)
    # post-norm: the branch output (after dtype casts, dropout) comes straight from a norm
    probe = core
    while (isinstance(probe, fx.Node) and probe.op in ("call_method", "call_function")
           and probe.all_input_nodes and not _norm_kind(modules, probe)):
        probe = probe.all_input_nodes[0]
        if probe is r:
            break
    norm_after = probe.target if _norm_kind(modules, probe) and probe is not norm_before else None
    if norm_after == norm_before:
        norm_after = None
    mods, kinds = [], {}
    for n in nodes:
        if n.op == "call_module":
            mods.append(n.target)
            kinds[n.target] = module_kind(modules[n.target], n, hidden, overrides, routers,
                                          (mixes or {}).get(n.target))
    kind = branch_kind([k for k in kinds.values() if k != "norm"])
    if scale is not None and scale != 1.0:
        form = "scaled"
    elif norm_before and norm_after:
        form = "sandwich"
    elif norm_before:
        form = "pre_norm"
    elif norm_after:
        form = "post_norm"
    else:
        form = "plain"
    return Sublayer(kind=kind, residual_form=form, scale=scale, norm_before=norm_before,
                    norm_after=norm_after, modules=mods, module_kinds=kinds,
                    nodes=[n.name for n in nodes], residual_node=r.name, add_node=add.name)


def _odd_residual(gm: fx.GraphModule, modules: dict[str, Any], g: nx.DiGraph,
                  hidden: fx.Node, idom: dict[fx.Node, fx.Node], v: Any,
                  overrides: dict[str, str] | None, routers: set[int] | None
                  ) -> Sublayer | None:
    """``out = a * d + c * f(d)`` (minimax): a sum whose residual side is not the stream
    itself but a function of it (scaled, normed); described for the report, refused."""
    if not (isinstance(v, fx.Node) and v in g and is_add(v) and v in idom):
        return None
    d = idom[v]
    ops = [a for a in v.args[:2] if isinstance(a, fx.Node) and a in g]
    if len(ops) != 2 or d in ops:
        return None
    sides = sorted(ops, key=lambda n: len(_branch_nodes(g, d, n)))
    sub = _sublayer(gm, modules, g, hidden, d, sides[1], v, overrides, routers)
    sub.residual_form = "norm_residual"
    return sub


def router_ids(model: Any) -> set[int]:
    """Ids of the modules whose outputs the model records as router logits."""
    return {id(m) for m in find_routers(model)[0]}


def analyze(traced: TracedModel, training: bool | None = None) -> Plan:
    """Analyse every decoder layer of ``traced`` into a :class:`Plan`."""
    config = traced.config
    model_type = getattr(config, "model_type", None)
    overrides = facts_for(model_type).kind_overrides
    routers = router_ids(traced.model)
    layers = [analyze_layer(lg, overrides, training, routers) for lg in traced.layers]
    start = 0  # updates alternate streams across layer boundaries too
    for lp in layers:
        if lp.convertible:
            lp.pairing = describe_pairing(lp, start)
            start = (start + len(lp.sublayers)) % 2
    params = sum(p.numel() for p in traced.model.parameters())
    dtype = next(traced.model.parameters()).dtype
    experts = None
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        experts = experts or getattr(config, key, None)
    if experts is None and config is not None and hasattr(config, "ffn_config"):
        experts = getattr(config.ffn_config, "moe_num_experts", None)
    hidden = None
    if config is not None:
        hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    info = {"model_type": model_type, "class": type(traced.model).__name__,
            "hidden_size": hidden, "num_layers": len(layers), "num_experts": experts,
            "parameters": params, "dtype": str(dtype).replace("torch.", "")}
    return Plan(layers, info)
