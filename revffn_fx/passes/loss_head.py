"""Loss-head pass: replace lm_head -> logit transform -> cross-entropy by a chunked head.

It finds, in the model-level graph, the call of the output embedding (lm_head), the
cross-entropy whose logits come from it, and the nodes between them (logit scaling or
soft-capping, the fp32 upcast, the flattening view). Those nodes become a small GraphModule
applied per chunk; the label path (shift, flatten) is kept as it is. The logits output of
the graph becomes None: that is the memory saved.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..runtime.loss import ChunkedLossHead

# Ops that act on each token's logits alone (so they can run chunk by chunk): casts,
# flattening to (-1, vocab), scaling and soft-capping. Anything else (e.g. slicing the
# token dimension) keeps the original head.
_TOKEN_LOCAL_METHODS = {"float", "double", "half", "bfloat16", "to", "type", "view", "reshape",
                        "contiguous", "tanh", "mul", "div", "add", "sub", "clamp", "__truediv__"}
_TOKEN_LOCAL_FUNCTIONS = {operator.mul, operator.truediv, operator.add, operator.sub,
                          torch.tanh, torch.mul, torch.div, torch.clamp, getattr}


def _token_local(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _TOKEN_LOCAL_METHODS
    if n.op != "call_function":
        return False
    if n.target is operator.getitem:  # only indexing a shape (an int), never a tensor
        src = n.args[0]
        return isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr
    return n.target in _TOKEN_LOCAL_FUNCTIONS


@dataclass
class HeadMatch:
    lm_head: fx.Node
    ce: fx.Node
    logit_nodes: list[fx.Node]
    labels: fx.Node
    ignore_index: int


def _closure(node: fx.Node, up: bool) -> set[fx.Node]:
    """Ancestors (``up``, node included) or descendants (node excluded) of ``node``."""
    seen, todo = ({node}, [node]) if up else (set(), [node])
    while todo:
        n = todo.pop()
        for m in (n.all_input_nodes if up else n.users):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def find_head(gm: fx.GraphModule, lm_head_target: str) -> HeadMatch | str:
    """The head pattern, or a one-line reason why it was not found."""
    lm = next((n for n in gm.graph.nodes
               if n.op == "call_module" and n.target == lm_head_target), None)
    if lm is None:
        return f"no call of the output embedding {lm_head_target!r} in the graph"
    mod = gm.get_submodule(lm_head_target)
    if getattr(mod, "base_layer", None) is not None:  # PEFT's LoRA on the head: x W^T + ...
        return (f"output embedding {type(mod).__name__} wraps its weight (a PEFT layer): "
                "the chunked head, which reads the weight, would skip it")
    if not isinstance(getattr(mod, "weight", None), nn.Parameter):
        return f"output embedding {type(mod).__name__} has no weight parameter"
    below = _closure(lm, up=False)
    ces = [n for n in below if n.op == "call_function" and n.target is F.cross_entropy]
    if len(ces) != 1:
        return f"expected one cross-entropy fed by {lm_head_target}, found {len(ces)}"
    ce = ces[0]
    kw = dict(ce.kwargs)
    source, target = ce.args[:2] if len(ce.args) >= 2 else (ce.args[0], kw.get("target"))
    if kw.get("weight") is not None or kw.get("label_smoothing", 0.0) not in (0, 0.0):
        return "cross-entropy with class weights or label smoothing is not supported"
    if kw.get("reduction", "mean") != "mean":
        return f"cross-entropy reduction {kw.get('reduction')!r} is not supported"
    between = sorted(below & _closure(source, up=True), key=lambda n: list(gm.graph.nodes).index(n))
    for n in between:
        if any(i is not lm and i not in between for i in n.all_input_nodes):
            return f"the logit transform node {n.name} reads values other than the logits"
        if not _token_local(n):
            return f"the logit transform node {n.name} is not per-token: cannot be chunked"
    out = next(n for n in gm.graph.nodes if n.op == "output")
    result = out.args[0]
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and result[1] is ce):
        return "the graph's loss output is not the cross-entropy itself"
    return HeadMatch(lm, ce, between, target, int(kw.get("ignore_index", -100)))


def _logit_fn(gm: fx.GraphModule, match: HeadMatch) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {match.lm_head: graph.placeholder("logits")}
    for n in match.logit_nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[match.logit_nodes[-1]] if match.logit_nodes else env[match.lm_head])
    return fx.GraphModule(gm, graph, class_name="LogitTransform")


_RESHAPES = {"view", "reshape", "contiguous"}


def cast_only(nodes: list[fx.Node]) -> bool | None:
    """None when the logit transform does more than reshape and cast the logits; else
    whether it casts them to fp32 (``logits.float()``, the upcast of transformers' loss)."""
    to_fp32 = False
    for n in nodes:
        if n.op == "call_method" and n.target in _RESHAPES:
            continue
        if n.op == "call_method" and n.target == "float":
            to_fp32 = True
            continue
        if n.op == "call_method" and n.target == "to" and not n.kwargs \
                and list(n.args[1:]) == [torch.float32]:
            to_fp32 = True
            continue
        if n.op == "call_function" and (n.target is getattr or n.target is operator.getitem):
            continue  # reading the shape for a view
        return None
    return to_fp32


def chunk_loss_head(gm: fx.GraphModule, lm_head_target: str, options: Any,
                    chunk: int | None = None) -> tuple[fx.GraphModule, str]:
    """Rewrite ``gm`` in place; returns (gm, "" or the reason it was left unchanged).
    ``chunk``: tokens per chunk; None sizes chunks by bytes (see ``runtime.loss``)."""
    match = find_head(gm, lm_head_target)
    if isinstance(match, str):
        return gm, match
    head = ChunkedLossHead(gm.get_submodule(lm_head_target), _logit_fn(gm, match), options,
                           match.ignore_index, chunk, cast_only(match.logit_nodes))
    gm.add_submodule("revffn_loss_head", head)
    with gm.graph.inserting_before(match.ce):
        new = gm.graph.call_module("revffn_loss_head", (match.lm_head.args[0], match.labels))
    new.meta["revffn"] = "loss_head"
    new.meta["from_node"] = [match.lm_head.name, match.ce.name]
    match.ce.replace_all_uses_with(new)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((None, new),)
    # the label path asks the logits for their device: ask the hidden states instead
    hidden = match.lm_head.args[0]
    for n in [match.lm_head, *match.logit_nodes]:
        for user in list(n.users):
            if user.op == "call_function" and user.target is getattr and user.args[1] == "device":
                user.args = (hidden, "device")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm, ""
