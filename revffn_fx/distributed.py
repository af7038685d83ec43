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

import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import RevFFNError
from .model import RevModel

__all__ = ["shard", "prepare", "is_sharded", "local_numel", "check_wrappers",
           "save_pretrained", "has_dtensors"]

#: how long a sharded save_pretrained waits for every rank to call it before refusing
SAVE_SYNC_TIMEOUT = 30.0


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


def has_dtensors(rev: RevModel) -> bool:
    """Whether any parameter of ``rev`` is a DTensor (FSDP2, by :func:`shard` or by hand)."""
    return any(type(p).__name__ == "DTensor" for p in rev.parameters())


_save_calls = [0]  # per process: the n-th sharded save of every rank meets under one key


def _all_ranks_arrive(timeout: float) -> None:
    """Wait until every rank has called a sharded save (a c10d store counter), or refuse
    within ``timeout`` seconds: the gather that follows is a collective, and a save
    called on one rank only would wait for the others until the process group's timeout.
    Every rank follows one decision (the store's compare-and-set), so a rank that arrives
    just as another gives up does not enter the collective alone."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    world = dist.get_world_size()
    _save_calls[0] += 1
    key = f"revffn_fx/save_pretrained/{_save_calls[0]}"
    store = _get_default_store()
    store.add(key, 1)
    deadline = time.monotonic() + timeout
    while store.add(key, 0) < world and time.monotonic() < deadline:
        time.sleep(0.02)
    want = b"go" if store.add(key, 0) >= world else b"fail"
    decided = store.compare_set(f"{key}/decision", "", want.decode())
    if bytes(decided) != b"go":
        arrived = store.add(key, 0)
        raise RevFFNError(
            f"save_pretrained on a sharded RevModel must be called on every rank (rank 0 "
            f"writes, the others take part in gathering the weights); {arrived} of {world} "
            f"ranks called it within {timeout:g} s. Call it on all ranks, or gather a full "
            "state dict yourself and pass it: rev.save_pretrained(dir, state_dict=...) on "
            "one rank")


@contextmanager
def _full_parameters(rev: RevModel, state_dict: dict[str, Any]) -> Iterator[None]:
    """Register the full tensors of ``state_dict`` in place of the sharded parameters
    (and buffers it holds) for the duration of a save; restored after."""
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    missing = [n for n, _ in rev.named_parameters() if n not in state_dict]
    if missing:
        raise RevFFNError(f"the state dict given to save_pretrained lacks {len(missing)} of "
                          f"the RevModel's parameters ({missing[0]}, ...): pass the full "
                          "state dict of the RevModel (its own parameter names)")
    try:
        for name, mod in rev.named_modules():
            prefix = f"{name}." if name else ""
            for table in (mod._parameters, mod._buffers):
                for k, v in list(table.items()):
                    full = state_dict.get(prefix + k)
                    if v is None or full is None:
                        continue
                    swapped.append((table, k, v))
                    full = full.full_tensor() if hasattr(full, "full_tensor") else full
                    table[k] = (nn.Parameter(full.detach(), requires_grad=False)
                                if table is mod._parameters else full.detach())
        yield
    finally:
        for table, k, v in reversed(swapped):
            table[k] = v


def save_pretrained(rev: RevModel, save_directory: str | Path, *,
                    state_dict: dict[str, Any] | None = None,
                    sync_timeout: float = SAVE_SYNC_TIMEOUT, **kwargs: Any) -> None:
    """``rev.save_pretrained`` on a model with sharded (DTensor) parameters.

    Called on every rank: the ranks meet (refused within ``sync_timeout`` seconds, with a
    RevFFNError, if some never call it), the full weights are gathered to rank 0 on the CPU
    (``torch.distributed.checkpoint``'s ``get_model_state_dict`` with
    ``full_state_dict=True, cpu_offload=True``), rank 0 writes the usual export
    (``rf.load`` reads it), the others wait for it and raise if it failed.
    With ``state_dict`` (a full state dict gathered by the caller, as accelerate and the
    Trainer do before saving on the main process): written by this rank alone, no
    collective.
    """
    import torch.distributed as dist

    from .export import save

    if state_dict is not None:
        if kwargs.pop("is_main_process", True):
            with _full_parameters(rev, state_dict):
                save(rev, save_directory, **kwargs)
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise RevFFNError("this RevModel's parameters are sharded (DTensors) but no process "
                          "group is initialised: cannot gather them to save")
    kwargs.pop("is_main_process", None)  # rank 0 writes
    _all_ranks_arrive(sync_timeout)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(rev, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    error: list[str | None] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            with _full_parameters(rev, full):
                save(rev, save_directory, **kwargs)
        except Exception as e:  # told to the other ranks, raised here after
            failure, error[0] = e, f"{type(e).__name__}: {e}"
    del full
    dist.broadcast_object_list(error, src=0)
    if failure is not None:
        raise failure
    if error[0] is not None:
        raise RevFFNError(f"rank 0 failed to write {save_directory}: {error[0]}")
