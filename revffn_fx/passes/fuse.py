"""Fusion pass: every maximal run of consecutive reversible layers in the model graph
becomes one reversible-stack node, so one autograd Function spans the whole run and only
its final streams are kept for backward.

Layers chain when each one's only user is the next one's hidden-state input and they all
receive the same context values (mask, positions).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..runtime.stack import RevLayer, RevStack, RuntimeOptions


def _hidden(node: fx.Node) -> Any:
    return node.args[0] if node.args else next(iter(node.kwargs.values()))


def _ctx(node: fx.Node, inputs: list[str]) -> dict[str, Any]:
    return {k: node.kwargs[k] for k in inputs if k in node.kwargs}


def find_runs(gm: fx.GraphModule, layers: dict[str, tuple[RevLayer, list[str]]]
              ) -> list[list[fx.Node]]:
    """Maximal runs of chained layer nodes whose targets are in ``layers``."""
    runs: list[list[fx.Node]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in layers:
            continue
        inputs = layers[node.target][1]
        if runs:
            prev = runs[-1][-1]
            if (_hidden(node) is prev and len(prev.users) == 1
                    and _ctx(node, inputs) == _ctx(prev, inputs)):
                runs[-1].append(node)
                continue
        runs.append([node])
    return runs


def fuse_stacks(gm: fx.GraphModule, layers: dict[str, tuple[RevLayer, list[str]]],
                split: str, options: RuntimeOptions, prefix: str = "revffn_stack"
                ) -> tuple[fx.GraphModule, list[RevStack]]:
    """Replace runs of layer nodes by stack nodes; ``layers`` maps a layer node's target
    to (its RevLayer, the names of its context inputs). Modifies ``gm`` in place."""
    stacks: list[RevStack] = []
    for k, run in enumerate(find_runs(gm, layers)):
        first, last = run[0], run[-1]
        stack = RevStack([layers[n.target][0] for n in run], split, options)
        name = f"{prefix}_{k}"
        gm.add_submodule(name, stack)
        with gm.graph.inserting_before(first):
            new = gm.graph.call_module(name, (_hidden(first),),
                                       _ctx(first, layers[first.target][1]))
        new.meta["revffn"] = "stack"
        new.meta["from_node"] = [n.name for n in run]
        last.replace_all_uses_with(new)
        for n in reversed(run):
            gm.graph.erase_node(n)
        stacks.append(stack)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm, stacks
