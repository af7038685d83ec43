"""A RevModel on several devices: FSDP2 per-layer sharding, and checks against wrappers
that would train it wrongly.

``shard(rev)`` applies ``torch.distributed.fsdp.fully_shard`` to every converted decoder
layer (its attention, MoE and norm modules plus its revffn adapters, as one unit), to every
layer left out of the stacks, and to the RevModel itself (the root: embeddings, final norm,
LM head). The reversible stacks call the branch modules directly, so FSDP2's forward hooks
on a converted layer never fire; instead the stack drives each unit itself:

- forward: all-gather a layer's parameters, run its couplings, reshard
  (``reshard_after_forward`` as given);
- generated backward: all-gather the layer again for its reconstruction and recompute,
  accumulate its gradients into the unsharded parameters, then FSDP2's post-backward
  (reshard, reduce-scatter into the sharded ``.grad``) as soon as that layer is done.

DDP needs nothing from revffn-fx: the stacks return ordinary parameter gradients. FSDP1
(``FullyShardedDataParallel``) is refused with a clear error.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import RevFFNError
from .model import RevModel

__all__ = ["shard", "prepare", "is_sharded", "local_numel", "check_wrappers"]


def _fully_shard() -> Any:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # torch built without distributed
        raise RevFFNError(f"FSDP2 is not available in this torch build ({e})") from None
    return fully_shard


def shard(rev: RevModel, mesh: Any = None, *, reshard_after_forward: bool | int = True,
          layers_left_out: bool = True, prefetch: bool = True,
          **fsdp_kwargs: Any) -> RevModel:
    """Shard ``rev`` with FSDP2, one unit per decoder layer, plus the root.

    ``mesh``: a 1-D DeviceMesh (default: FSDP2's, over the whole world). Other keyword
    arguments go to every ``fully_shard`` call: ``mp_policy=MixedPrecisionPolicy(
    param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``, ``offload_policy=
    CPUOffloadPolicy()``, ... Build the optimizer (or ``fuse_optimizer``) after this, on
    ``rev.parameters()`` (now sharded DTensors). ``prefetch``: issue the next layer's
    all-gather before computing this one (overlap; two layers gathered at a time). Returns
    ``rev`` (sharded in place).
    """
    if not isinstance(rev, RevModel):
        raise RevFFNError(f"shard() takes a RevModel, not {type(rev).__name__}")
    if is_sharded(rev):
        raise RevFFNError("this RevModel is already sharded")
    fully_shard = _fully_shard()
    prepare(rev)
    kw = dict(fsdp_kwargs, reshard_after_forward=reshard_after_forward)
    if mesh is not None:
        kw["mesh"] = mesh
    units: dict[nn.Module, Any] = {}
    for i in rev.converted:
        layer = rev.traced.layers[i].module
        group: list[nn.Module] = [layer]
        if str(i) in rev.adapters:
            group.append(rev.adapters[str(i)])
        if not any(p.numel() for m in group for p in m.parameters()):
            continue
        fully_shard(group if len(group) > 1 else layer, **kw)
        for m in group:
            for sub in m.modules():
                units[sub] = layer
    if layers_left_out:  # ordinary FSDP2 units: the graph calls these layers as modules
        for i, lg in enumerate(rev.traced.layers):
            if i not in rev.converted and any(True for _ in lg.module.parameters()):
                fully_shard(lg.module, **kw)
    # the root keeps its parameters gathered from forward to backward, as FSDP2's root does
    fully_shard(rev, **dict(kw, reshard_after_forward=False))
    rev.options.shard_units = units
    rev.options.prefetch = prefetch
    return rev


def prepare(rev: RevModel) -> RevModel:
    """Compile the couplings of both modes now, before any ``fully_shard``.

    Compiling traces into each converted decoder layer; on a layer that is already an FSDP2
    unit that would run FSDP2's forward hooks on trace proxies (with a mixed-precision
    policy they fail; without one they gather parameters during tracing). :func:`shard`
    calls this; call it yourself before applying ``fully_shard`` by hand or through
    accelerate."""
    from .errors import ConversionError

    rev.specs(True)
    try:
        rev.specs(False)
    except ConversionError:  # eval mode is compiled (and refused) when it is first used
        pass
    return rev


def adopt_units(rev: RevModel) -> None:
    """Register FSDP2 units applied to ``rev`` by others (``fully_shard`` on each decoder
    layer then on the RevModel, as the FSDP2 recipe and accelerate's auto-wrap do), so the
    stacks drive those of converted layers as :func:`shard` would. A unit on a module the
    reversible branches call directly (the attention or MoE block itself) is refused: its
    own hooks would reshard it in the middle of the stack's recompute."""
    from torch.distributed.fsdp import FSDPModule

    from .runtime.stack import RevStack

    called: set[nn.Module] = set()
    stacks = [m for gm in rev._graphs.values() for m in gm.modules() if isinstance(m, RevStack)]
    for stack in stacks:  # the graphs compiled so far (this runs from inside a forward)
        for layer in stack.layers:
            for u in layer.updates:
                for node in u.branch.graph.nodes:
                    if node.op == "call_module":
                        called.add(u.branch.get_submodule(node.target))
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


def is_sharded(rev: RevModel) -> bool:
    """Whether :func:`shard` was applied."""
    return bool(rev.options.shard_units)


def local_numel(params: Sequence[torch.Tensor] | Any) -> int:
    """Elements this rank stores of ``params`` (a DTensor's local shard, else all)."""
    total = 0
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel()
    return total


def check_wrappers(rev: RevModel) -> None:
    """Raise if ``rev`` sits under a wrapper that would silently train it wrongly.

    FSDP1 (``FullyShardedDataParallel``) flattens parameters into a FlatParameter: the
    modules the stacks call then hold no parameters (or views FSDP1 swaps), and a model
    traced in that state would train the original layers without saying so.
    """
    import sys

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
