"""Machine-independent memory probes.

- :func:`saved_tensor_bytes`: bytes autograd keeps for backward while ``fn`` runs, summed
  over unique storages seen by ``torch.autograd.graph.saved_tensors_hooks``, parameters
  and views of parameters (``weight.t()`` saved by a linear layer) excluded: they exist
  anyway.
- :func:`peak_live_bytes`: the peak of live tensor storage bytes during ``fn`` (forward,
  loss and backward together), tracked by a TorchDispatchMode over storages. An op's output
  counts only when its storage is new, not shared with one of the op's inputs (views and
  in-place results of tensors from before ``fn`` are not allocations); the ``baseline``
  tensors (parameters) are added once, so the figure is a step's true peak.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr())


def saved_tensor_bytes(fn: Callable[[], Any], exclude: set[int] | None = None) -> tuple[int, Any]:
    """Run ``fn``; return (bytes saved for backward, fn's result).

    ``exclude``: ids of tensors not to count (parameters are always excluded).
    """
    seen: dict[tuple[str, int], int] = {}
    skip = exclude or set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if (isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)
                or id(t) in skip or t.device.type == "meta"):
            return t
        st = t.untyped_storage()
        seen[_storage_key(t)] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


class _LiveTracker(TorchDispatchMode):
    """Counts storage bytes of every tensor an op produces, until the storage dies."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[tuple[str, int], int] = {}
        self.current = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = _storage_key(t)
        if key in self.live or st.nbytes() == 0:
            return
        self.live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: tuple[str, int]) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            # an output sharing an input's storage (a view, an in-place result) is no allocation
            if isinstance(t, torch.Tensor) and t.device.type != "meta" \
                    and _storage_key(t) not in inputs:
                self.track(t)
        return out


def peak_live_bytes(fn: Callable[[], Any], baseline: list[torch.Tensor] | None = None
                    ) -> tuple[int, Any]:
    """Run ``fn``; return (peak bytes of live tensors created during it, fn's result).

    ``baseline``: tensors alive before (parameters, optimizer state) to add to the count,
    so the result is the peak of the whole step rather than of what ``fn`` allocated.
    """
    tracker = _LiveTracker()
    base = 0
    seen: set[tuple[str, int]] = set()
    for t in baseline or []:
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            base += t.untyped_storage().nbytes()
    with tracker:
        out = fn()
    return base + tracker.peak, out


class _Breakdown(_LiveTracker):
    """Also sums the gradients alive each time a new peak is reached."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.params = params
        self.grads_at_peak = 0

    def track(self, t: torch.Tensor) -> None:
        before = self.peak
        super().track(t)
        if self.peak > before:
            self.grads_at_peak = storage_bytes(p.grad for p in self.params)


def storage_bytes(tensors: Any) -> int:
    """Bytes of the unique storages behind ``tensors`` (None entries skipped)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def step_breakdown(step: Callable[[], Any], params: list[torch.Tensor],
                   optimizer_states: list[torch.Tensor]) -> dict[str, int]:
    """Peak of one training ``step`` by category, in bytes.

    Run one step before, so the optimizer states exist. Parameters and optimizer states
    are counted as they are; of what the step allocates, the gradients alive at the peak
    are "gradients" and the rest "activations" (saved tensors, recomputation, temporaries).
    """
    base_params = storage_bytes(params)
    base_states = storage_bytes(optimizer_states)
    tracker = _Breakdown(params)
    with tracker:
        step()
    return {"peak": base_params + base_states + tracker.peak, "parameters": base_params,
            "optimizer": base_states, "gradients": tracker.grads_at_peak,
            "activations": tracker.peak - tracker.grads_at_peak}


def adamw_step_peak(model: torch.nn.Module, input_ids: torch.Tensor, fused: bool = False,
                    lr: float = 1e-5) -> dict[str, int]:
    """:func:`step_breakdown` of a causal-LM training step with AdamW, ordinary or fused
    into the backward. A first step creates the optimizer states; the second is measured."""
    from ..training.fused import fuse_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    if fused:
        opt: Any = fuse_optimizer(model, torch.optim.AdamW, lr=lr)
        opts = list(opt.optimizers.values())
    else:
        opt = torch.optim.AdamW(params, lr=lr)
        opts = [opt]

    def step() -> None:
        model(input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        step()
        states = [t for o in opts for s in o.state.values() for t in s.values()]
        return step_breakdown(step, params, states)
    finally:
        if fused:
            opt.remove()
