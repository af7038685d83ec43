"""The wrappers a RevModel may sit under, as its compiled stacks see them.

:func:`check_wrappers` runs before a graph is compiled: it refuses FSDP1 and parameters a
wrapper flattened or removed (a model traced in that state would train the original
layers without saying so), and lets the stacks find FSDP2 units applied by hand
(:func:`adopt_units`: ``fully_shard`` on each decoder layer then on the RevModel, as the
FSDP2 recipe and accelerate's auto-wrap do). :func:`revffn_fx.distributed.shard` applies
the units itself.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from torch import nn

from .errors import RevFFNError
from .runtime.stack import RevStack


def adopt_units(rev: Any) -> None:
    """Register FSDP2 units applied to ``rev`` by others (``fully_shard`` on each decoder
    layer then on the RevModel, as the FSDP2 recipe and accelerate's auto-wrap do), so the
    stacks drive those of converted layers as :func:`shard` would. A unit on a module the
    reversible branches call directly (the attention or MoE block itself) is refused: its
    own hooks would reshard it in the middle of the stack's recompute."""
    from torch.distributed.fsdp import FSDPModule

    called: set[nn.Module] = set()
    stacks = [m for gm in rev._graphs.values() for m in gm.modules() if isinstance(m, RevStack)]
    for stack in stacks:  # the graphs compiled so far (this runs from inside a forward)
        for layer in stack.layers:
            for u in layer.updates:
                for node in u.branch.graph.nodes:
                    if node.op == "call_module":
                        called.add(u.branch.get_submodule(node.target))
    if not isinstance(rev, FSDPModule):
        raise RevFFNError(
            "fully_shard was applied to modules inside the RevModel but not to the RevModel "
            "itself: call fully_shard(rev) after the decoder layers (the root unit holds the "
            "embeddings, the final norm and the LM head, and runs FSDP2's per-step setup), "
            "or shard with revffn_fx.distributed.shard(rev)")
    units: dict[nn.Module, Any] = dict(rev.options.shard_units)
    for m in rev.modules():  # pre-order: an inner unit overrides its outer one
        if isinstance(m, FSDPModule) and m is not rev:
            if m in called:
                raise RevFFNError(
                    f"fully_shard was applied to {type(m).__name__}, a module the "
                    "reversible stacks call directly; shard whole decoder layers (or use "
                    "revffn_fx.distributed.shard(rev)), so the stack can gather a layer's "
                    "parameters for its forward and again for its recompute")
            for sub in m.modules():
                units[sub] = m
    # only the units the branches reach matter to the stacks; others (embeddings, layers
    # left out, the head) are called as modules and run their own hooks
    rev.options.shard_units = units


def check_wrappers(rev: Any) -> None:
    """Raise if ``rev`` sits under a wrapper that would silently train it wrongly.

    FSDP1 (``FullyShardedDataParallel``) flattens parameters into a FlatParameter: the
    modules the stacks call then hold no parameters (or views FSDP1 swaps), and a model
    traced in that state would train the original layers without saying so.
    """
    if "torch.distributed.fsdp" not in sys.modules:
        return  # no FSDP in this process
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    for m in rev.modules():
        if isinstance(m, FSDP1):
            raise RevFFNError("a RevModel containing FSDP1 (FullyShardedDataParallel) "
                              "modules is not supported: shard with "
                              "revffn_fx.distributed.shard(rev) (FSDP2)")
    if rev.options.find_units is None:
        ref = weakref.ref(rev)
        rev.options.find_units = lambda: adopt_units(ref())  # type: ignore[arg-type]
    first = next(rev.model.parameters(), None)
    if first is None or getattr(first, "_fsdp_flattened", False):
        raise RevFFNError("the RevModel's parameters were flattened or removed by a wrapper "
                          "(FSDP1?): this would train the model without its reversible "
                          "stacks; shard with revffn_fx.distributed.shard(rev) (FSDP2) or "
                          "use DDP")
