"""Fusion pass: every maximal run of consecutive reversible layers in the model graph
becomes one reversible-stack node, so one autograd Function spans the whole run and only
its final streams are kept for backward.

Layers chain when each one's only user is the next one's hidden-state input and they all
receive the same context values (mask, positions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx

from ..runtime.layers import RevLayer, RuntimeOptions
from ..runtime.stack import RevStack

Binder = Callable[[fx.Node], tuple[Any, dict[str, Any]]]


def _ctx(bind: Binder, node: fx.Node, inputs: list[str]) -> dict[str, Any]:
    values = bind(node)[1]
    return {k: values[k] for k in inputs if k in values}


def find_runs(gm: fx.GraphModule, layers: dict[str, tuple[RevLayer, list[str]]],
              bind: Binder) -> list[list[fx.Node]]:
    """Maximal runs of chained layer nodes whose targets are in ``layers``."""
    runs: list[list[fx.Node]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in layers:
            continue
        inputs = layers[node.target][1]
        if runs:
            prev = runs[-1][-1]
            if (bind(node)[0] is prev and len(prev.users) == 1
                    and _ctx(bind, node, inputs) == _ctx(bind, prev, inputs)):
                runs[-1].append(node)
                continue
        runs.append([node])
    return runs


def fuse_stacks(gm: fx.GraphModule, layers: dict[str, tuple[RevLayer, list[str]]],
                bind: Binder, split: str, options: RuntimeOptions,
                prefix: str = "revffn_stack") -> tuple[fx.GraphModule, list[RevStack]]:
    """Replace runs of layer nodes by stack nodes. ``layers`` maps a layer node's target
    to (its RevLayer, the names of its context inputs); ``bind(node)`` gives a layer
    node's (hidden-state argument, arguments by name). Modifies ``gm`` in place."""
    stacks: list[RevStack] = []
    for k, run in enumerate(find_runs(gm, layers, bind)):
        first, last = run[0], run[-1]
        stack = RevStack([layers[n.target][0] for n in run], split, options)
        name = f"{prefix}_{k}"
        gm.add_submodule(name, stack)
        with gm.graph.inserting_before(first):
            new = gm.graph.call_module(name, (bind(first)[0],),
                                       _ctx(bind, first, layers[first.target][1]))
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
