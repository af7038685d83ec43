"""FSDP2 inside the reversible stacks: the stacks call the branch modules directly, so the
units' own hooks never fire; these gather, reshard and reduce a layer's units around its
forward and its recompute, and refuse wrappers the stacks cannot drive."""

from __future__ import annotations

from typing import Any

from ..errors import RevFFNError


def check_params(stack: Any, adopt: bool = True) -> None:
    """Refuse parameters the stack cannot train correctly (wrappers it does not drive)."""
    units = stack.options.shard_units
    n = 0
    for layer in stack.layers:
        for u in layer.updates:
            for m in u.branch.modules():
                for name, p in m.named_parameters(recurse=False):
                    n += 1
                    if getattr(p, "_fsdp_flattened", False):
                        raise RevFFNError(
                            "a RevModel under FSDP1 (FullyShardedDataParallel) is not "
                            "supported: its flattened parameters bypass the reversible "
                            "backward; shard with revffn_fx.distributed.shard(rev) (FSDP2)")
                    if type(p).__name__ == "DTensor" and m not in units:
                        if adopt and stack.options.find_units is not None:
                            stack.options.find_units()  # fully_shard applied by others
                            return check_params(stack, adopt=False)
                        raise RevFFNError(
                            f"parameter {name!r} of {type(m).__name__} is a DTensor that "
                            "revffn-fx did not shard: fully_shard applied to modules inside "
                            "a RevModel does not reach the reversible stacks (they call the "
                            "branch modules directly); use revffn_fx.distributed.shard(rev)")
    if n == 0:
        raise RevFFNError(
            "the reversible stack finds no parameters in its layers' modules: the model is "
            "under a wrapper that removed them (FSDP1 with flat parameters?); shard with "
            "revffn_fx.distributed.shard(rev) (FSDP2) or use DDP")


def unshard(units: list[Any], prefetch: list[Any] | None = None) -> None:
    """All-gather ``units`` (waiting for an all-gather issued earlier), then issue the
    all-gather of ``prefetch`` (the next layer's units) without waiting, so it overlaps
    this layer's compute."""
    for unit in units:
        unit.unshard()
    for unit in prefetch or ():
        unit.unshard(async_op=True)


def reshard(units: list[Any], forward: bool = False) -> None:
    """Reshard; after the forward, as the unit's ``reshard_after_forward`` says."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    for unit in units:
        groups = unit._get_fsdp_state()._fsdp_param_groups
        for g in groups:
            if forward:  # FSDPParamGroup.reshard honours reshard_after_forward in FORWARD
                g._training_state = TrainingState.FORWARD
            g.reshard()
            g._training_state = TrainingState.IDLE


def reduce_grads(units: list[Any], sink: Any = None) -> None:
    """A layer's backward is complete: reduce-scatter its units' gradients (FSDP2's
    post-backward: accumulate, reshard, reduce-scatter into the sharded ``.grad``), then
    hand each sharded parameter with a reduced gradient to ``sink``."""
    for unit in units:
        for g in unit._get_fsdp_state()._fsdp_param_groups:
            g.post_backward()
            if sink is None:
                continue
            g._wait_for_post_backward()  # the reduce-scatter's stream, before stepping
            for fp in g.fsdp_params:
                if fp.grad_offload_event is not None:  # CPU offload: the D2H copy
                    fp.grad_offload_event.synchronize()
                    fp.grad_offload_event = None
                if fp.sharded_param.grad is not None:
                    sink(fp.sharded_param)
