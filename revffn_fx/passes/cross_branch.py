"""Cross-branch attention: queries from one stream, keys and values from another.

The paper's RevFFN block updates X1 with ``Attn(Q from X1, K/V from X2)``. A pretrained
attention module takes one hidden input, so :class:`CrossAttention` rebuilds it as
``(query, *same args) -> same outputs`` generically, from its traced computation:

1. **Trace** (:mod:`.cross_attention`): ``make_fx(pre_dispatch=True)`` records the module
   as an aten graph, one per (shapes, dtypes, constant arguments, mode), cached.
   Data-dependent ops (``.item()``, ``nonzero``) would bake one input's values in: such
   attentions are refused.
2. **Split by data flow** (:mod:`.attention_split`): the query path is every
   hidden-dependent ancestor of a query operand of the score computations, the key/value
   path every hidden-dependent ancestor of a key or value operand.
3. **Rebuild** (:mod:`.attention_split`): query-path nodes are copied reading ``query``,
   key/value-path nodes reading the hidden input.

``cross(x, x)`` equals ``attention(x)``; :meth:`CrossAttention.check` verifies that on an
example call before a layer is converted (else the layer keeps the closed form). This
module is the pass: :func:`attention_calls` takes the example calls at transform time,
:func:`cross_attentions` builds the cross-attention of every layer that can have one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .attention_split import CrossBranchError
from .cross_attention import CrossAttention


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
