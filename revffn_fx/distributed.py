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

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConversionError, RevFFNError
from .model import RevModel
from .sharded_save import SAVE_SYNC_TIMEOUT, has_dtensors, save_pretrained
from .wrapper_checks import adopt_units, check_wrappers

# check_wrappers, adopt_units (revffn_fx.wrapper_checks) and the sharded save_pretrained,
# has_dtensors (revffn_fx.sharded_save) run below RevModel; they are part of this API too
__all__ = ["shard", "prepare", "is_sharded", "local_numel", "check_wrappers", "adopt_units",
           "save_pretrained", "has_dtensors", "SAVE_SYNC_TIMEOUT"]


def _fully_shard() -> Any:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # torch built without distributed
        raise RevFFNError(f"FSDP2 is not available in this torch build ({e})") from None
    return fully_shard


def shard(rev: RevModel, mesh: Any = None, *, reshard_after_forward: bool | int = True,
          layers_left_out: bool = True, prefetch: bool = True, mixed_dtypes: str = "error",
          **fsdp_kwargs: Any) -> RevModel:
    """Shard ``rev`` with FSDP2, one unit per decoder layer, plus the root.

    ``mesh``: a 1-D DeviceMesh (default: FSDP2's, over the whole world). Other keyword
    arguments go to every ``fully_shard`` call: ``mp_policy=MixedPrecisionPolicy(
    param_dtype=torch.bfloat16, reduce_dtype=torch.float32)``, ``offload_policy=
    CPUOffloadPolicy()``, ... Build the optimizer (or ``fuse_optimizer``) after this, on
    ``rev.parameters()`` (now sharded DTensors). ``prefetch``: issue the next layer's
    all-gather before computing this one (overlap; two layers gathered at a time).
    ``mixed_dtypes``: FSDP2 needs one dtype for the trainable parameters of a unit; a unit
    mixing them (DeepSeek-V3 keeps its router's weight in fp32 in a bf16 model) is refused
    with the parameters named (``"error"``), or ``"cast"`` casts them to the dtype most of
    the unit's parameters have (with a warning naming them). Returns ``rev`` (sharded in
    place).
    """
    if mixed_dtypes not in ("error", "cast"):
        raise RevFFNError(f"mixed_dtypes must be 'error' or 'cast', not {mixed_dtypes!r}")
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
        uniform_dtype([p for m in group for p in m.named_parameters()],
                      f"layer {i} ({rev.traced.layers[i].qualname})", mixed_dtypes)
        fully_shard(group if len(group) > 1 else layer, **kw)
        for m in group:
            for sub in m.modules():
                units[sub] = layer
    if layers_left_out:  # ordinary FSDP2 units: the graph calls these layers as modules
        for i, lg in enumerate(rev.traced.layers):
            if i not in rev.converted and any(True for _ in lg.module.parameters()):
                uniform_dtype(list(lg.module.named_parameters()),
                              f"layer {i} ({lg.qualname})", mixed_dtypes)
                fully_shard(lg.module, **kw)
    # the root keeps its parameters gathered from forward to backward, as FSDP2's root does
    inner = {id(p) for m in rev.modules() if m is not rev and _is_unit(m)
             for p in m.parameters()}
    uniform_dtype([(n, p) for n, p in rev.named_parameters() if id(p) not in inner],
                  "the root (embeddings, final norm, LM head)", mixed_dtypes)
    fully_shard(rev, **dict(kw, reshard_after_forward=False))
    rev.options.shard_units = units
    rev.options.prefetch = prefetch
    return rev


def _is_unit(m: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(m, FSDPModule)


def uniform_dtype(named: list[tuple[str, torch.nn.Parameter]], unit: str, mode: str) -> None:
    """One dtype for the trainable parameters of an FSDP2 unit: refuse naming the odd
    ones, or cast them (``mode="cast"``) to the dtype most of the unit's elements have."""
    named = [(n, p) for n, p in named if p.requires_grad]
    counts: dict[torch.dtype, int] = {}
    for _, p in named:
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if len(counts) <= 1:
        return
    main = max(counts, key=lambda d: counts[d])
    odd = [(n, p) for n, p in named if p.dtype != main]
    listed = ", ".join(f"{n} ({str(p.dtype).replace('torch.', '')})" for n, p in odd[:4])
    listed += f" and {len(odd) - 4} more" if len(odd) > 4 else ""
    want = str(main).replace("torch.", "")
    if mode != "cast":
        raise RevFFNError(
            f"{unit} mixes parameter dtypes: {listed} in a {want} unit; FSDP2 needs one dtype "
            f"per unit. Pass shard(rev, mixed_dtypes='cast') to cast them to {want}, or cast "
            "the model before sharding (a MixedPrecisionPolicy then sets the compute dtype)")
    warnings.warn(f"{unit}: casting {listed} to {want} for FSDP2 (one dtype per unit)",
                  stacklevel=3)
    with torch.no_grad():
        for _, p in odd:
            p.data = p.data.to(main)


def prepare(rev: RevModel) -> RevModel:
    """Compile the couplings of both modes now, before any ``fully_shard``.

    Compiling traces into each converted decoder layer; on a layer that is already an FSDP2
    unit that would run FSDP2's forward hooks on trace proxies (with a mixed-precision
    policy they fail; without one they gather parameters during tracing). :func:`shard`
    calls this; call it yourself before applying ``fully_shard`` by hand or through
    accelerate."""
    rev.specs(True)
    try:
        rev.specs(False)
    except ConversionError:  # eval mode is compiled (and refused) when it is first used
        pass
    return rev


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


