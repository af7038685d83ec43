"""``rev.save_pretrained`` on a model with sharded (DTensor) parameters: every rank
meets, the full weights are gathered to rank 0, which writes the usual directory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from .errors import RevFFNError
from .serialization.saving import save

#: how long a sharded save_pretrained waits for every rank to call it before refusing
SAVE_SYNC_TIMEOUT = 30.0


def has_dtensors(rev: Any) -> bool:
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
def _full_parameters(rev: Any, state_dict: dict[str, Any]) -> Iterator[None]:
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


def save_pretrained(rev: Any, save_directory: str | Path, *,
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
