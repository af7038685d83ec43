"""Run the token-wise modules of a coupling graph a chunk of tokens at a time.

The analysis classifies each module a residual branch calls (``plan.sublayers[i]
.module_kinds``); the MoE blocks and dense MLPs map each token on its own. This pass points
their ``call_module`` nodes at a :class:`~revffn_fx.runtime.chunking.TokenChunked` wrapper
of the same module (same parameters), which runs long inputs in chunks of
``RuntimeOptions.token_chunk`` tokens and checkpoints each chunk inside the generated
backward's recompute. The wrapper probes the module once before it chunks, so a module the
classification got wrong is still called whole.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..runtime.chunking import TokenChunked
from .graph_copy import fetch

#: module kinds (passes/classify.py) whose modules map each token on its own
TOKENWISE_KINDS = ("moe", "mlp")


def tokenwise_targets(plan: Any) -> set[str]:
    """The call_module targets of a layer plan that the analysis classified token-wise."""
    return {t for sub in plan.sublayers for t, k in sub.module_kinds.items()
            if k in TOKENWISE_KINDS}


def chunk_tokens(gm: fx.GraphModule, targets: set[str], options: Any) -> int:
    """Wrap the calls of ``targets`` in ``gm`` (in place) that pass the module exactly one
    tensor and nothing else; returns how many calls were wrapped."""
    wrapped: dict[str, str] = {}
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in targets:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue  # only module(hidden): other arguments may mix tokens
        if node.target not in wrapped:
            name = "revffn_chunked_" + node.target.replace(".", "_")
            gm.add_submodule(name, TokenChunked(fetch(gm, node.target), options))
            wrapped[node.target] = name
        node.target = wrapped[node.target]
        node.meta["revffn_chunked"] = True
        count += 1
    if count:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return count
